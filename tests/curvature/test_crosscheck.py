"""Finite differences against a gradient that is not the gradient of a scalar (stop-gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_landscape.curvature import HessianOperator, dense_hessian

from ._problems import FusedCrossEntropy, MeanOfLosses, OnceDifferentiableTanh


def _simsiam(reduce=None, act=torch.tanh):
    """SimSiam's symmetric loss: a shared encoder, a predictor, and a stop-gradient on the
    target branch. Autograd's Hessian holds the detached embeddings fixed (symmetric); the
    Jacobian of the gradient, which finite differences see, does not (53 % asymmetric here)."""
    torch.manual_seed(0)
    first, last = torch.nn.Linear(6, 8).double(), torch.nn.Linear(8, 4).double()
    pred = torch.nn.Linear(4, 4).double()
    model = torch.nn.ModuleList([first, last, pred])
    x = torch.randn(16, 6, dtype=torch.float64)
    batches = [(x, x + 0.1 * torch.randn(16, 6, dtype=torch.float64))]

    def loss(b):
        z1, z2 = (last(act(first(v))) for v in b)
        p1, p2 = pred(z1), pred(z2)
        per = -F.cosine_similarity(p1, z2.detach(), dim=-1) - F.cosine_similarity(
            p2, z1.detach(), dim=-1
        )
        return 0.5 * (reduce(per) if reduce else per.mean())

    return model, batches, loss


def test_a_custom_function_in_a_stop_gradient_loss_keeps_the_exact_kind():
    """Exact products differ from finite differences there whatever the Function does (42 %
    here), which read as a Function dropping terms: the products became finite differences,
    the Jacobian of the update field, asymmetric, under Lanczos. Finite differences are now
    checked for symmetry first: the exact kind stays (autograd's Hessian, as every exact tool
    reports it), with a warning that says why it is unchecked."""
    model, batches, loss = _simsiam(MeanOfLosses.apply)
    twin, same, plain = _simsiam()  # the same weights and batches, reduced by a plain mean
    H = dense_hessian(plain, twin, same)
    assert float((H - H.T).norm()) < 1e-12 * float(H.norm())
    said = []
    op = HessianOperator(loss, model, batches, hvp="auto")
    op.warn = lambda kind, message: said.append((kind, message))
    v = torch.randn(op.dim, dtype=torch.float64)
    assert torch.allclose(op @ v, H @ v, rtol=1e-10, atol=1e-12)
    assert op.exact and [k for k, _ in said] == ["unverified"]
    assert "stop-gradient" in said[0][1] and "MeanOfLossesBackward" in said[0][1]


@pytest.mark.parametrize("stop", [True, False])
def test_a_fallback_to_finite_differences_says_when_they_see_an_asymmetric_jacobian(stop):
    """Where no exact kind works, finite differences are all there is: their warning now says
    when the gradient is not a scalar's (their Lanczos values are then no Hessian's
    eigenvalues), and only then."""
    model, batches, loss = _simsiam(act=OnceDifferentiableTanh.apply)
    if not stop:  # the same loss without the stop-gradient

        def loss(b, first=model[0], last=model[1], pred=model[2]):
            z1, z2 = (last(OnceDifferentiableTanh.apply(first(v))) for v in b)
            per = -F.cosine_similarity(pred(z1), z2, dim=-1)
            return 0.5 * (per - F.cosine_similarity(pred(z2), z1, dim=-1)).mean()

    said = []
    op = HessianOperator(loss, model, batches, hvp="auto")
    op.warn = lambda kind, message: said.append((kind, message))
    op @ torch.randn(op.dim, dtype=torch.float64)
    assert op.hvp_choice == "finite_difference" and [k for k, _ in said] == ["fd_fallback"]
    assert ("asymmetric Jacobian" in said[0][1]) == stop


def test_a_plain_stop_gradient_loss_is_measured_exactly_without_a_word():
    model, batches, loss = _simsiam()
    said = []
    op = HessianOperator(loss, model, batches, hvp="auto")
    op.warn = lambda kind, message: said.append((kind, message))
    v = torch.randn(op.dim, dtype=torch.float64)
    H = dense_hessian(loss, model, batches)
    assert torch.allclose(op @ v, H @ v, rtol=1e-10, atol=1e-12) and op.exact and not said


def test_a_kink_crossed_by_the_second_vector_is_not_read_as_a_stop_gradient():
    """The symmetry check took its error estimate from the first vector's steps only: where
    the second vector's steps crossed a ReLU kink (their error 0.49 against 2.6e-5) the
    asymmetry passed for a stop-gradient, and a fused loss's products, 45 % off, were kept
    with a warning blaming one. Both vectors' errors count now: finite differences."""
    torch.manual_seed(1)
    first, last = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)
    scale = torch.nn.Parameter(torch.tensor(0.3))
    model = torch.nn.ModuleDict({"first": first, "last": last})
    model.register_parameter("scale", scale)
    batches = [(torch.randn(10, 4), torch.randint(0, 3, (10,)))]

    def loss(b):
        ce = FusedCrossEntropy.apply(last(torch.relu(first(b[0]))), b[1])
        return torch.exp(-scale) * ce + scale

    said = []
    op = HessianOperator(loss, model, batches, hvp="auto", seed=1)
    op.warn = lambda kind, message: said.append((kind, message))
    op @ torch.randn(op.dim)
    assert op.hvp_choice == "finite_difference"
    assert not any("asymmetric Jacobian" in message for _, message in said)
