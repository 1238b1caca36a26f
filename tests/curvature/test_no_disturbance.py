"""Nothing is disturbed: parameters, .grad, buffers, train/eval flags, the global RNG, and no
autograd graph outlives a call (BatchNorm + Dropout CNN, train and eval mode, every kind)."""

from __future__ import annotations

import gc
import math
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F

from lightning_landscape.curvature import (
    HessianOperator,
    analyze,
    spectral_density,
    top_eigenvalues,
    trace,
)

from ._problems import make_batches, make_cnn

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


class _Saved:
    """What a graph saves for backward, wrapped so that a weak reference tells if it lives.

    It keeps a detached tensor (autograd reattaches the saved edge on unpack): keeping the
    saved output itself would make a cycle output → grad_fn → saved → output that the graph
    cannot free, a leak of the test and not of the engine."""

    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t.detach()


def _state(model):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "param_ids": [id(p) for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "buffer_ids": [id(b) for b in model.buffers()],
        "buffer_versions": [b._version for b in model.buffers()],
        "flags": [(m.training, getattr(m, "track_running_stats", None)) for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def _assert_same(model, before):
    after = _state(model)
    assert after["param_ids"] == before["param_ids"]
    assert all(torch.equal(a, b) for a, b in zip(after["params"], before["params"], strict=True))
    assert after["buffer_ids"] == before["buffer_ids"]  # the very same tensors...
    assert after["buffer_versions"] == before["buffer_versions"]  # ...never written to
    assert all(torch.equal(a, b) for a, b in zip(after["buffers"], before["buffers"], strict=True))
    assert after["flags"] == before["flags"]
    assert torch.equal(after["rng"], before["rng"])


def _tensor_count() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated reduce_op
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("kind", ["double_backward", "cached", "func"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_nothing_disturbed(mode, kind):
    model = make_cnn()
    model.train(mode == "train")
    model(make_batches((1, 6, 6))[0][0])  # real running statistics, num_batches_tracked = 1
    batches = make_batches((1, 6, 6))
    params = list(model.parameters())
    params[0].grad = torch.randn_like(params[0])  # an existing .grad stays as it is
    grad_object, grad_value = params[0].grad, params[0].grad.clone()
    saved: list[weakref.ref] = []
    hooks = kind != "func"  # torch.func transforms do not run saved-tensor hooks

    def pack(t):
        holder = _Saved(t)
        saved.append(weakref.ref(holder))
        return holder

    def loss_fn(batch):
        if not hooks:
            return F.cross_entropy(model(batch[0]), batch[1])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t):
            return F.cross_entropy(model(batch[0]), batch[1])

    before = _state(model)
    budget = math.inf if kind == "cached" else None  # cache every batch's graph
    op = HessianOperator(loss_fn, model, batches, hvp=kind, memory_budget=budget)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    op @ v
    top_eigenvalues(op, 2, max_matvecs=8)  # seed=None: a fresh seed that is not torch's RNG
    top_eigenvalues(op, which="smallest", max_matvecs=8, seed=0)
    trace(op, num_matvecs=9, seed=0)
    trace(op, num_matvecs=9, method="hutch++", seed=0)
    spectral_density(op, num_probes=2, num_steps=3, seed=0)
    analyze(op, smallest=True, trace=True, trace_probes=3, density=True, density_steps=4,
            max_steps=6, seed=0)  # fmt: skip
    op.gradient()
    _assert_same(model, before)
    assert params[0].grad is grad_object and torch.equal(params[0].grad, grad_value)
    assert all(p.grad is None for p in params[1:])

    if hooks:
        gc.collect()
        alive = sum(r() is not None for r in saved)
        assert alive == 0 if kind != "cached" else alive > 0  # cached keeps its graphs...
        op.release()  # ...until released
        gc.collect()
        assert saved and all(r() is None for r in saved)

    # memory stays flat over many calls: no tensor (graph, cache, closure) accumulates
    op @ v
    count = _tensor_count()
    for _ in range(50):
        op @ v
    assert _tensor_count() == count
    del op
    _assert_same(model, before)


def test_a_buffer_shared_by_two_modules_is_one_tensor_inside_the_products():
    """The products' copies of the buffers were made slot by slot: a buffer two modules share
    became two, and a forward that updates it through one module no longer moved the other's
    (a loss of 1.5686 inside the products against 1.7096 outside, on the reviewer's model)."""
    from lightning_landscape.curvature.hvp import guard

    a, b = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    b.running_mean = a.running_mean  # shared
    holder = torch.nn.Sequential(a, b)
    with guard(holder, [], seed=0):
        assert holder[0].running_mean is holder[1].running_mean
        inside = holder[0].running_mean
    assert holder[0].running_mean is holder[1].running_mean is not inside
