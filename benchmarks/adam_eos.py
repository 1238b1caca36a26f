"""Adam at the edge of stability (Cohen et al. 2022, arXiv 2207.14484), measured by HessianMonitor.

Full-batch Adam (lr 1e-3, betas 0.9/0.999) on a 64-64-10 tanh MLP with MSE on one-hot targets,
1,000 scikit-learn digits (pixels / 16), inside a Lightning Trainer. The preconditioned sharpness
λ_max(P⁻¹H), P = (1 − β₁ᵗ)(diag(√v̂ₜ) + ε) read from Adam's state, rises to Adam's threshold
(2 + 2β₁)/((1 − β₁)η) = 38/η = 38,000 and hovers there: ``hessian/eos_ratio`` ≈ 1, while the
plain-SGD reading λ_max(H)·η/2 stays near 0.02.

    python benchmarks/adam_eos.py [--steps 3000] [--every 100] [--seed 0] [--double]
"""

from __future__ import annotations

import argparse
import time
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from monitor_fit import quiet_trainer
from sklearn.datasets import load_digits
from torch import nn

from lightning_landscape import HessianMonitor

warnings.filterwarnings("ignore")
LR = 1e-3


class TanhMLP(pl.LightningModule):
    def __init__(self, lr: float = LR) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                                 nn.Linear(64, 10))  # fmt: skip
        self.lr = lr

    def output_and_target(self, batch):
        x, y = batch
        return self.net(x), y

    def training_step(self, batch, batch_idx):
        return F.mse_loss(*self.output_and_target(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, betas=(0.9, 0.999))


def full_batch(n: int = 1000, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` digits, pixels scaled to [0, 1], one-hot targets."""
    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=dtype) / 16.0
    y = F.one_hot(torch.tensor(d.target[:n]), 10).to(dtype)
    return x, y


class Repeat:
    """The same batch, ``times`` times: one epoch of full-batch steps."""

    def __init__(self, batch, times: int) -> None:
        self.batch, self.times = batch, times

    def __iter__(self):
        return (self.batch for _ in range(self.times))

    def __len__(self) -> int:
        return self.times


def run(steps: int, every: int, seed: int, dtype=torch.float32, **monitor_kw) -> list[dict]:
    """Train ``steps`` full-batch steps, measure every ``every``; return the monitor's history."""
    pl.seed_everything(seed)
    model = TanhMLP().to(dtype)
    batch = full_batch(dtype=dtype)
    mon = HessianMonitor(every_n_steps=every, dataloader=[batch], num_batches=1, trace=False,
                         min_eigenvalue=False, seed=seed, **monitor_kw)  # fmt: skip
    trainer = quiet_trainer(max_steps=steps, max_epochs=1, callbacks=[mon], devices=1)
    trainer.fit(model, train_dataloaders=Repeat(batch, steps))
    return mon.history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--double", action="store_true", help="float64 model and data")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    dtype = torch.float64 if args.double else torch.float32
    history = run(args.steps, args.every, args.seed, dtype)
    print(f"{'step':>5} {'λ_max(H)':>10} {'λ_max·η/2':>10} {'λ_max(P⁻¹H)':>12} {'eos_ratio':>10}")
    for h in history:
        pre = h.get("hessian/preconditioned_eigenvalue_1", float("nan"))
        ratio = h.get("hessian/eos_ratio", float("nan"))
        lam = h["hessian/eigenvalue_1"]
        print(f"{int(h['step']):>5} {lam:>10.3f} {lam * LR / 2:>10.4f} {pre:>12.0f} {ratio:>10.3f}")
    late = [h["hessian/eos_ratio"] for h in history if h["step"] >= 800]
    if late:
        print(f"eos_ratio from step 800 on: {min(late):.3f} - {max(late):.3f}")
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
