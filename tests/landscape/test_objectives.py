"""BatchObjective on a model with dropout in train mode: one fixed function (values, gradients and
Hessian products with the same masks), the global RNG untouched."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_landscape._core.random import make_generator
from lightning_landscape._core.vectors import ParamVector
from lightning_landscape.landscape.sharpness import BatchObjective, sam_sharpness

D = torch.float64


def _dropout_objective():
    """A float64 3-6-1 tanh MLP with Dropout(0.3) in train mode, MSE on two batches (5 and 3
    samples), and its :class:`BatchObjective` (default seed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 1))
    model = model.double().train()
    batches = [(torch.randn(n, 3, dtype=D), torch.randn(n, 1, dtype=D)) for n in (5, 3)]

    def loss_fn(batch):
        return F.mse_loss(model(batch[0]), batch[1])

    return model, BatchObjective(loss_fn, ParamVector(list(model.parameters())), batches)


def _direction(w, seed=1):
    v = torch.randn(w.shape, generator=make_generator(seed), dtype=D)
    return v / v.norm()


def test_value_is_one_function_and_the_global_rng_untouched():
    model, obj = _dropout_objective()
    w = obj.params.get()
    state = torch.get_rng_state()
    first = obj.value(w)
    assert obj.value(w) == first
    assert obj.value_and_grad(w)[0] == first
    assert torch.equal(obj.value_and_grad(w)[1], obj.value_and_grad(w)[1])
    assert torch.equal(torch.get_rng_state(), state)
    model.eval()  # dropout is really on: without it the value differs
    assert obj.value(w) != first
    model.train()
    obj.seed = 4  # another seed, other masks
    assert obj.value(w) != first


def test_gradient_and_hessian_are_those_of_the_values():
    _, obj = _dropout_objective()
    w = obj.params.get()
    v, h = _direction(w), 1e-5
    _, grad = obj.value_and_grad(w)
    slope = (obj.value(w + h * v) - obj.value(w - h * v)) / (2 * h)
    assert slope == pytest.approx(float(grad @ v), abs=1e-6)
    # the Hessian products replay the masks of the values: H v is the difference of gradients
    diff = (obj.value_and_grad(w + h * v)[1] - obj.value_and_grad(w - h * v)[1]) / (2 * h)
    with obj.hessian_at(w) as op:
        hv = op @ v
    assert torch.allclose(hv, diff, atol=1e-6)


def test_sam_of_a_fixed_function_is_at_least_its_first_order_point():
    _, obj = _dropout_objective()
    w = obj.params.get()
    loss0, grad = obj.value_and_grad(w)
    for rho in (1e-3, 0.05, 0.2):
        res = sam_sharpness(obj, w, rho, steps=6)
        assert res.loss == loss0
        assert res.sharpness >= 0
        # the maximum over the ball is at least the value at SAM's first-order point
        assert res.perturbed_loss >= obj.value(w + rho * grad / grad.norm()) - 1e-12
    # a small ball: ρ‖g‖ to first order
    small = sam_sharpness(obj, w, 1e-4, steps=6)
    assert small.sharpness == pytest.approx(1e-4 * float(grad.norm()), rel=1e-2)
