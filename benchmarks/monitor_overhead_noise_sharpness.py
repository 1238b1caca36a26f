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
import warnings

import torch
from monitor_fit import DigitsMLP, timed_fit

from lightning_landscape import NoiseTemperatureMonitor, SharpnessMonitor

warnings.filterwarnings("ignore")
logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
logging.getLogger("lightning_landscape").setLevel(logging.WARNING)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = sum(p.numel() for p in DigitsMLP(args.width).parameters())
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
            elapsed, steps = timed_fit(
                [monitor] if monitor is not None else [],
                args.epochs,
                args.width,
                batch_size=32,
                accumulate_grad_batches=2,
            )
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
