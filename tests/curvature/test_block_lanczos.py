"""Block Lanczos against float64 dense oracles: T = QᵀHQ, eigenvalues, exhausted and
rank-deficient blocks, a real Hessian, NaN, arguments."""

from __future__ import annotations

import threading

import pytest
import torch

import lightning_landscape.curvature.block_lanczos as block_module
from lightning_landscape._core.random import make_generator
from lightning_landscape._core.space import Space
from lightning_landscape.curvature import HessianOperator, MatrixOperator, dense_hessian
from lightning_landscape.curvature.block_lanczos import block_lanczos, block_top_eigenvalues

from ._problems import Diagonal, flat_spectrum, make_problem, outlier_spectrum, spectrum_matrix

F64 = torch.float64


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=F64)


def test_block_tridiagonal_is_the_projection_and_basis_orthonormal():
    A = spectrum_matrix(flat_spectrum(60) - 0.3)
    op = MatrixOperator(A)
    start = torch.randn(3, 60, generator=torch.Generator().manual_seed(1), dtype=F64)
    run = block_lanczos(op, start, 7, generator=make_generator(0))
    Q = run.vectors.tensor()[0]
    assert run.finite and run.num_steps == 7 and run.block == 3
    assert run.num_matvecs == op.num_matvecs == 21 == run.T.shape[0] == len(run.vectors)
    assert torch.allclose(Q @ Q.T, _eye(21), atol=1e-10, rtol=0)
    assert torch.allclose(Q @ A @ Q.T, run.T, atol=1e-10, rtol=0)
    assert torch.equal(run.T[3:6, 9:], torch.zeros(3, 12, dtype=F64))  # block tridiagonal
    theta, S, res = run.ritz()  # the residual bounds are the true Ritz residuals
    X = Q.T @ S
    assert torch.allclose((A @ X - X * theta).norm(dim=0), res, atol=1e-10, rtol=0)


@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_float32_at_any_scale_of_the_operator(scale):
    """Rounding noise is judged against the operator's scale, not the start block's norm (√dim):
    a small operator in float32 (a Hessian of a scaled loss) keeps its Krylov directions."""
    A = spectrum_matrix(outlier_spectrum(300)) * scale
    op = MatrixOperator(A.float())
    r = block_top_eigenvalues(op, 2, block=4, tol=1e-4, seed=0)
    ev = torch.linalg.eigvalsh(A).flip(0)[:2]
    assert r.converged and torch.allclose(r.eigenvalues, ev, rtol=1e-4, atol=0)
    start = torch.randn(4, 300, generator=torch.Generator().manual_seed(1))
    run = block_lanczos(op, start, 6, generator=make_generator(0))
    Q = run.vectors.tensor()[0].double()
    assert torch.allclose(Q @ A @ Q.T, run.T, atol=1e-5 * float(A.norm(2)), rtol=0)


def test_one_host_transfer_a_step(monkeypatch):
    """A well-conditioned run moves the b × b blocks to the host once a step (the start block's
    orthonormalization once more), never falling back to column-by-column Gram-Schmidt."""
    op = MatrixOperator(spectrum_matrix(flat_spectrum(80)))
    count, original = [0], torch.Tensor.cpu

    def counted(self, *args, **kwargs):
        count[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counted)
    start = torch.randn(4, 80, generator=torch.Generator().manual_seed(0), dtype=F64)
    run = block_lanczos(op, start, 6, generator=make_generator(0))
    assert run.num_steps == 6 and count[0] == 7


@pytest.mark.parametrize("block", [2, 4])
def test_top_and_smallest_match_eigvalsh(block):
    lam = outlier_spectrum(300) - 0.004  # a few negative eigenvalues at the bottom
    A = spectrum_matrix(lam)
    ev = torch.linalg.eigvalsh(A)
    op = MatrixOperator(A)
    top = block_top_eigenvalues(op, 3, block=block, tol=1e-10, seed=0)
    low = block_top_eigenvalues(op, which="smallest", block=block, tol=1e-6, seed=0)
    assert top.converged and low.converged
    assert torch.allclose(top.eigenvalues, ev.flip(0)[:3], atol=1e-8, rtol=0)
    assert abs(float(low.eigenvalues[0]) - float(ev[0])) < 1e-4 and low.eigenvalues[0] < 0
    assert top.num_matvecs % block == 0 and low.num_matvecs % block == 0
    assert top.num_matvecs < 300
    for r in (top, low):
        X = r.eigenvectors
        assert torch.allclose(X.T @ X, _eye(X.shape[1]), atol=1e-10, rtol=0)
        assert ((A @ X - X * r.eigenvalues).norm(dim=0) <= r.residuals + 1e-10).all()


@pytest.mark.parametrize("basis_device", [None, "cpu", "auto"])
def test_a_full_run_gives_every_eigenvalue(basis_device):
    A = spectrum_matrix(torch.linspace(-1.0, 2.0, 24, dtype=F64), seed=3)
    op = MatrixOperator(A)
    r = block_top_eigenvalues(
        op, 24, block=4, tol=1e-12, max_matvecs=24, seed=0, basis_device=basis_device
    )
    assert r.num_matvecs == 24 and r.converged
    assert torch.allclose(r.eigenvalues, torch.linalg.eigvalsh(A).flip(0), atol=1e-12, rtol=0)


def test_rank_deficient_start_block():
    A = spectrum_matrix(outlier_spectrum(60))
    start = torch.randn(4, 60, generator=torch.Generator().manual_seed(2), dtype=F64)
    start[1] = start[0]  # two equal columns: one direction is replaced by a random one
    run = block_lanczos(MatrixOperator(A), start, 5, generator=make_generator(0))
    Q = run.vectors.tensor()[0]
    assert torch.isfinite(run.T).all() and run.num_matvecs == 20
    assert torch.allclose(Q @ Q.T, _eye(20), atol=1e-10, rtol=0)
    assert torch.allclose(Q @ A @ Q.T, run.T, atol=1e-10, rtol=0)
    theta = torch.linalg.eigvalsh(run.T)
    assert torch.allclose(theta[-3:], torch.linalg.eigvalsh(A)[-3:], atol=1e-8, rtol=0)


@pytest.mark.parametrize("block", [4, 5])
def test_exhausted_krylov_space_restarts_with_zero_coupling(block, monkeypatch):
    """Three distinct eigenvalues (multiplicities 13, 13, 14): the block Krylov space has at
    most 3 b dimensions, so later blocks start from random vectors with zero coupling and every
    Ritz value is an exact eigenvalue (a block finds the multiplicity, too)."""
    calls, original = [], block_module._BlockQR._by_columns
    monkeypatch.setattr(
        block_module._BlockQR,
        "_by_columns",
        lambda self, *a: calls.append(1) or original(self, *a),
    )
    d = torch.cat([torch.full((13,), 3.0), torch.full((13,), 1.0), torch.full((14,), -2.0)])
    op = Diagonal(d.to(F64))
    start = torch.randn(block, 40, generator=torch.Generator().manual_seed(0), dtype=F64)
    run = block_lanczos(op, start, 40 // block, generator=make_generator(0))
    Q = run.vectors.tensor()[0]
    assert calls and torch.isfinite(run.T).all()
    assert torch.allclose(Q @ Q.T, _eye(Q.shape[0]), atol=1e-10, rtol=0)
    assert torch.allclose(Q @ torch.diag(op.diag) @ Q.T, run.T, atol=1e-10, rtol=0)
    distinct = torch.tensor([-2.0, 1.0, 3.0], dtype=F64)
    theta = torch.linalg.eigvalsh(run.T)  # a full run: T is H in the basis Q
    assert (theta[:, None] - distinct).abs().min(dim=1).values.max() < 1e-12
    top = block_top_eigenvalues(op, 3, block=block, tol=1e-10, seed=0)
    low = block_top_eigenvalues(op, 2, block=block, which="smallest", tol=1e-10, seed=0)
    assert top.converged and low.converged and top.num_matvecs <= 3 * block
    assert torch.allclose(top.eigenvalues, torch.full((3,), 3.0, dtype=F64), atol=1e-12, rtol=0)
    assert torch.allclose(low.eigenvalues, torch.full((2,), -2.0, dtype=F64), atol=1e-12, rtol=0)


def test_an_operator_returning_its_input_and_the_start_left_alone():
    class Identity(MatrixOperator):
        def _matmat(self, Vt):
            return Vt  # H Q = Q: the Krylov space is exhausted at once

    start = torch.randn(3, 12, generator=torch.Generator().manual_seed(0), dtype=F64)
    saved = start.clone()
    run = block_lanczos(Identity(_eye(12)), start, 4, generator=make_generator(0))
    Q = run.vectors.tensor()[0]
    assert torch.equal(start, saved) and run.num_matvecs == 12
    assert torch.allclose(Q @ Q.T, _eye(12), atol=1e-12, rtol=0)
    assert torch.allclose(run.T, _eye(12), atol=1e-12, rtol=0)


def test_hessian_operator_matches_dense_hessian():
    p = make_problem("mlp", mode="eval")
    H = dense_hessian(p.loss_fn, p.model, p.batches)
    ev = torch.linalg.eigvalsh(H)
    op = HessianOperator(p.loss_fn, p.model, p.batches, hvp="cached")
    top = block_top_eigenvalues(op, 3, block=3, tol=1e-10, seed=0)
    low = block_top_eigenvalues(op, which="smallest", block=3, tol=1e-10, seed=0)
    assert top.converged and low.converged and ev[0] < 0
    assert torch.allclose(top.eigenvalues, ev.flip(0)[:3], rtol=1e-6, atol=0)
    assert torch.allclose(low.eigenvalues, ev[:1], rtol=1e-6, atol=0)
    X = top.eigenvectors
    assert ((H @ X - X * top.eigenvalues).norm(dim=0) <= top.residuals + 1e-10).all()


class _Shards:
    """Two ranks simulated by two threads: a collective is a barrier-guarded exchange."""

    def __init__(self, ranks: int = 2) -> None:
        self.barrier, self.slots = threading.Barrier(ranks, timeout=30), [None] * ranks

    def gather(self, rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        self.barrier.wait()
        self.slots[rank] = x
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


class _ShardSpace(Space):
    def __init__(self, dim: int, rows: slice, rank: int, shards: _Shards) -> None:
        super().__init__(dim, F64, torch.device("cpu"))
        self.rows, self.rank, self.shards = rows, rank, shards
        self.local_dim = rows.stop - rows.start

    def reduce(self, partial):
        return sum(self.shards.gather(self.rank, partial))

    def norm(self, x, dim=-1):
        return self.reduce(x.norm(dim=dim) ** 2).sqrt()

    def restrict(self, full, axis=-1):
        return full.narrow(axis, self.rows.start, self.local_dim)


class _ShardedMatrix(MatrixOperator):
    """This rank's rows of a dense matrix, acting on this rank's shards of the vectors."""

    def __init__(self, matrix, rows: slice, rank: int, shards: _Shards) -> None:
        super().__init__(matrix)
        self.rows, self.space = rows, _ShardSpace(matrix.shape[0], rows, rank, shards)

    def matmat(self, V):
        whole = torch.cat(self.space.shards.gather(self.space.rank, V))
        self.num_matvecs += V.shape[1]
        return self.matrix[self.rows] @ whole


@pytest.mark.parametrize("exhausted", [False, True])
def test_sharded_vectors_give_the_whole_vectors_answer(exhausted):
    """Inner products go through the Space: two shards reproduce the one-process run, also
    through the column-by-column path of an exhausted Krylov space."""
    if exhausted:
        A = torch.diag(torch.cat([torch.full((9,), 2.0), torch.full((9,), -1.0)]).to(F64))
    else:
        A = spectrum_matrix(outlier_spectrum(40) - 0.003)
    whole = block_top_eigenvalues(MatrixOperator(A), 3, block=3, tol=1e-10, seed=0)
    shards, half, out = _Shards(), A.shape[0] // 2, {}

    def run(rank: int) -> None:
        rows = slice(rank * half, (rank + 1) * half)
        op = _ShardedMatrix(A, rows, rank, shards)
        out[rank] = block_top_eigenvalues(op, 3, block=3, tol=1e-10, seed=0)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(out) == {0, 1}
    for r in out.values():
        assert r.converged and r.num_matvecs == whole.num_matvecs
        assert torch.allclose(r.eigenvalues, whole.eigenvalues, atol=1e-10, rtol=0)
    X, Y = torch.cat([out[0].eigenvectors, out[1].eigenvectors]), whole.eigenvectors
    assert torch.allclose(X @ X.T, Y @ Y.T, atol=1e-8, rtol=0)  # (the eigenvalue 2 repeats)
    assert torch.allclose(whole.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:3], atol=1e-10)


def test_non_finite_products_end_the_run():
    class Poisoned(MatrixOperator):
        def _matmat(self, Vt):
            out = super()._matmat(Vt)
            out[0, 0] = float("nan") if self.num_matvecs >= 8 else out[0, 0]
            return out

    op = Poisoned(spectrum_matrix(outlier_spectrum(60)))
    r = block_top_eigenvalues(op, 2, tol=1e-12, seed=0)
    assert r.num_matvecs == 12 and not r.converged
    assert torch.isnan(r.eigenvalues).all() and torch.isnan(r.eigenvectors).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, ValueError, "`k` must be a positive int"),
        ({"k": 11}, ValueError, "`k` must be at most the dimension 10"),
        ({"block": 0}, ValueError, "`block` must be a positive int"),
        ({"block": 2.0}, TypeError, "`block` must be a positive int"),
        ({"block": 11}, ValueError, "`block` must be at most the dimension 10"),
        ({"which": "middle"}, ValueError, "`which` must be 'largest' or 'smallest'"),
        ({"tol": 0.0}, ValueError, "`tol` must be a positive number"),
        ({"max_matvecs": 1.5}, TypeError, "`max_matvecs` must be a positive int"),
        ({"k": 3, "max_matvecs": 2}, ValueError, "`max_matvecs` must be at least `k` = 3"),
        ({"max_matvecs": 3}, ValueError, "`max_matvecs` must be at least `block` = 4"),
        ({"k": 5, "max_matvecs": 6}, ValueError, "`k` = 5 needs more products than whole"),
        ({"k": 10, "block": 4}, ValueError, "`k` = 10 needs more products than whole"),
        ({"seed": "zero"}, TypeError, "`seed` must be an int or None"),
        ({"basis_device": 3}, TypeError, "`basis_device` must be None"),
    ],
)
def test_raises(kwargs, error, match):
    op = MatrixOperator(torch.eye(10, dtype=F64))
    with pytest.raises(error, match=match):
        block_top_eigenvalues(op, **kwargs)


def test_start_block_larger_than_dimension_raises():
    op = MatrixOperator(torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match="`start` must hold at most `dim` = 3 vectors"):
        block_lanczos(op, torch.randn(4, 3, dtype=F64), 2, generator=make_generator(0))
