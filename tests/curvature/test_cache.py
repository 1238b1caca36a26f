"""Cached gradient graphs within a memory budget: the same products whatever is cached, the
memory measured from what autograd saves, and backwards that cannot be differentiated twice."""

from __future__ import annotations

import functools
import gc
import math
import weakref

import pytest
import torch

from lightning_landscape.curvature import HessianOperator, cache, dense_hessian
from lightning_landscape.curvature import hvp as hvp_module
from lightning_landscape.curvature.cache import SavedBytes

from ._problems import live_storages, make_batches, make_problem


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@functools.cache
def _dense(arch: str) -> torch.Tensor:
    p = make_problem(arch, mode="train")
    return dense_hessian(p.loss_fn, p.model, p.batches)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_budget_switches_cached_and_batch_by_batch_with_identical_products(arch):
    """The budget holds the kept graphs and one product's working memory (PRODUCT_FACTOR graphs
    of the largest batch): budgets 0 / T1 - 1 / T1 / T2 / T3 / inf cache 0 / 0 / 1 / 2 / 3 / 3
    batches, Tc being the first c graphs plus that working memory. In train mode with Dropout
    and BatchNorm the uncached batches replay the masks they draw in sequence, so every budget
    gives the same matrix as the dense oracle."""
    H = _dense(arch)
    p = make_problem(arch, mode="train")
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probe = HessianOperator(p.loss_fn, p.model, p.batches, memory_budget=math.inf)
    reference = probe @ V
    g, sizes = probe.graphs.graph_bytes, probe.batch_sizes
    assert probe.graphs.cut == 3 and probe.graphs.cached_bytes == sum(g) > 0
    T = [sum(g[:c]) + cache.PRODUCT_FACTOR * cache.largest_graph(g[:c], sizes) for c in (1, 2, 3)]
    assert T[0] < T[1] < T[2]
    cases = ((0, 0), (T[0] - 1, 0), (T[0], 1), (T[1], 2), (T[2], 3), (math.inf, 3))
    for budget, cut in cases:
        op = HessianOperator(p.loss_fn, p.model, p.batches, memory_budget=budget)
        out = op @ V
        assert op.graphs.cut == cut, (budget, cut, op.graphs.cut)
        assert rel(out, H @ V) < 1e-10
        assert rel(out, reference) < 1e-12
        assert rel(op @ V[:, 0], H @ V[:, 0]) < 1e-10  # again, from the kept graphs
        op.release()


def test_working_memory_is_reserved_for_the_largest_batch():
    """The largest graph is estimated from those measured: the largest measured, or the most
    bytes per sample times the largest batch."""
    assert cache.largest_graph([100], (5, 3, 7)) == pytest.approx(140)
    assert cache.largest_graph([100, 90], (5, 3, 7)) == pytest.approx(210)
    assert cache.largest_graph([100, 30, 150], (5, 3, 7)) == pytest.approx(150)
    assert cache.fits(100, 140, 100 + 3 * 140) and not cache.fits(101, 140, 100 + 3 * 140)


def test_default_budget_is_one_training_step(monkeypatch):
    """``None``: the first batch's saved forward activations plus 2 P numbers (and at least
    ``FLOOR``, set to 0 here so that the step itself decides on this tiny model)."""
    monkeypatch.setattr(cache, "FLOOR", 0)
    p = make_problem("cnn", mode="train")
    op = HessianOperator(p.loss_fn, p.model, p.batches)
    op @ torch.ones(op.dim, dtype=torch.float64)
    g = op.graphs
    two_p = 2 * op.dim * 8
    assert g.budget == g.step_bytes > two_p
    assert g.cached_bytes <= g.budget < sum(g.graph_bytes)  # not every graph fits
    with SavedBytes(exclude=op.params) as counter:
        p.loss_fn(p.batches[0])
    assert g.step_bytes == counter.bytes + two_p


def test_default_budget_on_a_gpu_takes_a_share_of_its_free_memory(monkeypatch):
    """On a CUDA device the default budget is at least ``DEVICE_SHARE`` of what the device can
    still give (pieces smaller than a batch leave a GPU idle); the device passed is the
    parameters'. A device with little free memory keeps the training step's budget; an explicit
    budget is never raised."""
    seen = []
    monkeypatch.setattr(cache, "FLOOR", 0)
    monkeypatch.setattr(cache, "free_device_bytes", lambda device: seen.append(device) or 4e9)
    assert cache.budget_bytes(None, 1e6, torch.device("cpu")) == cache.DEVICE_SHARE * 4e9 == 1e9
    assert cache.budget_bytes(None, 2e9, None) == 2e9  # the step is larger
    assert cache.budget_bytes(5e5, 1e6, None) == 5e5  # explicit: as asked
    p = make_problem("cnn", mode="train")
    op = HessianOperator(p.loss_fn, p.model, p.batches)
    op @ torch.ones(op.dim, dtype=torch.float64)
    assert op.graphs.budget == 1e9 and op.graphs.cut == len(p.batches)  # every graph kept
    assert seen[-1] == op.params[0].device


def test_distributed_ranks_take_the_least_share_of_their_devices(monkeypatch):
    """Under torch.distributed every rank takes the same budget on CUDA: the least free memory
    over the ranks (one all-reduce of its negative: the MAX reduction, no AVG on gloo), so
    ranks keep as many graphs and basis vectors and decide alike. CPU budgets need no
    collective."""
    calls = []

    def other_rank_has_less(t, *a, **k):  # the other rank: 2e9 bytes free, a share of 5e8
        calls.append(float(t[0]))
        return t.copy_(torch.maximum(t, torch.tensor([-5e8], dtype=t.dtype)))

    monkeypatch.setattr(cache, "FLOOR", 0)
    monkeypatch.setattr(cache, "free_device_bytes", lambda device: 4e9)
    monkeypatch.setattr(cache, "all_reduce_max_", other_rank_has_less)
    cuda = torch.device("cuda", 0)
    assert cache.budget_bytes(None, 1e6, cuda, distributed=True) == 5e8
    assert cache.budget_bytes(None, 1e6, cuda, distributed=False) == 1e9
    assert cache.budget_bytes(None, 1e6, torch.device("cpu"), distributed=True) == 1e9
    assert cache.budget_bytes(3e3, 1e6, cuda, distributed=True) == 3e3
    assert calls == [-1e9]  # one collective, only where the device share decides


def test_free_device_bytes_reads_the_driver_and_the_allocator(monkeypatch):
    """Free to the driver plus what PyTorch's allocator holds unused; 0 on CPU, without CUDA, or
    where CUDA cannot say."""
    cuda = torch.device("cuda", 0)
    assert cache.free_device_bytes(torch.device("cpu")) == cache.free_device_bytes(None) == 0.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3e9, 8e9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2e9)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1.5e9)
    assert cache.free_device_bytes(cuda) == 3.5e9

    def broken(device=None):
        raise RuntimeError("no driver")

    monkeypatch.setattr(torch.cuda, "mem_get_info", broken)
    assert cache.free_device_bytes(cuda) == 0.0


def test_default_budget_keeps_every_graph_of_a_small_model():
    """Below ``FLOOR`` (16 MiB) a training step's worth of memory saves nothing that matters:
    every graph is kept, and products are one backward through them."""
    p = make_problem("cnn", mode="train")
    op = HessianOperator(p.loss_fn, p.model, p.batches)
    op @ torch.ones(op.dim, dtype=torch.float64)
    g = op.graphs
    assert g.budget == cache.FLOOR > g.step_bytes and g.cut == len(p.batches)


def test_graphs_built_while_counting_are_freed():
    """Counting saved bytes keeps no graph alive. A pack hook that returned the saved tensor
    itself kept saved outputs with their grad_fn: a cycle through C++ that no gc.collect()
    breaks, so every graph the cache or the plan built leaked with its activations (each
    measurement of a fit, its batches too)."""
    model = torch.nn.Sequential(
        torch.nn.Linear(30, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3)
    ).double()
    params = list(model.parameters())

    def build() -> weakref.ref:
        x = torch.randn(17, 30, dtype=torch.float64)
        with SavedBytes(exclude=params) as counter:
            loss = model(x).pow(2).mean()
            torch.autograd.grad(loss, params, create_graph=True)
        assert counter.bytes > 0
        return weakref.ref(x)

    def measure() -> weakref.ref:
        batches = make_batches((30,), sizes=(9, 8))
        loss = lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
        op = HessianOperator(loss, model, batches, hvp="cached", memory_budget=math.inf)
        op @ torch.ones(op.dim, dtype=torch.float64)
        assert op.graphs.cut == 2
        op.release()
        return weakref.ref(batches[0][0])

    refs = [build(), measure()]
    gc.collect()
    assert [r() is None for r in refs] == [True, True]


def test_a_saved_tensor_modified_in_place_still_raises_while_counting():
    """With saved-tensor hooks autograd skips its version check; the hooks check it instead, so
    Tanh followed by an in-place ReLU raises as it does without them (not a wrong product)."""
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 4, dtype=torch.float64)
    with SavedBytes(exclude=[w]):
        y = torch.tanh(x @ w)  # tanh saves its output
        loss = torch.relu_(y).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, [w], create_graph=True)


def test_saved_bytes_counts_distinct_storages_without_parameters():
    w = torch.randn(5, 5, requires_grad=True)
    x = torch.randn(3, 5)
    with SavedBytes(exclude=[w]) as counter:
        h = torch.tanh(x @ w)  # saves x (w is excluded) and tanh's output
        (h * h).sum()  # saves h twice: one storage
    assert counter.bytes == x.numel() * 4 + h.numel() * 4


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"memory_budget": -1}, ValueError, "`memory_budget` must be a number of bytes"),
        ({"memory_budget": "1GB"}, TypeError, "`memory_budget` must be a number of bytes"),
        ({"memory_budget": math.nan}, ValueError, "`memory_budget` must be a number of bytes"),
        (
            {"block_hvp": "finite_difference"},
            ValueError,
            "`block_hvp` must be None, 'columns' or in",
        ),
        ({"fd_step": 0.0}, ValueError, "`fd_step` must be a positive number"),
        ({"fd_tolerance": -1.0}, ValueError, "`fd_tolerance` must be a positive number"),
        ({"fd_tolerance": "x"}, TypeError, "`fd_tolerance` must be a positive number"),
    ],
)
def test_memory_and_kind_arguments_raise(kwargs, error, match):
    p = make_problem("mlp")
    with pytest.raises(error, match=match):
        HessianOperator(p.loss_fn, p.model, p.batches, **kwargs)


def test_a_block_goes_into_one_accumulator_column_by_column(monkeypatch):
    """On CPU above 5,000 parameters a block goes through the graphs one column at a time. Each
    column's product is added into the block's accumulator as it comes: no column's product
    outlives its backward (all k of them were kept, then concatenated: 2 blocks of P numbers
    beside the accumulator; 85 MiB a block of 8 on a 2.8M-parameter ResNet). Cached and uncached
    batches alike, and the block equals the dense Hessian's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 150), torch.nn.Tanh(), torch.nn.Linear(150, 3))
    model = model.double()
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(6, 40, generator=g, dtype=torch.float64),
            torch.randn(6, 3, generator=g, dtype=torch.float64),
        )
        for _ in range(3)
    ]

    def loss_fn(batch):
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    op = HessianOperator(loss_fn, model, batches, hvp="cached", micro_batch_size=None)
    op @ torch.zeros(op.dim, 1, dtype=torch.float64)  # plans and caches
    kept = op.graphs
    # one batch cached, two per product
    kept.requested_budget = (
        kept.graph_bytes[0] + cache.PRODUCT_FACTOR * max(kept.graph_bytes) * 1.01
    )
    op.release()
    assert op.dim > 5000
    vector = op.dim * 8
    alive = []
    original = hvp_module.hvp_from_graph

    def watched(grad, params, Vt, *args, **kwargs):
        # other storages of one vector than the flat gradients (this graph's, the cached one's)
        storages = live_storages(vector)
        gradients = {grad.untyped_storage().data_ptr(), op.graphs.grad.untyped_storage().data_ptr()}
        alive.append(len(storages - gradients))
        return original(grad, params, Vt, *args, **kwargs)

    V = torch.randn(op.dim, 6, generator=g, dtype=torch.float64)
    before = len(live_storages(vector))  # vectors other tests left alive
    monkeypatch.setattr(hvp_module, "hvp_from_graph", watched)
    HV = op @ V
    assert op.graphs.cut == 1 and len(alive) == 3 * 6  # 6 columns through 3 graphs
    assert max(alive) == before, (before, alive)  # were 1, 2, ..., 5 more per graph
    H = dense_hessian(loss_fn, model, batches)
    assert torch.allclose(HV, H @ V, atol=1e-10)
