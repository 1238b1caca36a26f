"""The sharded Hessian (FSDP2 and FSDP v1) on 1 and 2 gloo ranks: memory of the Lanczos basis per
rank, cost of a product in gradients, accuracy of the finite-difference top eigenvalue.

    python benchmarks/sharded.py [--steps 100] [--width 600] [--kinds fsdp2,fsdp1]

An MLP 64-W-W-10 (GELU, float32) under ``fully_shard`` (FSDP2: each Linear, then the root) or
``FullyShardedDataParallel`` (FSDP v1, ``use_orig_params=True``: the root, each Linear a unit of
its own; on one rank FSDP keeps the parameters whole, NO_SHARD) on scikit-learn
digits (4 batches of 256 samples, split over the ranks), a Lanczos run of ``--steps`` steps
started from the same Gaussian vector at every world size. Per rank: the bytes of the Lanczos
basis actually allocated (its local length times steps), the growth of the peak RSS over the run
(everything: basis, FSDP's gathered parameters, activations), and the time of one gradient (after
a warm-up one) and of one product. The top eigenvalue is compared with the exact cached product of the unsharded float64
model (world 1, no FSDP).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore")


def make(width: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10)
    ).to(dtype)


def batches(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=dtype) / 16.0
    y = torch.tensor(d.target)
    return [(x[i : i + 256], y[i : i + 256]) for i in range(0, 1024, 256)]


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def shard(model: nn.Module, kind: str, world: int) -> nn.Module:
    """``model`` under FSDP2 (``fully_shard``) or FSDP (v1) (``FullyShardedDataParallel``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    if kind == "fsdp1":
        policy = ModuleWrapPolicy({nn.Linear})
        return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True,
                                        auto_wrap_policy=policy)  # fmt: skip
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _worker(rank: int, world: int, kind: str, args, out: str) -> None:
    from lightning_landscape._core.random import gaussian, make_generator
    from lightning_landscape._core.space import space_of
    from lightning_landscape.curvature.lanczos import lanczos, ritz
    from lightning_landscape.curvature.sharded import ShardedHessianOperator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store{world}{kind}", rank=rank,
                            world_size=world)  # fmt: skip
    model = shard(make(args.width, torch.float32), kind, world)
    mine = batches(torch.float32)[rank::world]
    op = ShardedHessianOperator(lambda b: F.cross_entropy(model(b[0]), b[1]), model, mine)
    op.gradient()  # warm-up: FSDP's lazy initialization, first allocations
    start = time.perf_counter()
    for _ in range(3):
        op.gradient()
    gradient_s = (time.perf_counter() - start) / 3
    gen = make_generator(0)
    v0 = space_of(op).draw(gaussian, (1, op.dim), gen)
    before = peak_mib()
    start = time.perf_counter()
    run = lanczos(op, v0, args.steps, generator=gen)
    seconds = time.perf_counter() - start
    theta, _, res = ritz(run.alphas[0], run.betas[0])
    record = {
        "dim": op.dim,
        "local_dim": op.local_dim,
        "basis_mib": run.basis.numel() * run.basis.element_size() / 2**20,
        "rss_growth_mib": peak_mib() - before,
        "gradient_ms": 1e3 * gradient_s,
        "product_over_gradient": seconds / run.num_steps / gradient_s,
        "top": float(theta[-1]),
        "residual": float(res[-1]),
        "step": op.step,
    }
    torch.save(record, os.path.join(out, f"{kind}w{world}r{rank}.pt"))
    dist.destroy_process_group()


def exact_top(width: int, steps: int) -> float:
    from lightning_landscape._core.random import gaussian, make_generator
    from lightning_landscape.curvature import HessianOperator
    from lightning_landscape.curvature.lanczos import lanczos, ritz

    model = make(width, torch.float64)
    op = HessianOperator(lambda b: F.cross_entropy(model(b[0]), b[1]), model,
                         batches(torch.float64))  # fmt: skip
    gen = make_generator(0)
    run = lanczos(op, gaussian((1, op.dim), gen, op.dtype, op.device), steps, generator=gen)
    return float(ritz(run.alphas[0], run.betas[0])[0][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--width", type=int, default=600)
    parser.add_argument("--kinds", default="fsdp2,fsdp1")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    out = tempfile.mkdtemp()
    for kind in kinds:
        for world in (1, 2):
            mp.spawn(_worker, args=(world, kind, args, out), nprocs=world, join=True)
    truth = exact_top(args.width, args.steps)
    print(f"MLP 64-{args.width}-{args.width}-10, {args.steps} Lanczos steps, float32; "
          f"exact top eigenvalue (float64, unsharded) {truth:.6g}\n")  # fmt: skip
    print("| FSDP | world | rank | local / whole dim | basis per rank (MiB) | peak RSS growth (MiB) "
          "| gradient (ms) | product / gradient | top eigenvalue | rel. error |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, world in ((k, w) for k in kinds for w in (1, 2)):
        for rank in range(world):
            r = torch.load(os.path.join(out, f"{kind}w{world}r{rank}.pt"))
            print(f"| {kind[4:]} | {world} | {rank} | {r['local_dim']:,} / {r['dim']:,} "
                  f"| {r['basis_mib']:.1f} "
                  f"| {r['rss_growth_mib']:.1f} | {r['gradient_ms']:.1f} "
                  f"| {r['product_over_gradient']:.2f} | {r['top']:.6g} "
                  f"| {abs(r['top'] - truth) / abs(truth):.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
