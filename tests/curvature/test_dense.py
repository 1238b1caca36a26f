"""The dense oracle against closed forms."""

from __future__ import annotations

import pytest
import torch

from lightning_landscape.curvature import dense_hessian

from ._problems import OnceDifferentiableTanh, make_mlp

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def test_linear_least_squares_closed_form():
    """loss = mean squared residual of Xw − y over unequal batches: H = (2/N) XᵀX."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(23, 5, generator=g, dtype=torch.float64)
    y = torch.randn(23, generator=g, dtype=torch.float64)
    w = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    batches = [(X[:4], y[:4]), (X[4:15], y[4:15]), (X[15:], y[15:])]

    def loss_fn(batch):
        xb, yb = batch
        return ((xb @ w - yb) ** 2).mean()

    H = dense_hessian(loss_fn, [w], batches)
    closed = 2.0 / X.shape[0] * X.T @ X
    assert torch.allclose(H, closed, rtol=1e-12, atol=1e-14)


def test_matches_torch_func_hessian(flat_loss):
    """One batch: the oracle equals torch.func.hessian of the loss in the flat parameters."""
    model = make_mlp(dropout=0.0).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    f, flat0 = flat_loss(model, x, lambda out: torch.nn.functional.cross_entropy(out, y))
    ref = torch.func.hessian(f)(flat0)
    H = dense_hessian(
        lambda b: torch.nn.functional.cross_entropy(model(b[0]), b[1]), model, [(x, y)]
    )
    assert torch.allclose(H, ref, rtol=1e-10, atol=1e-13)


def test_raises_on_bad_params():
    with pytest.raises(TypeError, match="`params` must be an nn.Module"):
        dense_hessian(lambda b: b, 7, [1])
    with pytest.raises(ValueError, match="does not require grad"):
        dense_hessian(lambda b: b, [torch.ones(2)], [1])
    with pytest.raises(ValueError, match="`batches` is empty"):  # a NaN matrix before
        dense_hessian(lambda b: b, [torch.ones(2, requires_grad=True)], [])


def test_refuses_a_once_differentiable_backward():
    """Autograd returns no second derivative through a ``@once_differentiable`` backward
    (torch 2.13, without an error): the oracle's rows through it were silently zero (1.1 %
    off the top eigenvalue of a small MLP). It raises instead."""
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dense_hessian(lambda b: OnceDifferentiableTanh.apply(b @ w).sum() ** 2, [w], [x])


def test_a_fractional_batch_size_is_refused():
    """2.5 was truncated to 2: the batch weighed less than its samples, silently."""
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="`batch_size_fn` gave batch 0 the size 2.5"):
        dense_hessian(lambda b: (b @ w).pow(2).mean(), [w], [x], batch_size_fn=lambda b: 2.5)
    H = dense_hessian(lambda b: (b @ w).pow(2).mean(), [w], [x], batch_size_fn=lambda b: 4.0)
    torch.testing.assert_close(H, 2 * x.T @ x / 4)
