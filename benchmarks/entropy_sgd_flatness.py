"""Does Entropy-SGD find flatter minima? Final top Hessian eigenvalue, Entropy-SGD vs SGD.

A small MLP on scikit-learn's digits, trained for the same number of epochs by SGD (momentum) and
by EntropySGD in its default mode (one Langevin step per batch), so both spend exactly the same
number of gradient evaluations. HessianMonitor measures the top eigenvalue and the trace of the
Hessian of the training loss at the final weights (for EntropySGD the anchor x, swapped in with
``anchor_in_parameters``); the script also reports the training loss and held-out accuracy.

    python benchmarks/entropy_sgd_flatness.py [--epochs 30] [--seeds 3] [--L 6]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import EntropySGD, EntropySGDCallback, HessianMonitor
from lightning_landscape.optim import anchor_in_parameters

warnings.filterwarnings("ignore")


class AnchorHessianMonitor(HessianMonitor):
    """HessianMonitor that measures EntropySGD's anchor x, not the Langevin sample x'."""

    def run_measurement(self, trainer, pl_module, epoch, step):
        with anchor_in_parameters(trainer.optimizers):
            return super().run_measurement(trainer, pl_module, epoch, step)


class Net(pl.LightningModule):
    def __init__(self, optimizer: str, opt_kwargs: dict) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.optimizer, self.opt_kwargs = optimizer, opt_kwargs

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), **self.opt_kwargs)
        return EntropySGD(self.parameters(), **self.opt_kwargs)


def data():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


def run(optimizer: str, opt_kwargs: dict, epochs: int, seed: int) -> dict[str, float]:
    (xt, yt), (xv, yv) = data()
    pl.seed_everything(seed, verbose=False)
    model = Net(optimizer, opt_kwargs)
    monitor = AnchorHessianMonitor(
        epochs=[epochs], top_k=1, min_eigenvalue=False, trace=True, num_batches=8
    )
    callbacks = [monitor] + ([EntropySGDCallback()] if optimizer == "entropy_sgd" else [])
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    loader = DataLoader(TensorDataset(xt, yt), batch_size=64, shuffle=True)
    start = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - start
    with torch.no_grad():  # the fit ends on x
        train_loss = F.cross_entropy(model.net(xt), yt).item()
        val_acc = (model.net(xv).argmax(1) == yv).float().mean().item()
    final = monitor.history[-1]
    return {
        "lambda_max": final["hessian/eigenvalue_1"],
        "trace": final["hessian/trace"],
        "train_loss": train_loss,
        "val_acc": val_acc,
        "seconds": seconds,
        "grad_evals": trainer.global_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--L", type=int, default=6)
    parser.add_argument("--gamma", type=float, default=0.3)
    parser.add_argument("--noise", type=float, default=1e-3)
    args = parser.parse_args()
    configs = {
        "sgd": ("sgd", dict(lr=0.1, momentum=0.9)),
        "entropy_sgd": (
            "entropy_sgd",
            dict(
                lr=1.0,
                momentum=0.9,
                nesterov=True,
                L=args.L,
                gamma=args.gamma,
                scoping=1e-3,
                sgld_lr=0.1,
                noise=args.noise,
                alpha=0.75,
            ),
        ),  # fmt: skip
    }
    print(f"digits, MLP 64-64-10 (4.8k params), batch 64, {args.epochs} epochs, "
          f"seeds 0..{args.seeds - 1}; Hessian on 8 fixed batches at the final weights")  # fmt: skip
    header = f"{'optimizer':12s} {'grad evals':>10s} {'λ_max':>14s} {'trace':>16s} "
    print(header + f"{'train loss':>14s} {'val acc':>14s} {'s/run':>6s}")
    for name, (kind, kwargs) in configs.items():
        runs = [run(kind, kwargs, args.epochs, seed) for seed in range(args.seeds)]

        def stat(key, fmt, runs=runs):
            values = [r[key] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{format(statistics.mean(values), fmt)} ± {format(spread, fmt)}"

        print(
            f"{name:12s} {runs[0]['grad_evals']:>10d} {stat('lambda_max', '.2f'):>14s} "
            f"{stat('trace', '.1f'):>16s} {stat('train_loss', '.4f'):>14s} "
            f"{stat('val_acc', '.4f'):>14s} {statistics.mean(r['seconds'] for r in runs):>6.1f}"
        )
    print(f"entropy_sgd: {kwargs}")


if __name__ == "__main__":
    main()
