"""Overhead of HessianMonitor on a training run: the same small network trained with and without
the monitor, wall time ratio, and the monitor's cost in Hessian-vector products.

    python benchmarks/hessian_monitor.py [--epochs 6] [--repeats 2]
"""

from __future__ import annotations

import argparse
import warnings

from monitor_fit import timed_fit

from lightning_landscape import HessianMonitor

warnings.filterwarnings("ignore")


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
    base = min(timed_fit([], args.epochs)[0] for _ in range(args.repeats))
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
            times.append(timed_fit([mon], args.epochs)[0])
            mons.append(mon)
        hist = mons[0].history
        mv = sum(h["hessian/num_matvecs"] for h in hist) / len(hist)
        sec = sum(h["hessian/seconds"] for h in hist) / len(hist)
        t = min(times)
        print(f"{name:48s} {t:9.2f} {t / base:7.2f} {mv:20.1f} {sec:14.3f}")


if __name__ == "__main__":
    main()
