"""The growing Krylov basis: chunked storage equals a dense one, Lanczos allocates only the steps
it takes, and the basis may live elsewhere than the products."""

from __future__ import annotations

import math

import pytest
import torch

import lightning_landscape.curvature.lanczos as lanczos_module
from lightning_landscape._core.random import make_generator
from lightning_landscape.curvature import (
    MatrixOperator,
    analyze,
    spectral_density,
    top_eigenvalues,
    trace,
)
from lightning_landscape.curvature.basis import Basis
from lightning_landscape.curvature.lanczos import device_budget, lanczos
from lightning_landscape.curvature.pieces import Plan
from lightning_landscape.curvature.stability import PreconditionedOperator

from ._problems import Diagonal, flat_spectrum, outlier_spectrum, spectrum_matrix

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_chunked_basis_equals_dense_operations():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 7, generator=g, dtype=torch.float64))
    rows = Q.T  # 7 orthonormal rows
    basis = Basis(1, 30, torch.float64, "cpu", chunk=3)
    for r in rows:
        basis.append(r[None])
    assert len(basis) == 7 and basis.capacity == 9  # 3 chunks of 3: at most chunk − 1 spare
    assert torch.equal(basis.tensor()[0], rows)
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    C = torch.randn(7, 2, generator=g, dtype=torch.float64)
    assert torch.allclose(basis.coefficients(X), rows @ X, atol=1e-14)
    assert torch.allclose(basis.combine(C), rows.T @ C, atol=1e-14)
    Y = torch.randn(2, 30, generator=g, dtype=torch.float64)  # rows: combined into Y.T in place
    expected = Y.T + rows.T @ C
    assert basis.combine(C, out=Y.T) is not None and torch.allclose(Y.T, expected, atol=1e-14)
    w = torch.randn(1, 30, generator=g, dtype=torch.float64)
    projected = w - (rows.T @ (rows @ w[0]))[None]
    assert torch.allclose(basis.orthogonalize(w, passes=1), projected, atol=1e-14)
    assert torch.allclose(Basis.from_rows(rows).coefficients(X), rows @ X, atol=1e-14)


def test_chunk_size_shrinks_with_the_dimension():
    assert Basis(1, 100, torch.float32, "cpu").chunk == 16
    assert Basis(1, 1 << 21, torch.float32, "cpu").chunk == 8
    assert Basis(2, 1 << 24, torch.float32, "cpu").chunk == 1


def test_lanczos_allocates_only_the_steps_it_takes():
    """A run capped at 500 steps that stops after 12 holds 12 vectors (plus the spare of the
    last chunk), not 500 x P: nothing is preallocated for max_steps."""
    d = 1 << 21  # 2M: one chunk is 8 vectors
    diag = torch.linspace(0, 1, d, dtype=torch.float32)
    op = Diagonal(diag)
    start = torch.ones(1, d)
    run = lanczos(
        op, start, 500, generator=make_generator(0), should_stop=lambda a, b: a.shape[1] == 12
    )
    assert run.num_steps == 12 and op.num_matvecs == 12
    assert len(run.vectors) == 12 and run.vectors.capacity == 16  # 2 chunks of 8
    held = sum(c.numel() for c in run.vectors._chunks)
    assert held == 16 * d  # 128 MB at 500 x P would have been 4 GB


def test_growing_basis_matches_the_dense_reference():
    """Lanczos over several chunks: the same tridiagonal as a textbook dense implementation."""
    A = spectrum_matrix(outlier_spectrum(80))
    start = torch.randn(1, 80, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    run = lanczos(MatrixOperator(A), start, 40, generator=make_generator(0))
    assert run.vectors.chunk == 16 and len(run.vectors._chunks) == 3
    Q = torch.zeros(40, 80, dtype=torch.float64)
    q, alphas, betas = start[0] / start[0].norm(), [], []
    for j in range(40):
        Q[j] = q
        w = A @ q
        alphas.append(float(w @ q))
        for _ in range(2):
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        betas.append(float(w.norm()))
        q = w / w.norm()
    assert torch.allclose(run.alphas[0], torch.tensor(alphas, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(run.betas[0], torch.tensor(betas, dtype=torch.float64), atol=1e-12)


def test_host_basis_gives_the_same_answers():
    """``basis_device="cpu"`` (here the same device, so the numbers are identical) goes through
    every algorithm; Ritz vectors come back on the operator's device."""
    A = spectrum_matrix(flat_spectrum(60) - 0.2)
    op = MatrixOperator(A)
    devices = ("cpu", torch.device("cpu"), "auto")
    for kw in ({}, *({"basis_device": d} for d in devices)):
        top = top_eigenvalues(op, 2, tol=1e-8, seed=0, **kw)
        tr = trace(op, num_matvecs=30, seed=1, **kw)
        dens = spectral_density(op, num_probes=2, num_steps=10, seed=2, **kw)
        res = analyze(op, top_k=2, trace=True, density=True, density_probes=2, seed=3, **kw)
        got = (top.eigenvalues, tr.estimate, dens.nodes, res.top.eigenvalues, res.trace.estimate)
        if not kw:
            ref = got
        else:
            assert torch.equal(got[0], ref[0]) and got[1] == ref[1]
            assert torch.equal(got[2], ref[2]) and torch.equal(got[3], ref[3])
            assert got[4] == ref[4]
        assert top.eigenvectors.device == op.device
    assert torch.allclose(top.eigenvalues, torch.linalg.eigvalsh(A)[-2:].flip(0), atol=1e-7)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [(3, TypeError, "`basis_device` must be None"), ("nowhere", ValueError, "must name a device")],
)
def test_bad_basis_device_raises(value, error, match):
    op = MatrixOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(error, match=match):
        top_eigenvalues(op, basis_device=value)
    with pytest.raises(error, match=match):
        analyze(op, basis_device=value)


def _dense_checks(basis: Basis, rows: torch.Tensor, g: torch.Generator) -> None:
    """Every operation of ``basis`` equals the dense one on its ``rows``."""
    d = rows.shape[1]
    X = torch.randn(d, 4, generator=g, dtype=torch.float64)
    C = torch.randn(len(rows), 2, generator=g, dtype=torch.float64)
    w = torch.randn(1, d, generator=g, dtype=torch.float64)
    dev = torch.empty(0, device=basis.device).device  # "cuda" names the current one: cuda:0
    assert torch.allclose(basis.coefficients(X.to(dev)).cpu(), rows @ X, atol=1e-14)
    assert torch.allclose(basis.combine(C).cpu(), rows.T @ C, atol=1e-14)
    assert basis.combine(C).device == dev and basis.coefficients(X.to(dev)).device == dev
    projected = w - (rows.T @ (rows @ w[0]))[None]
    got = basis.orthogonalize(w.to(dev), passes=1)
    assert got.device == dev and torch.allclose(got.cpu(), projected, atol=1e-14)
    assert torch.equal(basis.tensor()[0].cpu(), rows) and basis.tensor().device == dev


def test_spilling_basis_keeps_its_first_chunks_on_the_device():
    """With ``spill``, chunks go to ``device`` while they fit ``device_bytes`` (read when a
    chunk is allocated), every later one to ``spill``; the operations are unchanged. Here both
    are the CPU (the placement is counted); ``test_spilling_basis_on_a_gpu`` crosses devices."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 7, generator=g, dtype=torch.float64))
    rows = Q.T
    chunk_bytes = 2 * 30 * 8
    asked = []

    def limit() -> float:
        asked.append(len(asked))
        return 2.5 * chunk_bytes  # two chunks fit

    basis = Basis(1, 30, torch.float64, "cpu", chunk=2, spill="cpu", device_bytes=limit)
    for r in rows:
        basis.append(r[None])
    assert basis.capacity == 8 and basis.spilled == 4  # chunks 1-2 on the device, 3-4 spilled
    assert len(asked) == 3  # read for chunks 1, 2, 3; chunk 4 follows chunk 3
    assert basis.held == 2 * chunk_bytes
    _dense_checks(basis, rows, g)
    basis.spill_to(chunk_bytes)  # the last chunk on the device moves: the same operations
    assert basis.held == chunk_bytes and basis.spilled == 6
    _dense_checks(basis, rows, g)
    basis.spill_to()  # and the first
    assert basis.held == 0 and basis.spilled == 8
    _dense_checks(basis, rows, g)
    basis.append(rows[0][None])  # fills chunk 4; chunk 5 goes to ``spill`` too
    basis.append(rows[1][None])
    assert basis.held == 0 and basis.spilled == 10
    for budget, spilled in ((0.0, 8), (math.inf, 0)):
        other = Basis(1, 30, torch.float64, "cpu", chunk=2, spill="cpu", device_bytes=budget)
        for r in rows:
            other.append(r[None])
        assert other.spilled == spilled
        _dense_checks(other, rows, g)
    assert Basis(1, 30, torch.float64, "cpu").spilled == 0


class Budgeted(Diagonal):
    """A diagonal operator with a ``memory_budget`` (bytes), as a HessianOperator has."""

    def __init__(self, diag: torch.Tensor, memory_budget: float | None) -> None:
        super().__init__(diag)
        self.memory_budget = memory_budget


def test_device_budget_reads_the_operators_budget():
    """``basis_device="auto"`` keeps on the device what the products' budget allows: the plan's
    budget once planned, else a positive ``memory_budget``, through wrapping operators; before
    the first product (no plan yet) and without a budget: unbounded."""
    diag = torch.linspace(1, 2, 50, dtype=torch.float64)
    assert device_budget(Diagonal(diag)) == math.inf
    assert device_budget(Budgeted(diag, None)) == math.inf
    assert device_budget(Budgeted(diag, 0)) == math.inf  # 0: nothing cached, not "no device"
    op = Budgeted(diag, 4096)
    assert device_budget(op) == 4096.0
    assert device_budget(PreconditionedOperator(op, torch.ones(50, dtype=torch.float64))) == 4096
    op.plan = None  # a HessianOperator before its first product: the first chunk stays
    assert device_budget(op) == math.inf
    op.plan = Plan(0, 1e3, 2e3, 8192.0, "")
    assert device_budget(op) == 8192.0
    op.plan = Plan(0, math.nan, math.nan, math.nan, "")  # explicit pieces: no planned budget
    assert device_budget(op) == 4096.0
    run = lanczos(op, torch.ones(1, 50, dtype=torch.float64), 10, generator=make_generator(0),
                  basis_device="auto")  # fmt: skip
    assert run.vectors.spill is None  # a CPU operator: nothing to spill to


@cuda
def test_spilling_basis_on_a_gpu():
    """On a GPU, ``basis_device="auto"`` keeps the first vectors on the device within the
    operator's budget and the rest in pinned host memory; the run equals an all-device one."""
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(40, 9, generator=g, dtype=torch.float64))
    basis = Basis(1, 40, torch.float64, "cuda", chunk=2, spill="cpu", device_bytes=2 * 2 * 40 * 8)
    for r in Q.T:
        basis.append(r[None].cuda())
    assert basis.spilled == 6 and basis._chunks[-1].is_pinned()
    _dense_checks(basis, Q.T, g)
    basis.spill_to()
    assert basis.spilled == 10 and all(c.is_pinned() for c in basis._chunks)
    _dense_checks(basis, Q.T, g)
    diag = torch.linspace(-1, 3, 5000, dtype=torch.float64, device="cuda")
    op = Budgeted(diag, 16 * 5000 * 8)  # one chunk of 16 vectors on the device
    start = torch.randn(1, 5000, generator=g, dtype=torch.float64)
    runs = [
        lanczos(op, start, 30, generator=make_generator(0), basis_device=where)
        for where in (None, "auto")
    ]
    assert runs[1].vectors.spilled == 16 and runs[0].vectors.spilled == 0  # the second chunk
    assert torch.allclose(runs[0].alphas, runs[1].alphas, atol=1e-12)
    assert torch.allclose(runs[0].betas, runs[1].betas, atol=1e-12)


def test_every_algorithm_over_a_spilled_basis(monkeypatch):
    """On CPU ``"auto"`` spills nowhere; spilled to the CPU itself (placement as on a GPU,
    beyond the budget of 3 vectors), Lanczos, the top eigenpairs, the deflated trace and the
    density give the same answers as an unspilled basis, to rounding."""
    original = lanczos_module.Basis

    def spilling(*args, **kwargs):
        if "device_bytes" in kwargs:
            kwargs["spill"] = "cpu"
        return original(*args, **kwargs)

    A = spectrum_matrix(outlier_spectrum(60))
    op = MatrixOperator(A)
    op.memory_budget = 3 * 60 * 8  # bytes: one chunk of 16 vectors does not fit, all spill
    plain = analyze(op, top_k=2, smallest=True, trace=True, density=True, seed=4)
    monkeypatch.setattr(lanczos_module, "Basis", spilling)
    spilled = analyze(op, top_k=2, smallest=True, trace=True, density=True, seed=4,
                      basis_device="auto")  # fmt: skip
    run = lanczos(op, torch.ones(1, 60, dtype=torch.float64), 20, generator=make_generator(0),
                  basis_device="auto")  # fmt: skip
    assert run.vectors.spilled == 32 and run.vectors.capacity == 32  # 2 chunks of 16, on "spill"
    assert torch.allclose(spilled.top.eigenvalues, plain.top.eigenvalues, atol=1e-12)
    assert torch.allclose(spilled.smallest.eigenvalues, plain.smallest.eigenvalues, atol=1e-12)
    assert spilled.trace.estimate == pytest.approx(plain.trace.estimate, abs=1e-10)
    assert torch.allclose(spilled.density.nodes, plain.density.nodes, atol=1e-10)
