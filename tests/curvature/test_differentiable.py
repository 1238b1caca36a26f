"""The checks that a gradient graph can be differentiated again."""

from __future__ import annotations

import functools

import pytest
import torch

from lightning_landscape.curvature import GGNOperator, HessianOperator, dense_hessian
from lightning_landscape.curvature.differentiable import (
    check_twice_differentiable,
    checked_gradient,
)

from ._problems import FusedCrossEntropy, OnceDifferentiableTanh, OutsideAutogradTanh


def test_once_differentiable_backward_is_refused_not_silently_wrong():
    """A second backward towards the parameters would skip the error node of a
    ``@once_differentiable`` backward and drop its second-order terms without a word."""
    w = torch.randn(3, requires_grad=True, dtype=torch.float64)
    x = torch.randn(3, dtype=torch.float64)
    (g,) = torch.autograd.grad(
        OnceDifferentiableTanh.apply(w * x).sum() ** 2, [w], create_graph=True
    )
    with pytest.raises(RuntimeError, match="once_differentiable"):
        check_twice_differentiable(g)
    (g,) = torch.autograd.grad(torch.tanh(w * x).sum() ** 2, [w], create_graph=True)
    check_twice_differentiable(g)  # a plain graph passes
    for kind in ("cached", "double_backward"):
        op = HessianOperator(
            lambda b: OnceDifferentiableTanh.apply(w * b).sum() ** 2, [w], [x[None]], hvp=kind
        )
        with pytest.raises(RuntimeError, match="once_differentiable"):
            op @ torch.ones(3, dtype=torch.float64)


class ReversedGradient(torch.autograd.Function):
    """Gradient reversal (domain-adversarial training): a backward in plain operations."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -0.5 * g


class Rounded(torch.autograd.Function):
    """A rounding whose gradient is zero: nothing to differentiate again."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g)


@pytest.mark.parametrize("where", ["inside", "loss"])
def test_a_backward_outside_autograd_is_refused_not_silently_wrong(where):
    """A custom Function whose backward runs outside autograd (a CUDA or Triton kernel's): a
    double backward drops its second-order terms without a word. Inside the model the
    "Hessian" was asymmetric (the trial warned, the values stayed); a fused loss at the end
    loses the whole Gauss-Newton term and stays symmetric: 37 % off with no warning at all.
    Both are refused now, the oracle raises, and "auto" takes finite differences, exact to the
    differentiable twin. Functions whose backward is plain operations pass."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    batches = [(x, y)]
    first, _, last = model

    def twin(b, outside=False, extra=lambda h: h):
        h = (OutsideAutogradTanh.apply if outside and where == "inside" else torch.tanh)(
            first(b[0])
        )
        logits = last(extra(h))
        if outside and where == "loss":
            return FusedCrossEntropy.apply(logits, b[1])
        return torch.nn.functional.cross_entropy(logits, b[1])

    fused = functools.partial(twin, outside=True)
    with pytest.raises(RuntimeError, match="returns gradients outside autograd"):
        checked_gradient(fused(batches[0]), list(model.parameters()))
    with pytest.raises(RuntimeError, match="outside autograd"):
        dense_hessian(fused, model, batches)
    for kind in ("cached", "double_backward"):
        with pytest.raises(RuntimeError, match="outside autograd"):
            HessianOperator(fused, model, batches, hvp=kind) @ torch.ones(51, dtype=torch.float64)
    H = dense_hessian(twin, model, batches)
    op = HessianOperator(fused, model, batches, hvp="auto")
    op.warn = lambda kind, message: None
    v = torch.randn(51, dtype=torch.float64)
    assert op.hvp_choice is None and torch.allclose(op @ v, H @ v, rtol=1e-8, atol=1e-10)
    assert op.hvp_choice == "finite_difference"
    for plain in (ReversedGradient.apply, lambda h: h + Rounded.apply(h)):
        loss = twin(batches[0], extra=plain)
        checked_gradient(loss, list(model.parameters()))  # passes


@pytest.mark.parametrize("kernel", [OnceDifferentiableTanh, OutsideAutogradTanh])
@pytest.mark.parametrize("cache", [True, False])
def test_gauss_newton_products_refuse_such_kernels(kernel, cache):
    """J v by the transpose trick differentiates Jᵀu again: through a backward outside
    autograd its terms were silently dropped (the GGN 100 % off along them)."""
    torch.manual_seed(0)
    first, last = torch.nn.Linear(4, 6).double(), torch.nn.Linear(6, 3).double()
    model = torch.nn.Sequential(first, last)
    batches = [(torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,)))]
    G = GGNOperator(lambda b: (last(kernel.apply(first(b[0]))), b[1]), model, batches, cache=cache)
    with pytest.raises(RuntimeError, match="once_differentiable|outside autograd"):
        G @ torch.ones(G.dim, dtype=torch.float64)
    plain = GGNOperator(lambda b: (last(torch.tanh(first(b[0]))), b[1]), model, batches)
    plain @ torch.ones(G.dim, dtype=torch.float64)  # passes
