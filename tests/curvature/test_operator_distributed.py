"""Two gloo ranks with unequal shards give the single-process answer on the union of shards
(the Hessian, with every product kind's path: cached and compiled; and the Gauss-Newton part
with its residual)."""

from __future__ import annotations

import os
import warnings
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lightning_landscape.curvature import (
    GGNOperator,
    HessianOperator,
    ResidualOperator,
    analyze,
    crosscheck,
    spectral_density,
    top_eigenvalues,
    trace,
)

from . import end_process_group
from ._problems import (
    FusedCrossEntropy,
    MeanOfLosses,
    make_batches,
    make_cnn,
    make_loss,
    make_mlp,
)

SIZES = (5, 3, 7, 2, 4)
SHARDS = ((0, 1), (2, 3, 4))  # rank 0: 8 samples in 2 batches, rank 1: 13 in 3


def _measure(batches) -> dict:
    """Everything the engine computes, on an operator over ``batches``. BatchNorm in train mode
    (per-batch statistics), no dropout: dropout masks depend on which process draws them."""
    model = make_cnn(dropout=0.0).train()
    op = HessianOperator(make_loss(model), model, batches, hvp="cached")
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = {"hv": op @ v, "total_size": op.total_size, "gradient": op.gradient()}
    top = top_eigenvalues(op, 3, tol=1e-8, seed=0)
    low = top_eigenvalues(op, which="smallest", tol=1e-8, seed=0)
    out.update(
        top=top.eigenvalues, top_n=top.num_matvecs, low=low.eigenvalues, low_n=low.num_matvecs
    )
    for method in ("auto", "hutch++", "hutchinson"):
        r = trace(op, num_matvecs=40, method=method, seed=3)
        out[method] = torch.tensor([r.estimate, r.stderr, r.num_matvecs, r.deflation_dim])
    dens = spectral_density(op, num_probes=2, num_steps=10, seed=1)
    out.update(nodes=dens.nodes, weights=dens.weights, dens_n=dens.num_matvecs)
    res = analyze(op, top_k=2, smallest=True, trace=True, trace_probes=10, density=True,
                  density_steps=12, seed=2)  # fmt: skip
    out.update(an_top=res.top.eigenvalues, an_low=res.smallest.eigenvalues,
               an_trace=torch.tensor([res.trace.estimate, res.trace.stderr]),
               an_nodes=res.density.nodes, an_n=res.num_matvecs)  # fmt: skip
    out["num_matvecs"] = op.num_matvecs
    # the Gauss-Newton part and the residual H − G, reduced the same way
    ggn = GGNOperator(lambda b: (model(b[0]), b[1]), model, batches)
    out.update(ggn_v=ggn @ v, ggn_total=ggn.total_size,
               ggn_top=top_eigenvalues(ggn, 2, tol=1e-8, seed=0).eigenvalues,
               res_low=top_eigenvalues(ResidualOperator(op, ggn), which="smallest", tol=1e-8,
                                       seed=0).eigenvalues)  # fmt: skip
    ggn.release()
    out["fresh_seed"] = top_eigenvalues(op, tol=1e-2).eigenvalues  # seed broadcast from rank 0
    op.release()
    # compiled products (an MLP on the same samples: compiles in seconds): each rank compiles
    # the variants of its own batch sizes, at its own pace, between the same all-reduces
    mlp = make_mlp(dropout=0.0).eval()
    flat = [(x.flatten(1)[:, :4], y) for x, y in batches]
    compiled = HessianOperator(make_loss(mlp), mlp, flat, hvp="compiled")
    out["compiled_top"] = top_eigenvalues(compiled, 2, tol=1e-8, seed=0).eigenvalues
    # "auto" with a custom Function in one rank's batches only (sizes 3 and 2): both ranks
    # compare the products with finite differences, and decide alike
    holder = torch.nn.Module()
    holder.mlp, holder.scale = mlp, torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    dim = sum(p.numel() for p in holder.parameters())
    u = torch.randn(dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for key, custom in (("auto_linear", 3), ("auto_fused", 2)):
        auto = HessianOperator(partial(_custom_loss, holder, key, custom), holder, flat, hvp="auto")
        auto.warn = lambda kind, message: None
        out[key], out[f"{key}_kind"] = auto @ u, auto.hvp_choice
        # a later operator of that kind (a monitor's next measurement) checks its own graphs,
        # now with the Function in the other rank's batches (sizes 7 and 5)
        later = HessianOperator(
            partial(_custom_loss, holder, key, 2 * custom + 1), holder, flat,
            hvp=out[f"{key}_kind"] if key == "auto_linear" else "cached",
        )  # fmt: skip
        later.graphs.suspects, later.warn = [], lambda kind, message: None
        out[f"later_{key}"], out[f"later_{key}_kind"] = later @ u, later.hvp_choice
    # the symmetry check of finite differences on a stop-gradient loss: taken on the products
    # of the union (each rank's differences summed first), not rank by rank
    semi = HessianOperator(partial(_semi_gradient, mlp), mlp, flat, hvp="finite_difference")
    w = torch.randn(1, semi.dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out["asymmetry_fd"] = torch.tensor([crosscheck.nonconservative(semi, w, 1e-4)])
    return out


def _semi_gradient(mlp, batch):
    """A semi-gradient TD-style loss: its target, the output at another input, detached."""
    x = batch[0]
    return ((mlp(x) - mlp(0.8 * x + 0.1).detach()) ** 2).mean()


def _custom_loss(holder, key, custom, batch):
    """Cross-entropy times a learned weight; where the batch has ``custom`` samples, reduced by
    a linear custom Function (exact; without the weight) or computed by a fused kernel (drops
    terms)."""
    x, y = batch
    logits = holder.mlp(x)
    if len(y) != custom:
        ce = F.cross_entropy(logits, y)
    elif key == "auto_linear":  # fed a constant gradient (under a learned weight it drops terms)
        return MeanOfLosses.apply(F.cross_entropy(logits, y, reduction="none")) + holder.scale**2
    else:
        ce = FusedCrossEntropy.apply(logits, y)
    return torch.exp(-holder.scale) * ce + holder.scale


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        batches = make_batches((1, 6, 6), sizes=SIZES)
        shard = [batches[i] for i in SHARDS[rank]]
        out = _measure(shard)
        if rank == 0:  # an operator that does not reduce may run on one rank alone (no hang)
            model = make_cnn(dropout=0.0).train()
            local = HessianOperator(make_loss(model), model, shard, distributed=False)
            out["local_top"] = top_eigenvalues(local, tol=1e-8).eigenvalues
        dist.barrier()
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        end_process_group()


@pytest.mark.distributed
def test_two_ranks_equal_single_process_on_union(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _measure(make_batches((1, 6, 6), sizes=SIZES))
    assert ranks[0]["total_size"] == sum(SIZES)
    for key, expected in single.items():
        if key == "fresh_seed":
            continue
        for r in range(2):
            got = ranks[r][key]
            if isinstance(expected, torch.Tensor):
                tol = 1e-7 if key.endswith(("auto_fused", "_fd")) else 1e-10  # finite differences
                assert torch.allclose(got, expected, rtol=tol, atol=tol * 1e-2), (key, r)
            else:
                assert got == expected, (key, r)
    assert (
        single["auto_linear_kind"] == "cached"
        and single["auto_fused_kind"] == "finite_difference"
        and single["later_auto_linear_kind"] == "cached"
        and single["later_auto_fused_kind"] == "finite_difference"
        and single["asymmetry_fd"] > 0.01
    )
    # a seed drawn on rank 0 reaches rank 1: both ran the same Lanczos
    assert torch.equal(ranks[0]["fresh_seed"], ranks[1]["fresh_seed"])
    shard0 = [make_batches((1, 6, 6), sizes=SIZES)[i] for i in SHARDS[0]]
    model = make_cnn(dropout=0.0).train()
    local = top_eigenvalues(HessianOperator(make_loss(model), model, shard0), tol=1e-8, seed=0)
    assert torch.allclose(ranks[0]["local_top"], local.eigenvalues, rtol=1e-8)


def _contrastive(model, rank: int, gather):
    """A SimCLR-style loss: each rank's embeddings against those of every rank, gathered with
    their gradients (``torch.distributed.nn.functional.all_gather``, a custom autograd
    Function whose backward is a collective); ``gather=None``: one process on the union."""

    def loss(batch):
        (x,) = batch
        z = F.normalize(model(x), dim=-1)
        every = torch.cat(gather(z), 0) if gather else z
        return F.cross_entropy(z @ every.T / 0.5, torch.arange(len(z)) + rank * len(z))

    return loss


_DIM = sum(p.numel() for p in make_mlp().parameters())
_BLOCK = torch.randn(_DIM, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _contrastive_worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of a tracer API
            from torch.distributed.nn.functional import all_gather

            x = make_batches((4,), sizes=(8,))[0][0][4 * rank : 4 * rank + 4]
            out = {}
            for hvp in ("auto", "double_backward", "finite_difference"):
                model = make_mlp(dropout=0.0)
                op = HessianOperator(_contrastive(model, rank, all_gather), model, [(x,)], hvp=hvp)
                op.warn = lambda kind, message: None
                v = torch.randn(
                    op.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64
                )
                out[hvp], out[f"{hvp}_reason"] = op @ v, op.hvp_reason
                if hvp == "auto":  # a block (trace probes): vmap inside the gather hung the ranks
                    out["block"], out["block_kind"] = op @ _BLOCK, op.block_choice
        torch.save(out, os.path.join(tmp, f"contrastive{rank}.pt"))
    except BaseException:
        end_process_group()
        raise
    from callbacks._sharded_checks import leave

    leave()  # a barrier, then os._exit: no teardown of the gloo group to abort in (SIGABRT)


@pytest.mark.distributed
def test_a_loss_gathered_across_ranks_equals_one_process_on_the_union(tmp_path):
    """Contrastive losses under DDP gather every rank's embeddings with their gradients, so a
    rank's loss depends on the other ranks' samples: the products (and finite differences)
    still equal one process's on the union of the samples, and the gather's Function, listed
    by the graph check, passes the comparison with finite differences."""
    mp.spawn(_contrastive_worker, args=(str(tmp_path),), nprocs=2, join=True)
    model = make_mlp(dropout=0.0)
    x = make_batches((4,), sizes=(8,))[0][0]
    op = HessianOperator(_contrastive(model, 0, None), model, [(x,)], hvp="double_backward")
    expected = op @ torch.randn(
        op.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    block = op @ _BLOCK
    for r in range(2):
        got = torch.load(tmp_path / f"contrastive{r}.pt")
        assert "_AllGatherBackward compared with finite differences" in got["auto_reason"]
        assert got["block_kind"] == "columns" and torch.allclose(got["block"], block, rtol=1e-12)
        for hvp, tol in (("auto", 1e-12), ("double_backward", 1e-12), ("finite_difference", 1e-8)):
            assert float((got[hvp] - expected).norm() / expected.norm()) < tol, (hvp, r)
