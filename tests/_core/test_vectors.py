"""Parameters and flat vectors: which tensors count, flat round trips, bit-exact restore."""

import re

import pytest
import torch
from torch import nn

from lightning_landscape._core.vectors import ParamVector, flatten, resolve_params, unflatten


def _net():
    torch.manual_seed(0)
    f64 = {"dtype": torch.float64}
    net = nn.Sequential(nn.Linear(3, 4, **f64), nn.Tanh(), nn.Linear(4, 2, **f64))
    net[0].bias.requires_grad_(False)
    net.scale = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))  # 0-d, listed first
    return net


def test_resolve_params_takes_the_trainable_parameters_in_order():
    net = _net()
    got = resolve_params(net)
    trainable = [net.scale, net[0].weight, net[2].weight, net[2].bias]
    assert [id(p) for p in got] == [id(p) for p in trainable]

    tensors = [torch.zeros(2, requires_grad=True), torch.ones(3, 1, requires_grad=True)]
    for given in (tensors, tuple(tensors), iter(tensors)):
        assert [id(p) for p in resolve_params(given)] == [id(t) for t in tensors]


def test_resolve_params_refusals():
    trainable = torch.zeros(2, requires_grad=True)
    frozen = nn.Linear(2, 1).requires_grad_(False)
    cases = [
        (trainable, TypeError, "got a single Tensor; wrap it in a list."),
        (3, TypeError, "`params` must be an nn.Module or a sequence of tensors, got int."),
        ([trainable, 1.0], TypeError, "`params[1]` must be a torch.Tensor, got float."),
        ([trainable, torch.zeros(2)], ValueError, "`params[1]` does not require grad."),
        ([], ValueError, "`params` holds no trainable tensor."),
        (frozen, ValueError, "`params` holds no trainable tensor."),
        (
            [trainable, torch.zeros(2, 3, dtype=torch.cfloat, requires_grad=True)],
            TypeError,
            "`params[1]` is complex (torch.complex64, shape (2, 3)): the curvature and landscape "
            "estimators take real parameters only",
        ),
    ]
    for params, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            resolve_params(params)
    with pytest.raises(TypeError, match=re.escape("`params[0]` is complex")):
        ParamVector([torch.zeros(2, dtype=torch.cdouble)])


def test_flatten_unflatten_round_trip_with_views_and_a_leading_batch():
    like = [torch.zeros(2, 3), torch.zeros(()), torch.zeros(4, 1, 2)]
    dim = sum(t.numel() for t in like)
    vec = torch.arange(dim, dtype=torch.float64)

    parts = unflatten(vec, like)
    assert [p.shape for p in parts] == [t.shape for t in like]
    assert torch.equal(flatten(parts), vec)
    parts[1].fill_(-1.0)  # views, not copies
    assert vec[6] == -1.0

    batch = torch.stack([vec, 2 * vec, 3 * vec])  # (k, d)
    rows = unflatten(batch, like)
    assert [r.shape for r in rows] == [(3, *t.shape) for t in like]
    for i in range(3):
        assert torch.equal(flatten([r[i] for r in rows]), batch[i])


def test_param_vector_get_and_set():
    net = _net()
    params = resolve_params(net)
    pv = ParamVector(params)
    assert pv.dim == 1 + 4 * 3 + 2 * 4 + 2
    assert (pv.dtype, pv.device) == (torch.float64, torch.device("cpu"))

    before = pv.get()
    assert torch.equal(before, flatten([p.detach() for p in params]))
    before += 1.0  # a copy: the parameters do not move
    assert not torch.equal(before, pv.get())

    target = torch.linspace(-1, 1, pv.dim, dtype=torch.float32)  # cast to the parameters' dtype
    pv.set_(target)
    assert torch.equal(pv.get(), target.double())
    assert all(p.requires_grad and p.grad is None for p in params)


def test_moved_to_restores_bit_for_bit_even_on_error():
    pv = ParamVector(resolve_params(_net()))
    saved = pv.get()
    delta = torch.full((pv.dim,), 1e8 / 3, dtype=torch.float64)
    assert not torch.equal(saved + delta - delta, saved)  # undoing by subtraction would not do

    with pv.moved_to(saved + delta):
        assert torch.equal(pv.get(), saved + delta)
    assert torch.equal(pv.get().view(torch.int64), saved.view(torch.int64))

    with pytest.raises(RuntimeError, match="inside"), pv.moved_to(saved + delta):
        raise RuntimeError("inside")
    assert torch.equal(pv.get().view(torch.int64), saved.view(torch.int64))
