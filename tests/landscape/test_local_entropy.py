"""Local entropy against its closed form on quadratics."""

import math

import pytest
import torch

from lightning_landscape._core.random import make_generator
from lightning_landscape.landscape.local_entropy import local_entropy
from lightning_landscape.landscape.sharpness import FunctionObjective

D = torch.float64
LAM = torch.linspace(0.1, 4.0, 20, dtype=D)


def _quadratic(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=D))[0]
    h = q @ torch.diag(LAM) @ q.T
    w_star = torch.randn(20, generator=g, dtype=D)
    return h, w_star, FunctionObjective(lambda w: 0.5 * (w - w_star) @ h @ (w - w_star) + 0.3)


def _closed_form(h, g, gamma, beta):
    """−½ Σ log(1 + βλ/γ) + ½ β² gᵀ(γI + βH)⁻¹g: a Gaussian integral."""
    lam = torch.linalg.eigvalsh(h)
    quad = g @ torch.linalg.solve(gamma * torch.eye(len(g), dtype=D) + beta * h, g)
    return float(-0.5 * torch.log1p(beta * lam / gamma).sum() + 0.5 * beta**2 * quad)


@pytest.mark.parametrize("gamma", [4.0, 8.0, 16.0])
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_within_three_stderr_of_the_closed_form_at_the_minimum(gamma, beta):
    h, w_star, obj = _quadratic()
    truth = float(-0.5 * torch.log1p(beta * LAM / gamma).sum())
    res = local_entropy(obj, w_star, gamma, beta, samples=256, generator=make_generator(0, gamma))
    assert abs(res.estimate - truth) < 3 * res.stderr
    assert res.stderr < 0.05 * abs(truth)
    assert res.loss == pytest.approx(0.3)
    assert res.num_forward == 2 * 256 + 1
    assert (res.gamma, res.beta, res.samples) == (gamma, beta, 256)
    assert 0.2 * 256 < res.effective_samples <= 256


def test_within_three_stderr_away_from_the_minimum():
    h, w_star, obj = _quadratic(1)
    w = w_star + 0.2 * torch.randn(20, generator=torch.Generator().manual_seed(3), dtype=D)
    truth = _closed_form(h, h @ (w - w_star), 8.0, 1.0)
    res = local_entropy(obj, w, 8.0, samples=256, generator=make_generator(1))
    assert abs(res.estimate - truth) < 3 * res.stderr and res.stderr < 0.05 * abs(truth)


def test_flat_landscape_is_zero_and_small_gamma_is_flagged():
    flat = FunctionObjective(lambda w: w.sum() * 0 + 2.0)
    res = local_entropy(flat, torch.zeros(5, dtype=D), 1.0, samples=4, base_loss=2.0)
    assert (res.estimate, res.stderr, res.effective_samples, res.num_forward) == (0.0, 0.0, 4.0, 8)
    # γ = 0.5: many directions with βλ/γ > 1, the weights degenerate
    h, w_star, obj = _quadratic()
    res = local_entropy(obj, w_star, 0.5, samples=64, generator=make_generator(0))
    assert res.effective_samples < 0.2 * 64


def test_seeded_and_nan():
    h, w_star, obj = _quadratic()
    a = local_entropy(obj, w_star, 8.0, samples=8, generator=make_generator(0, 1))
    b = local_entropy(obj, w_star, 8.0, samples=8, generator=make_generator(0, 1))
    c = local_entropy(obj, w_star, 8.0, samples=8, generator=make_generator(0, 2))
    assert a.estimate == b.estimate != c.estimate
    bad = FunctionObjective(lambda w: (w**2).sum() / torch.where(w.norm() > 0.5, 0.0, 0.0))
    res = local_entropy(bad, torch.zeros(3, dtype=D), 1.0, samples=2, base_loss=0.0)
    assert math.isnan(res.estimate) and math.isnan(res.stderr)


def test_errors():
    h, w_star, obj = _quadratic()
    with pytest.raises(ValueError, match="`gamma` must be a positive number"):
        local_entropy(obj, w_star, 0.0)
    with pytest.raises(TypeError, match="`gamma` must be a positive number"):
        local_entropy(obj, w_star, "1")
    with pytest.raises(ValueError, match="`beta` must be a positive number"):
        local_entropy(obj, w_star, 1.0, beta=-1.0)
    with pytest.raises(ValueError, match="`samples` must be an int >= 2"):
        local_entropy(obj, w_star, 1.0, samples=1)
