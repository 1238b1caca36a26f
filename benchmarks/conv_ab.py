"""A/B of one cached Hessian-vector product on ResNet-18 (CIFAR stem): PyTorch's own convolution
double backward against :mod:`lightning_landscape.curvature.conv`'s, interleaved in one process
(the order of runs moves single timings by 10-30 % on a shared CPU).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/conv_ab.py                # float32, 8 images
    PYTHONPATH=. python benchmarks/conv_ab.py --dtype float64 --batch 32 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_landscape.curvature import hvp as H

sys.path.insert(0, str(Path(__file__).parent))
from gpu_models import ResNet18  # noqa: E402


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = ResNet18().eval().to(device, dtype)
    batch = (
        torch.randn(args.batch, 3, 32, 32, dtype=dtype, device=device),
        torch.randint(0, 10, (args.batch,), device=device),
    )
    params = list(model.parameters())

    def loss(b):
        return F.cross_entropy(model(b[0]), b[1])

    V = torch.randn(1, sum(p.numel() for p in params), dtype=dtype, device=device)
    graphs = {}
    for convs in (False, True):  # build both graphs, and one product of each to warm up
        with H.guard(model, params, 0, graph_kernels=convs):
            graphs[convs] = H.gradient_graph(loss, params, batch)
            H.hvp_from_graph(graphs[convs], params, V, retain=True)
    times: dict = {False: [], True: [], "gradient": []}

    def timed(key, fn) -> None:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times[key].append(time.perf_counter() - start)

    for _ in range(args.repeats):
        for convs in (False, True):
            with H.guard(model, params, 0, graph_kernels=convs):
                timed(convs, lambda c=convs: H.hvp_from_graph(graphs[c], params, V, retain=True))
        timed("gradient", lambda: torch.autograd.grad(loss(batch), params))
    g = median(times["gradient"])
    print(
        f"{args.dtype}, {args.batch} images, {device.type}: gradient {g * 1e3:.1f} ms; "
        f"cached product, PyTorch's convolution double backward {median(times[False]) / g:.2f}x, "
        f"standard convolutions {median(times[True]) / g:.2f}x a gradient"
    )


if __name__ == "__main__":
    main()
