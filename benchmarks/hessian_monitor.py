"""Overhead of HessianMonitor on a training run: the same small network trained with and without
the monitor, wall time ratio, and the monitor's cost in Hessian-vector products.

    python benchmarks/hessian_monitor.py [--epochs 6] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import HessianMonitor

warnings.filterwarnings("ignore")


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10)
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
    return DataLoader(TensorDataset(X, torch.tensor(d.target)), batch_size=64, shuffle=True)


def fit(callbacks, epochs: int) -> float:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    start = time.perf_counter()
    trainer.fit(Net(), loader())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    configs = {
        "top-1 eigenvalue": dict(top_k=1, min_eigenvalue=False, trace=False),
        "top-3 + min + trace": dict(top_k=3, trace=True),
        "top-3 + min + trace + density": dict(top_k=3, trace=True, density=True),
    }
    base = min(fit([], args.epochs) for _ in range(args.repeats))
    print(
        f"model: 64-128-10 MLP with BatchNorm/Dropout (9.7k params), digits (1797 samples), "
        f"{args.epochs} epochs, batch 64; baseline {base:.2f} s"
    )
    print(
        f"{'configuration (every epoch, 4 batches of 64)':48s} {'time (s)':>9s} {'ratio':>7s} "
        f"{'matvecs/measurement':>20s} {'s/measurement':>14s}"
    )
    for name, kw in configs.items():
        times, mons = [], []
        for _ in range(args.repeats):
            mon = HessianMonitor(every_n_epochs=1, num_batches=4, **kw)
            times.append(fit([mon], args.epochs))
            mons.append(mon)
        hist = mons[0].history
        mv = sum(h["hessian/num_matvecs"] for h in hist) / len(hist)
        sec = sum(h["hessian/seconds"] for h in hist) / len(hist)
        t = min(times)
        print(f"{name:48s} {t:9.2f} {t / base:7.2f} {mv:20.1f} {sec:14.3f}")


if __name__ == "__main__":
    main()
