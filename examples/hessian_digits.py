"""Top Hessian eigenvalues, trace and spectral density of a small network on sklearn's digits.

Pure curvature API, no Lightning: train an MLP for a few epochs, then build the Hessian operator
on a few fixed batches and read it with one Lanczos run.

    python examples/hessian_digits.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lightning_landscape.curvature import HessianOperator, analyze


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args(argv)
    torch.manual_seed(0)
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        for idx in torch.randperm(len(X)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    batches = [(X[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]
    op = HessianOperator(lambda b: F.cross_entropy(model(b[0]), b[1]), model, batches)
    start = time.perf_counter()
    result = analyze(op, top_k=3, smallest=True, trace=True, density=True, seed=0)
    seconds = time.perf_counter() - start
    print(f"parameters: {op.dim}, samples: {int(op.total_size)}")
    print(
        "top eigenvalues:",
        [round(v, 4) for v in result.top.eigenvalues.tolist()],
        "converged:",
        result.top.converged,
    )
    print(f"most negative eigenvalue: {float(result.smallest.eigenvalues[0]):.4f}")
    trace, stderr = result.trace.estimate, result.trace.stderr
    print(f"trace: {trace:.3f} ± {stderr:.3f}")
    print(f"mean eigenvalue tr(H)/d: {trace / op.dim:.5f} ± {stderr / op.dim:.5f}")
    probes, nodes = result.density.nodes.shape
    print(f"SLQ density: {nodes} nodes from {probes} probe(s)")
    print(f"cost: {result.num_matvecs} Hessian-vector products, {seconds:.2f} s")


if __name__ == "__main__":
    main()
