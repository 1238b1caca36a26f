"""Overhead of NoiseTemperatureMonitor and SharpnessMonitor on a training run: the same small
network trained with and without each monitor, wall-time ratio, and each monitor's cost.

    python benchmarks/monitor_overhead_noise_sharpness.py [--epochs 4] [--repeats 3] [--width 128]

Every run uses ``accumulate_grad_batches=2`` (the noise monitor's source of a second batch size
on one device), so the ratio is the monitor's cost alone. One torch thread; the runs of all
configurations are interleaved and the fastest of ``--repeats`` is kept, to resist a busy machine.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import NoiseTemperatureMonitor, SharpnessMonitor

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
logging.getLogger("lightning_landscape").setLevel(logging.WARNING)


class Net(pl.LightningModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(width, 10),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader() -> DataLoader:
    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    return DataLoader(TensorDataset(X, torch.tensor(d.target)), batch_size=32, shuffle=True)


def fit(callbacks, epochs: int, width: int) -> tuple[float, int]:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        accumulate_grad_batches=2,
    )
    start = time.perf_counter()
    trainer.fit(Net(width), loader())
    return time.perf_counter() - start, trainer.global_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = sum(p.numel() for p in Net(args.width).parameters())
    configs = {
        "baseline (no monitor)": lambda: None,
        "noise: temperature only (noise_scale=False)": lambda: NoiseTemperatureMonitor(
            noise_scale=False
        ),
        "noise: temperature + noise scale, every step": lambda: NoiseTemperatureMonitor(),
        "noise: temperature + noise scale, every 10 steps": lambda: NoiseTemperatureMonitor(
            every_n_steps=10
        ),
        "sharpness: all 4 kinds, every epoch (defaults)": lambda: SharpnessMonitor(
            every_n_epochs=1
        ),
        "sharpness: all 4 kinds, ascent='gradient' 10 steps": lambda: SharpnessMonitor(
            every_n_epochs=1, ascent="gradient", ascent_steps=10
        ),
        "sharpness: sam 1 step (first order), every epoch": lambda: SharpnessMonitor(
            every_n_epochs=1, kinds=["sam"], ascent="gradient", ascent_steps=1
        ),
        "sharpness: local entropy only, 64 pairs": lambda: SharpnessMonitor(
            every_n_epochs=1, kinds=["average"], average_samples=2, local_entropy_gamma=1e4
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    monitors: dict[str, object] = {}
    steps = 0
    for _ in range(args.repeats):
        for name, make in configs.items():
            monitor = make()
            elapsed, steps = fit([monitor] if monitor is not None else [], args.epochs, args.width)
            times[name].append(elapsed)
            monitors[name] = monitor
    base = min(times["baseline (no monitor)"])
    print(
        f"model: 64-{args.width}-10 MLP with BatchNorm/Dropout ({params / 1e3:.1f}k params), digits "
        f"(1797 samples), {args.epochs} epochs, batch 32, accumulate 2 ({steps} optimizer steps), "
        f"1 thread; baseline {base:.2f} s ({1e3 * base / steps:.2f} ms/step)"
    )
    print(
        f"{'configuration':52s} {'time (s)':>9s} {'ratio':>7s} {'ms/step extra':>14s} "
        f"{'fwd/bwd/hvp per measurement':>28s} {'s/measurement':>14s}"
    )
    for name in configs:
        t = min(times[name])
        extra = 1e3 * (t - base) / steps
        cost, seconds = "-", "-"
        history = getattr(monitors[name], "history", None)
        if history:
            fwd = sum(h["sharpness/num_forward"] for h in history) / len(history)
            bwd = sum(h["sharpness/num_backward"] for h in history) / len(history)
            hvp = sum(h["sharpness/num_hvp"] for h in history) / len(history)
            sec = sum(h["sharpness/seconds"] for h in history) / len(history)
            cost, seconds = f"{fwd:.0f} / {bwd:.0f} / {hvp:.0f}", f"{sec:.3f}"
        print(f"{name:52s} {t:9.2f} {t / base:7.2f} {extra:14.3f} {cost:>28s} {seconds:>14s}")


if __name__ == "__main__":
    main()
