"""Block Lanczos against single-vector Lanczos: products, wall time and λ_max error.

    python benchmarks/block_lanczos.py [--device cpu|cuda] [--threads 1] [--repeats 3]
        [--hvp cached] [--block-hvp func] [--k 1] [--quick]

For the Hessians of three small networks trained a few epochs on scikit-learn's digits (1,437
training samples in 4 unequal batches, float32): an MLP 64-32-10 (2,410 parameters), an MLP
64-256-256-10 (85,002) and a CNN (conv 1→16→32, tanh, 7,690); for tol 1e-3 and 1e-4, the
products, the median wall time and the relative error of λ_max of ``top_eigenvalues`` (one
vector a step) and ``block_top_eigenvalues`` with blocks of 2, 4 and 8, against a tight
reference (float64 copy of the model, single-vector Lanczos at tol 1e-12). A markdown table on
stdout. Every operator has made one product (its graphs built) before the timings.
On a GPU, ``--block-hvp func`` runs the blocks as vmapped forward-over-reverse products.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lightning_landscape.curvature import HessianOperator, top_eigenvalues
from lightning_landscape.curvature.block_lanczos import block_top_eigenvalues

warnings.filterwarnings("ignore")
SIZES = (512, 400, 300, 225)
BLOCKS = (2, 4, 8)


class Image(nn.Module):
    """Flat 64-pixel digits as 1 × 8 × 8 images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, 1, 8, 8)


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "MLP 64-32-10": nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)),
        "MLP 64-256-256-10": nn.Sequential(
            nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
        ),
        "CNN 16-32": nn.Sequential(
            Image(),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(16, 32, 3),
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 3 * 3, 10),
        ),
    }


def digits(device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    X, y = X[perm].to(device), y[perm].to(device)
    out, start = [], 0
    for n in SIZES:
        out.append((X[start : start + n], y[start : start + n]))
        start += n
    return out


def train(model: nn.Module, batches, epochs: int = 5) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for x, y in batches:
            for i in range(0, len(x), 64):
                opt.zero_grad()
                F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
                opt.step()
    for p in model.parameters():
        p.grad = None
    return model


def operator(model: nn.Module, batches, args) -> HessianOperator:
    def loss(batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    op = HessianOperator(loss, model, batches, hvp=args.hvp, block_hvp=args.block_hvp)
    op.matmat(torch.zeros(op.dim, 1, dtype=op.dtype, device=op.device))  # graphs built
    if args.block_hvp is not None:
        op.matmat(torch.zeros(op.dim, 2, dtype=op.dtype, device=op.device))
    return op


def reference(model: nn.Module, batches, args) -> float:
    m64 = copy.deepcopy(model).double()
    b64 = [(x.double(), y) for x, y in batches]
    with operator(m64, b64, argparse.Namespace(hvp="cached", block_hvp=None)) as op:
        r = top_eigenvalues(op, 1, tol=1e-12, max_matvecs=min(op.dim, 500), seed=1)
    return float(r.eigenvalues[0])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run, device: torch.device, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = run()
        sync(device)
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def solver(op: HessianOperator, k: int, tol: float, block: int):
    """Single-vector Lanczos for ``block`` 0, else block Lanczos."""
    if block == 0:
        return lambda: top_eigenvalues(op, k, tol=tol, seed=0)
    return lambda: block_top_eigenvalues(op, k, block=block, tol=tol, seed=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hvp", default="cached")
    parser.add_argument("--block-hvp", default=None)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the first model, tol 1e-3 only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches = digits(device)
    tols = (1e-3,) if args.quick else (1e-3, 1e-4)
    chosen = list(models().items())[: 1 if args.quick else None]
    print(f"device {device}, torch {torch.__version__}, hvp {args.hvp}, block_hvp "
          f"{args.block_hvp}, k {args.k}, median of {args.repeats}\n")  # fmt: skip
    print("| model | params | tol | method | products | wall (s) | λ_max rel. error | converged |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model in chosen:
        model = train(model.to(device), batches)
        truth = reference(model, batches, args)
        with operator(model, batches, args) as op:
            for tol in tols:
                methods = [("Lanczos (1 vector)", 0)] + [(f"block {b}", b) for b in BLOCKS]
                for label, b in methods:
                    r, wall = measure(solver(op, args.k, tol, b), device, args.repeats)
                    error = abs(float(r.eigenvalues[0]) - truth) / abs(truth)
                    print(f"| {name} | {op.dim:,} | {tol:g} | {label} | {r.num_matvecs} | "
                          f"{wall:.3f} | {error:.1e} | {r.converged} |")  # fmt: skip


if __name__ == "__main__":
    main()
