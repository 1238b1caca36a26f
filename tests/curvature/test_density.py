"""Stochastic Lanczos quadrature: exact per-probe identities, unbiased moments, Ritz values."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_landscape.curvature import (
    HessianOperator,
    MatrixOperator,
    dense_hessian,
    spectral_density,
)

from ._problems import flat_spectrum, outlier_spectrum, spectrum_matrix


class Recording(MatrixOperator):
    """Remembers the first block it is applied to: the normalized start vectors."""

    first: torch.Tensor | None = None

    def _matmat(self, Vt):
        if self.first is None:
            self.first = Vt.clone()
        return super()._matmat(Vt)


def test_weights_sum_to_one_and_per_probe_moments_are_exact():
    """Σ τθ = vᵀHv/|v|² and Σ τθ² = |Hv|²/|v|² per probe, exactly: the reason the moments are
    unbiased."""
    A = spectrum_matrix(flat_spectrum(80) - 0.4)
    op = Recording(A)
    res = spectral_density(op, num_probes=5, num_steps=12, seed=0)
    assert res.nodes.shape == (5, 12) and res.weights.shape == (5, 12)
    assert torch.allclose(res.weights.sum(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-13)
    assert (res.weights >= 0).all()
    V = op.first  # (probes, dim), unit rows
    assert torch.allclose(V.norm(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-14)
    first = (res.weights * res.nodes).sum(dim=1)
    second = (res.weights * res.nodes**2).sum(dim=1)
    assert torch.allclose(first, ((V @ A) * V).sum(dim=1), rtol=1e-12, atol=1e-14)
    assert torch.allclose(second, (V @ A).pow(2).sum(dim=1), rtol=1e-12, atol=1e-14)
    assert res.num_matvecs == 60 and op.num_matvecs == 60 and res.dim == 80


def test_moments_match_trace_over_dimension():
    """Averaged over many probes the SLQ moments estimate tr(H)/d and tr(H²)/d (3 stderr)."""
    lam = flat_spectrum(100) * 2 - 0.5
    op = MatrixOperator(spectrum_matrix(lam))
    res = spectral_density(op, num_probes=400, num_steps=4, seed=1)
    d = lam.numel()
    for power, exact in ((1, float(lam.sum()) / d), (2, float((lam**2).sum()) / d)):
        per_probe = (res.weights * res.nodes**power).sum(dim=1)
        stderr = float(per_probe.std() / math.sqrt(per_probe.numel()))
        assert math.isclose(res.moment(power), float(per_probe.mean()), rel_tol=1e-12)
        assert abs(res.moment(power) - exact) < 3 * stderr


def test_top_ritz_value_matches_lambda_max():
    lam = outlier_spectrum(300)
    op = MatrixOperator(spectrum_matrix(lam))
    res = spectral_density(op, num_probes=2, num_steps=30, seed=2)
    assert torch.allclose(res.nodes[:, -1], torch.full((2,), 100.0, dtype=torch.float64), rtol=1e-8)
    full = spectral_density(MatrixOperator(spectrum_matrix(lam[:40])), num_steps=40, seed=0)
    assert torch.allclose(full.nodes[0], lam[:40].sort().values, atol=1e-10)


def test_network_hessian_top_node(cnn_problem):
    p = cnn_problem
    lam_max = float(torch.linalg.eigvalsh(dense_hessian(p.loss_fn, p.model, p.batches))[-1])
    op = HessianOperator(p.loss_fn, p.model, p.batches, hvp="cached")
    res = spectral_density(op, num_steps=60, seed=0)
    assert math.isclose(float(res.nodes[0, -1]), lam_max, rel_tol=1e-8)


def test_evaluate_integrates_to_one():
    op = MatrixOperator(spectrum_matrix(outlier_spectrum(200)))
    res = spectral_density(op, num_probes=3, num_steps=40, seed=3)
    grid = res.grid(20000)
    for sigma in (None, 0.5):
        density = res.evaluate(grid, sigma)
        assert (density >= 0).all()
        assert abs(float(torch.trapezoid(density, grid)) - 1.0) < 1e-3
    with pytest.raises(ValueError, match="`sigma` must be positive"):
        res.evaluate(grid, sigma=0.0)
    with pytest.raises(ValueError, match="`margin` must be non-negative"):
        res.grid(100, margin=-1.0)  # a reversed grid before
    with pytest.raises(ValueError, match="`num_points` must be an int of at least 2"):
        res.grid(1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_probes": 0}, ValueError, "`num_probes` must be a positive int"),
        ({"num_steps": 2.5}, TypeError, "`num_steps` must be a positive int"),
        ({"seed": "a"}, TypeError, "`seed` must be an int or None"),
    ],
)
def test_raises(kwargs, error, match):
    with pytest.raises(error, match=match):
        spectral_density(MatrixOperator(torch.eye(3, dtype=torch.float64)), **kwargs)
