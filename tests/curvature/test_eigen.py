"""top_eigenvalues: Lanczos against eigvalsh of the dense Hessian, flags, caps, NaN, PyHessian."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_landscape.curvature import (
    HessianOperator,
    MatrixOperator,
    dense_hessian,
    top_eigenvalues,
)

from ._problems import make_mlp, make_problem, outlier_spectrum, spectrum_matrix


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_top3_and_smallest_match_eigvalsh(arch, mode):
    p = make_problem(arch, "ce_mean", mode)
    H = dense_hessian(p.loss_fn, p.model, p.batches)
    ev = torch.linalg.eigvalsh(H)
    op = HessianOperator(p.loss_fn, p.model, p.batches, hvp="cached")
    top = top_eigenvalues(op, 3, tol=1e-10, seed=0)
    low = top_eigenvalues(op, which="smallest", tol=1e-10, seed=0)
    assert top.converged and low.converged
    assert ev[0] < 0  # a saddle direction exists: "smallest" must find the negative end
    assert torch.allclose(top.eigenvalues, ev.flip(0)[:3], rtol=1e-6, atol=0)
    assert torch.allclose(low.eigenvalues, ev[:1], rtol=1e-6, atol=0)
    assert top.num_matvecs < op.dim  # converged before the space was exhausted
    for r in (top, low):
        X = r.eigenvectors
        assert X.shape == (op.dim, r.eigenvalues.numel())
        assert torch.allclose(X.T @ X, torch.eye(X.shape[1], dtype=X.dtype), atol=1e-10)
        true_res = (H @ X - X * r.eigenvalues).norm(dim=0)
        assert (true_res <= r.residuals + 1e-12).all()
        assert (r.residuals <= 1e-10 * ev.abs().max()).all()


def test_known_spectrum_converges_before_dimension():
    lam = outlier_spectrum(400)
    op = MatrixOperator(spectrum_matrix(lam))
    r = top_eigenvalues(op, 3, tol=1e-8, seed=1)
    assert r.converged and r.num_matvecs < 60
    assert torch.allclose(r.eigenvalues, lam.sort(descending=True).values[:3], rtol=1e-6)
    low = top_eigenvalues(op, 2, which="smallest", tol=1e-3, seed=1, max_matvecs=400)
    assert (low.eigenvalues[0] <= low.eigenvalues[1]) and low.eigenvalues[0] >= -1e-12


def test_default_tolerance_is_cheap_and_accurate():
    lam = outlier_spectrum(400)
    op = MatrixOperator(spectrum_matrix(lam))
    r = top_eigenvalues(op, seed=0)
    assert r.converged and r.num_matvecs <= 30
    assert abs(float(r.eigenvalues[0]) - 100.0) / 100.0 < 1e-3


def test_max_matvecs_cap_gives_not_converged(mlp_problem):
    p = mlp_problem
    op = HessianOperator(p.loss_fn, p.model, p.batches)
    r = top_eigenvalues(op, 3, tol=1e-12, max_matvecs=5, seed=0)
    assert not r.converged and r.num_matvecs == 5 and op.num_matvecs == 5
    assert r.eigenvalues.shape == (3,)


def test_exhausting_the_dimension_is_exact():
    lam = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64)
    op = MatrixOperator(spectrum_matrix(lam))
    r = top_eigenvalues(op, 12, tol=1e-14, seed=0)
    assert r.converged and r.num_matvecs == 12
    assert torch.allclose(r.eigenvalues, lam.flip(0), atol=1e-12)


def test_nan_loss_gives_nan_not_exception():
    model = make_mlp().eval()
    batches = make_problem("mlp").batches

    def loss_fn(batch):
        return F.cross_entropy(model(batch[0]), batch[1]) * math.nan

    op = HessianOperator(loss_fn, model, batches)
    r = top_eigenvalues(op, 2, seed=0)
    assert torch.isnan(r.eigenvalues).all() and torch.isnan(r.residuals).all()
    assert torch.isnan(r.eigenvectors).all() and not r.converged and r.num_matvecs == 1


def test_seed_reproducible_and_none_draws_fresh():
    op = MatrixOperator(spectrum_matrix(outlier_spectrum(100)))
    a = top_eigenvalues(op, 2, tol=1e-2, seed=5)
    b = top_eigenvalues(op, 2, tol=1e-2, seed=5)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.num_matvecs == b.num_matvecs
    state = torch.get_rng_state()
    top_eigenvalues(op, 2, tol=1e-2)  # a fresh seed from os.urandom: the global RNG untouched
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, ValueError, "`k` must be a positive int"),
        ({"k": 2.0}, TypeError, "`k` must be a positive int"),
        ({"k": 11}, ValueError, "`k` must be at most the dimension 10"),
        ({"which": "middle"}, ValueError, "`which` must be 'largest' or 'smallest'"),
        ({"tol": 0.0}, ValueError, "`tol` must be a positive number"),
        ({"tol": "small"}, ValueError, "`tol` must be a positive number"),
        ({"max_matvecs": 0}, ValueError, "`max_matvecs` must be a positive int"),
        ({"max_matvecs": 1.5}, TypeError, "`max_matvecs` must be a positive int"),
        ({"k": 3, "max_matvecs": 2}, ValueError, "`max_matvecs` must be at least `k`"),
        ({"seed": "zero"}, TypeError, "`seed` must be an int or None"),
    ],
)
def test_raises(kwargs, error, match):
    op = MatrixOperator(torch.eye(10, dtype=torch.float64))
    with pytest.raises(error, match=match):
        top_eigenvalues(op, **kwargs)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_agrees_with_pyhessian():
    """PyHessian's power iteration (float32, its default tol) lands within 2% of ours.

    PyHessian leaves the model in eval mode and graphs on ``.grad``: it gets its own copy."""
    pyhessian = pytest.importorskip("pyhessian")
    model = make_mlp(dropout=0.0).float().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    peer = copy.deepcopy(model)
    torch.manual_seed(0)
    hess = pyhessian.hessian(peer, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    theirs = hess.eigenvalues(top_n=1)[0][0]
    op = HessianOperator(lambda b: F.cross_entropy(model(b[0]), b[1]), model, [(x, y)])
    ours = float(top_eigenvalues(op, tol=1e-4, seed=0).eigenvalues[0])
    assert abs(theirs - ours) / abs(ours) < 0.02
    assert all(p.grad is None for p in model.parameters())
    for q in peer.parameters():  # break PyHessian's grad-graph reference cycle
        q.grad = None


@pytest.mark.parametrize("outlier", [100.0, 1000.0, 1e4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eigenvalues_far_below_a_dominant_one_are_found(outlier, seed):
    """Top-4 of λ = (outlier, 10, 9.5, 9) and a bulk in [0, 1] "converged" after 4 products at
    0.80 and 0.21 for 9.5 and 9 (92-98 % low): every Ritz value was wanted and the residuals
    were measured against the outlier. Now at least 2k + 1 products, and each value's residual
    against itself."""
    bulk = torch.rand(296, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    top = torch.tensor([outlier, 10.0, 9.5, 9.0], dtype=torch.float64)
    op = MatrixOperator(spectrum_matrix(torch.cat([top, bulk]), seed))
    r = top_eigenvalues(op, 4, seed=seed)
    assert r.converged and r.num_matvecs >= 9
    torch.testing.assert_close(r.eigenvalues, top, rtol=1e-3, atol=0)


def test_float32_residuals_are_not_below_float32_rounding():
    """Lanczos's residual estimate |β s| went on shrinking past the products' rounding: at tol
    1e-12 a float32 run reported residuals of 1.7e-12 and converged, its true ones 5.1e-7. The
    reported residuals are floored at 10 ε max|θ|, so such a tolerance is reported unmet."""
    A = spectrum_matrix(outlier_spectrum(100), 0).float()
    r = top_eigenvalues(MatrixOperator(A), 2, tol=1e-12, seed=0)
    eps = torch.finfo(torch.float32).eps
    assert not r.converged and bool((r.residuals >= 10 * eps * r.eigenvalues[0]).all())
    assert top_eigenvalues(MatrixOperator(A), 2, tol=1e-4, seed=0).converged
