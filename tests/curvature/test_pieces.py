"""Products on pieces of each batch (``micro_batch_size``): the same matrix as on whole batches
where the loss is a mean over independent samples, whole batches (and one warning) where it is
not, and pieces only as small as the memory budget needs."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict, namedtuple

import pytest
import torch

from lightning_landscape.curvature import HessianOperator, dense_hessian
from lightning_landscape.curvature import hvp as hvp_module
from lightning_landscape.curvature.cache import PRODUCT_FACTOR, largest_graph
from lightning_landscape.curvature.pieces import COLUMNS, FLOOR, Plan, split_batch
from lightning_landscape.curvature.probes import default_probe_block
from lightning_landscape.curvature.trace import deflated_hutchinson

from . import end_process_group
from ._problems import make_batches, make_loss, make_problem

KINDS = ("cached", "double_backward", "func", "finite_difference", "auto")
# torch's own warning when forward-mode AD first loads its decompositions ("func" products)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def probes(dim: int) -> torch.Tensor:
    return torch.randn(dim, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


Pair = namedtuple("Pair", "x y")


def test_split_batch_slices_samples_and_keeps_the_rest():
    x, y, w = torch.arange(14.0).reshape(7, 2), torch.arange(7), torch.ones(3)
    batch = {"pair": Pair(x, y), "list": [y, "tag"], "weights": w, "n": 7}
    parts = split_batch(batch, 7, 3)
    assert [len(p["pair"].y) for p in parts] == [2, 2, 3]  # ⌈7/3⌉ near-equal pieces
    assert torch.equal(torch.cat([p["pair"].x for p in parts]), x)
    assert torch.equal(torch.cat([p["list"][0] for p in parts]), y)
    assert all(isinstance(p["pair"], Pair) and p["list"][1] == "tag" for p in parts)
    assert all(p["weights"] is w and p["n"] == 7 for p in parts)  # not per-sample: shared
    assert parts[0]["pair"].x.data_ptr() == x.data_ptr()  # views, no copies
    assert split_batch(batch, 7, 7)[0]["pair"].x is not None and len(split_batch(x, 7, 7)) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_pieces_give_the_dense_oracle_for_every_kind(kind):
    """Eval mode (BatchNorm on running statistics, no dropout), a mean-reduced loss, batches of
    5, 3 and 7 cut into pieces of at most 2: the matrix of the whole batches."""
    p = make_problem("cnn", mode="eval")
    H = dense_hessian(p.loss_fn, p.model, p.batches)
    op = HessianOperator(p.loss_fn, p.model, p.batches, hvp=kind, micro_batch_size=2)
    V = probes(op.dim)
    tol = 1e-6 if kind == "finite_difference" else 1e-10
    assert rel(op @ V, H @ V) < tol
    assert op.batch_sizes == [1, 2, 2, 1, 2, 1, 2, 2, 2] and op.local_size == 15
    assert rel(op.gradient(), HessianOperator(p.loss_fn, p.model, p.batches).gradient()) < 1e-12


def test_auto_cuts_only_as_much_as_the_budget_needs():
    p = make_problem("mlp", mode="eval")
    whole = HessianOperator(p.loss_fn, p.model, p.batches, memory_budget=1e12)  # no cut
    V = probes(whole.dim)
    reference = whole @ V
    assert whole.plan.piece == 0 and len(whole.batches) == 3
    graph = whole.plan.graph_bytes  # the first batch's, estimated from a slice
    for budget, most in ((graph, 5), (graph / 2, 3), (graph / 10, 1)):
        op = HessianOperator(p.loss_fn, p.model, p.batches, memory_budget=budget)
        out = op @ V
        assert 1 <= op.plan.piece <= most and "pieces of at most" in op.plan.reason
        assert max(op.batch_sizes) <= op.plan.piece and sum(op.batch_sizes) == 15
        assert rel(out, reference) < 1e-12
        assert op.graphs.cached_bytes <= budget


def test_default_budget_leaves_small_models_whole():
    p = make_problem("mlp", mode="eval")
    op = HessianOperator(p.loss_fn, p.model, p.batches)
    op @ probes(op.dim)
    assert op.plan.piece == 0 and op.plan.reason == "" and op.plan.budget == FLOOR


def test_default_budget_on_a_gpu_with_free_memory_keeps_whole_batches(monkeypatch):
    """A training step's budget cuts the batches; on a (simulated) CUDA device with free
    memory the default budget takes a share of it, and the batches stay whole."""
    from lightning_landscape.curvature import cache

    monkeypatch.setattr(cache, "FLOOR", 0)
    p = make_problem("mlp", mode="eval")
    step = HessianOperator(p.loss_fn, p.model, p.batches)
    step @ probes(step.dim)
    assert step.plan.piece > 0 and step.plan.budget == step.plan.step_bytes
    monkeypatch.setattr(cache, "free_device_bytes", lambda device: 1e12)
    gpu = HessianOperator(p.loss_fn, p.model, p.batches)
    gpu @ probes(gpu.dim)
    assert gpu.plan.piece == 0 and gpu.plan.budget == cache.DEVICE_SHARE * 1e12
    assert len(gpu.batches) == len(p.batches)


@pytest.mark.parametrize(("loss", "mode"), [("ce_sum", "eval"), ("ce_mean", "train")])
def test_loss_that_does_not_decompose_keeps_whole_batches_with_one_warning(loss, mode):
    """A sum-reduced loss, or dropout and BatchNorm in train mode: a batch's loss is not the mean
    of its pieces', so cutting would change the matrix; the batches stay whole and one warning
    says why and what it costs."""
    p = make_problem("cnn", loss, mode=mode)
    H = dense_hessian(p.loss_fn, p.model, p.batches)
    op = HessianOperator(p.loss_fn, p.model, p.batches, memory_budget=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        V = probes(op.dim)
        out = op @ V
        op @ V
    messages = [str(w.message) for w in caught if "pieces' mean" in str(w.message)]
    assert len(messages) == 1 and "not a mean over independent samples" in messages[0]
    assert op.plan.piece == 0 and len(op.batches) == 3
    assert rel(out, H @ V) < 1e-10


def test_micro_batch_size_is_checked():
    p = make_problem("mlp", mode="eval")
    for bad, err in (("8", TypeError), (2.0, TypeError), (True, TypeError), (0, ValueError)):
        with pytest.raises(err, match="`micro_batch_size` must be a positive int, 'auto' or None"):
            HessianOperator(p.loss_fn, p.model, p.batches, micro_batch_size=bad)


def test_batches_that_cannot_be_cut_are_refused_when_asked_for():
    model = make_problem("mlp", mode="eval").model
    batches = make_batches((4,))
    op = HessianOperator(
        make_loss(model), model, batches, micro_batch_size=2, batch_size_fn=lambda b: 5
    )
    with pytest.raises(ValueError, match="cannot be cut into pieces"):
        op @ probes(op.dim)


def test_time_first_batches_stay_whole_with_one_warning():
    """An LSTM fed (time, batch, features) with targets (batch,): the leading size is the time,
    so pieces would be stretches of time, whose losses are not the batch's (the hidden state
    is not carried over): the batches stay whole, with one warning, and products stay exact."""
    torch.manual_seed(0)
    lstm, head = torch.nn.LSTM(3, 4).double(), torch.nn.Linear(4, 2).double()
    model = torch.nn.ModuleList([lstm, head])
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(6, 5, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1]))
    ]

    def loss_fn(batch):
        out, _ = lstm(batch[0])
        return torch.nn.functional.cross_entropy(head(out[-1]), batch[1])

    H = dense_hessian(loss_fn, model, batches)
    op = HessianOperator(loss_fn, model, batches, memory_budget=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        V = probes(op.dim)
        out = op @ V
    said = [str(w.message) for w in caught if "whole batches" in str(w.message)]
    assert len(said) == 1 and op.plan.piece == 0
    assert rel(out, H @ V) < 1e-10


def test_a_loss_that_refuses_pieces_keeps_whole_batches():
    """A loss that raises on anything but the full batch (here: a fixed-size reshape): the
    plan's slice and pieces fail, the batches stay whole, the warning says they cannot be cut."""
    p = make_problem("mlp", mode="eval")
    n = p.batches[0][0].shape[0]

    def loss_fn(batch):
        if batch[0].shape[0] != n and batch[0].shape[0] not in (3, 7):  # only whole batches
            raise RuntimeError("shape mismatch")
        return p.loss_fn(batch)

    op = HessianOperator(loss_fn, p.model, p.batches, memory_budget=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op @ probes(op.dim)
    said = [str(w.message) for w in caught if "cannot be cut" in str(w.message)]
    assert len(said) == 1 and op.plan.piece == 0 and len(op.batches) == 3


def test_review_cases_pinn_defaultdict_later_batches_and_retry():
    """Cases a review found: a loss that differentiates inside (a PINN residual) is cut and
    exact; a defaultdict batch is cut; a later batch whose loss does not decompose (a token mean
    with padding only there) keeps every batch whole; an explicit size on batches that cannot be
    cut raises at every product, never returns zeros; an infinite budget measures nothing."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()

    def pinn(b):
        x = b["x"].clone().requires_grad_(True)
        (du,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
        return ((du - b["f"]) ** 2).mean()

    g = torch.Generator().manual_seed(1)
    batches = [defaultdict(list, x=torch.randn(12, 1, generator=g, dtype=torch.float64),
                           f=torch.randn(12, 1, generator=g, dtype=torch.float64))]  # fmt: skip
    op = HessianOperator(pinn, net, batches, memory_budget=1.0)
    V = probes(op.dim)
    assert rel(op @ V, dense_hessian(pinn, net, batches) @ V) < 1e-10 and op.plan.piece == 1

    def token_mean(b):  # mean over the tokens kept by the mask: samples weigh unequally
        per_token = net(b[0]).squeeze(-1) ** 2
        return (per_token * b[1]).sum() / b[1].sum()

    x = torch.randn(2, 6, 4, 1, generator=g, dtype=torch.float64)
    masks = torch.ones(2, 6, 4, dtype=torch.float64)
    masks[1, :3, 1:] = 0  # padding in the second batch only
    batches = [(x[0], masks[0]), (x[1], masks[1])]
    op = HessianOperator(token_mean, net, batches, memory_budget=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = op @ V
    assert op.plan.piece == 0 and any("not a mean" in str(w.message) for w in caught)
    assert rel(out, dense_hessian(token_mean, net, batches) @ V) < 1e-10

    p = make_problem("mlp", mode="eval")
    op = HessianOperator(
        p.loss_fn, p.model, p.batches, micro_batch_size=2, batch_size_fn=lambda b: 5
    )
    for _ in range(2):
        with pytest.raises(ValueError, match="cannot be cut into pieces"):
            op @ probes(op.dim)
    op = HessianOperator(p.loss_fn, p.model, p.batches, memory_budget=float("inf"))
    op @ probes(op.dim)
    assert op.plan.piece == 0 and op.plan.graph_bytes != op.plan.graph_bytes  # NaN: not measured


def test_plan_width_fits_one_plus_two_graphs_a_vector():
    """A vmapped product of k vectors on s samples holds about 1 + 2k graphs of s samples."""
    plan = Plan(0, 1e3, 1e3, 1e3, "", 0, per_sample=0.01)  # a sample's graph: 1 % of the budget
    assert plan.width(10) == 4 and plan.width(40) == 1 and plan.width(1) == COLUMNS
    assert Plan(0, math.nan, math.nan, math.nan, "").width(10**9) == COLUMNS  # nothing measured


def recorded(monkeypatch) -> list[tuple[str, int, int]]:
    """(kind, samples, vectors) of every vmapped product call the operator makes."""
    calls: list[tuple[str, int, int]] = []
    func, through = hvp_module.hvp_func, hvp_module.hvp_from_graph_in_blocks

    def spy_func(loss_fn, params, batch, Vt, module=None, **kw):
        calls.append(("func", len(batch[1]), len(Vt)))
        return func(loss_fn, params, batch, Vt, module, **kw)

    def spy_through(grad, params, Vt, retain, step, out=None, alpha=1.0):
        calls.append(("graph", -1, min(step, len(Vt))))
        return through(grad, params, Vt, retain, step, out, alpha)

    monkeypatch.setattr(hvp_module, "hvp_func", spy_func)
    monkeypatch.setattr(hvp_module, "hvp_from_graph_in_blocks", spy_through)
    return calls


@pytest.mark.parametrize("kind", ["func", "double_backward", "cached"])
def test_blocks_take_smaller_pieces_or_fewer_vectors_within_the_budget(kind, monkeypatch):
    """A budget that fits single products on whole batches but not vmapped blocks of 8: blocks
    of forward-over-reverse and double-backward products run on smaller pieces (8 vectors on
    each), cached ones on their whole-batch graphs a vector at a time; the same matrix."""
    p = make_problem("mlp", mode="eval")
    H = dense_hessian(p.loss_fn, p.model, p.batches)
    whole = HessianOperator(p.loss_fn, p.model, p.batches, memory_budget=1e12)
    whole @ probes(whole.dim)
    budget = 5.6 * whole.plan.graph_bytes  # the first batch's graph: 5 samples; single products
    # on the largest batch (7) take 3 x 7/5 of it
    op = HessianOperator(p.loss_fn, p.model, p.batches, hvp=kind, memory_budget=budget)
    V = torch.randn(op.dim, COLUMNS, generator=torch.Generator().manual_seed(1), dtype=H.dtype)
    op @ V[:, :1]
    assert op.plan.piece == 0 and op.plan.block_piece == 1 and len(op.batches) == 3
    assert "blocks of vectors on pieces of at most 1" in op.plan.reason
    calls = recorded(monkeypatch)
    assert rel(op @ V, H @ V) < 1e-10
    if kind == "func":
        assert calls == [("func", 1, COLUMNS)] * 15  # every sample, all 8 vectors at once
    elif kind == "double_backward":
        assert calls == [("graph", -1, COLUMNS)] * 15
    else:
        assert calls == [("graph", -1, 1)]  # one backward through the kept graphs, 1 at a time


def test_blocks_through_kept_graphs_fit_the_budget_left_beside_them(monkeypatch):
    """Kept graphs and a vmapped block share the budget: a budget that keeps every graph beside
    one product's working memory leaves a block fewer vectors than the same budget without kept
    graphs would (Plan.width with ``kept``); the same matrix."""
    p = make_problem("mlp", mode="eval")
    H = dense_hessian(p.loss_fn, p.model, p.batches)
    whole = HessianOperator(p.loss_fn, p.model, p.batches, memory_budget=math.inf)
    whole @ probes(whole.dim)
    g, sizes = whole.graphs.graph_bytes, whole.batch_sizes
    budget = 2 * (sum(g) + PRODUCT_FACTOR * largest_graph(g, sizes))  # all kept, 2 vectors fit
    op = HessianOperator(p.loss_fn, p.model, p.batches, hvp="cached", memory_budget=budget)
    V = torch.randn(op.dim, COLUMNS, generator=torch.Generator().manual_seed(1), dtype=H.dtype)
    op @ V[:, :1]
    assert op.plan.piece == 0 and op.graphs.cut == 3 and op.graphs.held == sum(g)
    n = max(sizes)
    narrow, wide = op.plan.width(n, op.graphs.held), op.plan.width(n)
    assert 1 <= narrow < wide < COLUMNS, (narrow, wide)
    calls = recorded(monkeypatch)
    assert rel(op @ V, H @ V) < 1e-10
    assert calls == [("graph", -1, narrow)]  # one backward through the kept graphs
    assert Plan(0, 1.0, 1.0, 100.0, "", 0, 0.01).width(10, kept=50.0) == 2  # (0.5/0.1 - 1)/2
    assert Plan(0, 1.0, 1.0, 100.0, "", 0, 0.01).width(10) == 4  # (1/0.1 - 1)/2


def test_blocks_keep_the_pieces_when_smaller_ones_fail_the_check(monkeypatch):
    """A loss that refuses fewer than 3 samples: blocks cannot take pieces of 1 sample, so they
    run on the whole batches, as few vectors at a time as the budget needs, without a warning
    (single products fit)."""
    p = make_problem("mlp", mode="eval")

    def loss_fn(batch):
        if len(batch[1]) < 3:
            raise RuntimeError("needs 3 samples")
        return p.loss_fn(batch)

    H = dense_hessian(p.loss_fn, p.model, p.batches)
    whole = HessianOperator(loss_fn, p.model, p.batches, memory_budget=1e12)
    whole @ probes(whole.dim)
    op = HessianOperator(
        loss_fn, p.model, p.batches, hvp="func", memory_budget=5.6 * whole.plan.graph_bytes
    )
    V = probes(op.dim)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op @ V[:, :1]
    assert not [w for w in caught if "Hessian-vector products on" in str(w.message)]
    assert op.plan.piece == 0 and op.plan.block_piece == 0 and op.plan.reason == ""
    calls = recorded(monkeypatch)
    assert rel(op @ V, H @ V) < 1e-10
    assert [op.plan.width(n) for n in (7, 5, 3)] == [1, 2, 4]  # 1 + 2k graphs of n samples fit
    assert sorted(calls) == sorted([("func", 7, 1)] * 3 + [
        ("func", 5, 2), ("func", 5, 1), ("func", 3, 3)
    ])  # fmt: skip


def test_default_probe_block_fits_the_budget():
    """Trace probes per call: as many as fit the operator's budget at 3 P numbers each, at most
    8; the probes are the same whatever the block."""
    p = make_problem("mlp", mode="eval")
    op = HessianOperator(p.loss_fn, p.model, p.batches, memory_budget=1.0)
    op @ probes(op.dim)
    assert default_probe_block(op) == 1
    op = HessianOperator(p.loss_fn, p.model, p.batches, memory_budget=3 * op.dim * 8 * 2.5)
    op @ probes(op.dim)
    assert default_probe_block(op) == 2
    op = HessianOperator(p.loss_fn, p.model, p.batches)  # default budget: at least 16 MiB
    op @ probes(op.dim)
    assert default_probe_block(op) == COLUMNS
    one, eight = (
        deflated_hutchinson(op, None, 12, torch.Generator().manual_seed(4), block=b) for b in (1, 8)
    )
    assert one[0] == pytest.approx(eight[0], rel=1e-12) and one[2] == eight[2] == 12


def _narrow_budget(model, batches) -> float:
    """A budget a single product fits on the first batch, but not 8 vectors at once."""
    from lightning_landscape.curvature import pieces

    loss, params = make_loss(model), list(model.parameters())
    graph = pieces._estimate(loss, params, batches[0], len(batches[0][0]), lambda b: len(b[0]))[0]
    return 6 * graph


def test_graph_blocks_above_5000_parameters_on_cpu_keep_the_single_products_pieces(monkeypatch):
    """On CPU above 5,000 parameters a block goes through each gradient graph a column at a
    time, so it needs no more memory than a single product: it runs on the same pieces (one
    graph built per piece for the whole block), not on the smaller pieces a vmapped block of 8
    needs (2.7x slower on a ResNet of 0.7M parameters); the same products."""
    model = torch.nn.Sequential(
        torch.nn.Linear(100, 60), torch.nn.Tanh(), torch.nn.Linear(60, 3)
    ).double()
    batches = make_batches((100,), sizes=(16, 12))
    budget = _narrow_budget(model, batches)
    op = HessianOperator(make_loss(model), model, batches, hvp="double_backward",
                         memory_budget=budget)  # fmt: skip
    V = torch.randn(
        op.dim, COLUMNS, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    single = torch.stack([op @ V[:, j] for j in range(COLUMNS)], 1)
    assert op.dim > 5000 and 0 < op.plan.block_piece < max(op.batch_sizes), op.plan
    calls = recorded(monkeypatch)
    block = op @ V
    assert calls == [("graph", -1, 1)] * len(op.batches)  # one graph per piece, not per part
    torch.testing.assert_close(block, single, rtol=1e-10, atol=1e-12)


def test_func_blocks_in_parts_replay_the_same_dropout_masks():
    """Dropout fails the decomposition check (whole batches), and blocks narrower than 8 run the
    "func" kind in several forwards per batch: each must draw the masks a single product draws."""
    from ._problems import make_mlp

    model = make_mlp(dropout=0.3).train()
    batches = make_batches((4,), sizes=(64, 32))
    budget = _narrow_budget(model, batches)
    V = torch.randn(8, 51, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for kind in ("double_backward", "func"):
        op = HessianOperator(make_loss(model), model, batches, hvp=kind, memory_budget=budget)
        block = op.matmat(V.T).T
        assert op.plan.block_piece == 0 and op.plan.width(64) < COLUMNS
        single = torch.stack([op @ v for v in V])
        torch.testing.assert_close(block, single, rtol=1e-10, atol=1e-12)


def _uneven_ranks(rank: int, tmp: str) -> None:
    import datetime

    import torch.distributed as dist

    from ._problems import make_mlp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # fmt: skip
    try:
        model = make_mlp(dropout=0.0).eval()
        batches = make_batches((4,), sizes=((8, 64), (8, 8))[rank])
        budget = 40 * _narrow_budget(model, batches[:1]) / 6  # blocks need pieces on rank 0 only
        op = HessianOperator(make_loss(model), model, batches, memory_budget=budget)
        V = torch.randn(8, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        torch.save((op.matmat(V.T), op.plan.block_piece), f"{tmp}/rank{rank}.pt")
    finally:
        end_process_group()


@pytest.mark.distributed
def test_block_pieces_are_decided_alike_on_ranks_with_uneven_batches(tmp_path):
    """Rank 0's largest batch needs block pieces, rank 1's does not: both must still run the
    same collectives (a mismatch aborted gloo) and agree with the whole batches."""
    import torch.multiprocessing as mp

    from ._problems import make_mlp

    mp.spawn(_uneven_ranks, args=(str(tmp_path),), nprocs=2, join=True)
    (out0, block0), (out1, block1) = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert block0 == block1 > 0
    torch.testing.assert_close(out0, out1)
    model = make_mlp(dropout=0.0).eval()
    union = make_batches((4,), sizes=(8, 64)) + make_batches((4,), sizes=(8, 8))
    op = HessianOperator(make_loss(model), model, union, micro_batch_size=None)
    V = torch.randn(8, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out0, op.matmat(V.T), rtol=1e-10, atol=1e-12)


def test_decomposition_is_checked_on_the_parts_products_use():
    """Blocks cut the pieces again: the check cuts a batch of 7 into pieces of at most 3 (2, 2,
    3) and those into parts of at most 2 (2, 2, 1, 2), not the batch straight into parts of 2
    (1, 2, 2, 2)."""
    from lightning_landscape.curvature.pieces import _decomposition_gap, pieces_of

    p = make_problem("mlp", mode="eval")
    seen: list[int] = []

    def loss_fn(batch):
        seen.append(len(batch[1]))
        return p.loss_fn(batch)

    batch = p.batches[2]  # 7 samples
    assert _decomposition_gap(loss_fn, batch, 7, 3, len_of, 2) < 1e-12
    assert seen == [7, 2, 2, 1, 2]
    assert [k for k, _ in pieces_of(batch, 7, 2, len_of)] == [1, 2, 2, 2]
    assert pieces_of(batch, 7, 0, len_of) == [(7, batch)]


def len_of(batch) -> int:
    return len(batch[1])


def test_the_largest_batch_fits_the_budget_not_only_the_first():
    """The graph is measured on the first batch and scaled by samples: a later batch 4 times as
    large is cut so that its products fit too (the first alone would fit whole)."""
    p = make_problem("mlp", mode="eval")
    batches = make_batches((4,), sizes=(2, 8))
    first = HessianOperator(p.loss_fn, p.model, batches[:1], memory_budget=1e12)
    first @ probes(first.dim)
    budget = 4 * first.plan.graph_bytes  # a product on 2 samples takes 3/4 of it, on 8 three
    op = HessianOperator(p.loss_fn, p.model, batches, memory_budget=budget)
    H = dense_hessian(p.loss_fn, p.model, batches)
    V = probes(op.dim)
    assert rel(op @ V, H @ V) < 1e-10
    assert op.plan.piece == 2 and op.batch_sizes == [2, 2, 2, 2, 2]
