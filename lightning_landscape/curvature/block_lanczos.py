"""Block Lanczos with full reorthogonalization: the top eigenvalues from blocks of products.

The block version of :mod:`.lanczos` (Golub & Underwood 1977, "The block Lanczos method for
computing eigenvalues"; Saad, "Numerical Methods for Large Eigenvalue Problems", ch. 6). From an
orthonormal start block Q_1 of b vectors it builds the block Krylov basis Q_1, Q_2, ... and the
block tridiagonal T = Qᵀ H Q (diagonal blocks A_j, couplings B_j) by

    W = H Q_j,   W − Q Qᵀ W  (the whole basis, twice),   W = Q_{j+1} B_j,

a Ritz pair (θ, Q s) having the residual ‖B_m s_last‖ (s_last: the last b entries of s).

Why blocks: a single-vector Lanczos takes its products one at a time, while on a GPU the Hessian
products of a block run as one vmapped call (an H200, ResNet-18: one product costs 5.6
gradients alone, 2.05 each in blocks of 8); on CPU a block through cached graphs shares each
uncached piece's graph among its vectors. A block Krylov space also finds clustered or repeated
top eigenvalues that one vector finds one by one.

Orthonormalization: block classical Gram-Schmidt twice (BCGS2), each pass followed by a
Cholesky QR of the block from its b × b Gram matrix (reduced through the operator's
:class:`~lightning_landscape._core.space.Space`, so sharded vectors work), all on the device
with one device-to-host transfer a step (the b × b blocks together). When the block is
ill-conditioned (κ above 0.1/√ε, where Cholesky QR loses orthogonality) or rank-deficient (a
start block with dependent columns, an exhausted Krylov space) the step falls back to Gram-Schmidt
column by column (b + 2 to 2b + 2 transfers); a lost direction is replaced by a fresh random
vector orthogonal to the basis, with zero coupling in T (as :func:`~.lanczos.lanczos` restarts).
T = Qᵀ H Q holds throughout, so its eigenvalues are Ritz values with the residuals below (exact
eigenvalues only where a whole block was lost, the space then invariant).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_landscape._core.checks import check_positive_int
from lightning_landscape._core.random import gaussian, make_generator, resolve_seed
from lightning_landscape._core.space import Space, space_of
from lightning_landscape.curvature.basis import Basis, check_basis_device
from lightning_landscape.curvature.eigen import (
    EigenResult,
    Which,
    _validate,
    floored,
    min_steps,
    wanted,
    within,
)
from lightning_landscape.curvature.lanczos import RESTART, new_basis
from lightning_landscape.curvature.linear import LinearOperator, writable


@dataclass(frozen=True)
class BlockLanczosRun:
    """The output of :func:`block_lanczos`.

    Attributes:
        T: ``(n, n)`` float64 block tridiagonal Qᵀ H Q (n = ``num_matvecs``).
        coupling: ``(b, b)`` float64 last coupling block B (the Ritz residual scale).
        vectors: the orthonormal basis (a one-chain :class:`~.basis.Basis` of n vectors).
        block: the block size b.
        num_steps: block steps taken (b products each).
        num_matvecs: products spent (n).
        finite: False if a product (T then holds NaN) or the start block (T is 0 x 0) was not
            finite; the run stopped there.
    """

    T: Tensor
    coupling: Tensor
    vectors: Basis
    block: int
    num_steps: int
    num_matvecs: int
    finite: bool

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (ascending), eigenvectors of T, and residuals ‖B s_last,i‖."""
        return block_ritz(self.T, self.coupling)


def block_ritz(T: Tensor, coupling: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eigen-decomposition of a block tridiagonal T with residuals ‖B · S[last b rows, i]‖."""
    theta, S = torch.linalg.eigh(T)
    return theta, S, (coupling @ S[-coupling.shape[0] :]).norm(dim=0)


def _project(basis: Basis, X: Tensor) -> Tensor:
    """``X −= Q Qᵀ X`` in place; returns the ``(n, k)`` coefficients Qᵀ X."""
    if len(basis) == 0:
        return X.new_zeros(0, X.shape[1])
    C = basis.coefficients(X)
    basis.combine(-C, out=X)
    return C


class _BlockQR:
    """Orthonormalizes each new block against the basis and within itself (see the module)."""

    def __init__(self, sp: Space, basis: Basis, dtype: torch.dtype, gen: torch.Generator) -> None:
        self.sp, self.basis, self.dtype, self.gen = sp, basis, dtype, gen
        self.eps = torch.finfo(dtype).eps
        self.kappa = 0.1 / math.sqrt(self.eps)  # Cholesky QR keeps ε·κ² ≤ 1 % (then twice)
        self.scale = 0.0  # the largest ‖[A_j; B_j]‖ so far: rounding noise is ε · scale

    def __call__(self, W: Tensor, fill: bool = True) -> tuple[Tensor, Tensor, Tensor, bool]:
        """``(Q_next, A, B, finite)`` from the product block ``W = H Q_j`` (``(local, b)``,
        overwritten)."""
        b, n = W.shape[1], len(self.basis)
        C1 = _project(self.basis, W)
        G1 = self.sp.reduce(W.T @ W).double()
        L1, info1 = torch.linalg.cholesky_ex(G1)  # no sync: a failure shows in info
        Y = torch.linalg.solve_triangular(L1.T.to(self.dtype), W, upper=True, left=False)
        C2 = _project(self.basis, Y)
        L2, info2 = torch.linalg.cholesky_ex(self.sp.reduce(Y.T @ Y).double())
        Q = torch.linalg.solve_triangular(L2.T.to(self.dtype), Y, upper=True, left=False)
        # the coefficients on the last block of the basis (Q_j): A's two parts
        c1, c2 = (C[n - b :] if n else W.new_zeros(b, b) for C in (C1, C2))
        parts = [c1, c2, L1.T, L2.T, G1.diagonal(), torch.stack([info1, info2])]
        host = torch.cat([p.double().flatten() for p in parts]).cpu()  # the step's one sync
        c1, c2, R1, R2 = (host[i * b * b : (i + 1) * b * b].view(b, b) for i in range(4))
        if not (torch.isfinite(c1).all() and torch.isfinite(host[4 * b * b : -2]).all()):
            nan = torch.full((b, b), math.nan, dtype=torch.float64)
            return Q, nan, nan.clone(), False
        ok = bool((host[-2:] == 0).all() and torch.isfinite(host[2 * b * b : 4 * b * b]).all())
        if ok:
            sigma = torch.linalg.svdvals(R1)
            self.scale = max(self.scale, float(torch.linalg.matrix_norm(torch.cat([c1, R1]), 2)))
            noise = RESTART * self.eps * max(self.scale, 1e-300)
            ok = bool(sigma[-1] > noise and sigma[0] <= self.kappa * sigma[-1])
        if ok:
            A, B = c1 + c2 @ R1, R2 @ R1
        else:  # ill-conditioned or rank-deficient: column by column
            Q, extra, B = self._by_columns(W, n, fill)
            A = c1 + extra
        A = (A + A.T) / 2
        self.scale = max(self.scale, float(torch.linalg.matrix_norm(torch.cat([A, B]), 2)))
        return Q, A, B, True

    def _by_columns(self, W: Tensor, n: int, fill: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Gram-Schmidt of ``W``'s columns one at a time, twice against the basis and the
        columns kept; a column left with a norm of rounding noise is dropped and, with ``fill``,
        replaced by a fresh random vector, its row of B zero. Returns the block, the corrections
        of the last block's coefficients and B."""
        b = W.shape[1]
        N = torch.zeros_like(W)
        R = torch.zeros(b, b, dtype=torch.float64)
        extra = torch.zeros(b, b, dtype=torch.float64)
        noise = RESTART * self.eps * max(self.scale, float(self.sp.norm(W, dim=0).max()), 1e-300)
        kept = 0
        for c in range(2 * b if fill else b):
            if c >= b and kept == b:
                break
            if c < b:
                x = W[:, c : c + 1].clone()
            else:  # a fresh direction (n + b ≤ dim: it is never lost)
                x = self.sp.draw(gaussian, (1, self.sp.dim), self.gen).T.to(W.device, W.dtype)
            cb, cn = x.new_zeros(max(n, 1), 1), x.new_zeros(kept, 1)
            for _ in range(2):
                if n:
                    cb += _project(self.basis, x)
                part = self.sp.reduce(N[:, :kept].T @ x)
                x.sub_(N[:, :kept] @ part)
                cn += part
            cb = cb[n - b :] if n else x.new_zeros(b, 1)
            host = torch.cat([cb[:, 0], cn[:, 0], self.sp.norm(x, dim=0)]).double().cpu()
            norm = float(host[-1])
            if c < b:
                extra[:, c], R[:kept, c] = host[:b], host[b:-1]
            if norm > noise or c >= b:
                N[:, kept] = x[:, 0] / norm
                if c < b:  # a fresh direction's row of B stays zero
                    R[kept, c] = norm
                kept += 1
        return N, extra, R


def block_lanczos(
    op: LinearOperator,
    start: Tensor,
    max_steps: int,
    *,
    generator: torch.Generator,
    should_stop: Callable[[Tensor, Tensor], bool] | None = None,
    basis_device: torch.device | str | None = None,
) -> BlockLanczosRun:
    """Run block Lanczos with full reorthogonalization (see the module for the algorithm).

    Args:
        op: the symmetric operator.
        start: ``(b, dim)`` start block (orthonormalized here; dependent columns are replaced
            by random ones); this process's part of it for a sharded operator.
        max_steps: at most this many block steps (capped so that b · steps ≤ ``dim``); each
            is one ``op.matmat`` of b columns.
        generator: CPU generator for the vectors replacing lost directions.
        should_stop: ``should_stop(T, B) -> bool`` called after every step with the float64
            block tridiagonal so far (``(j b, j b)``, CPU) and the last coupling block; True
            ends the run.
        basis_device: where the basis is kept, as in :func:`~.lanczos.lanczos`: default the
            operator's device, ``"cpu"``, or ``"auto"`` (the device up to
            :func:`~.lanczos.device_budget`, host memory past it).

    Returns:
        A :class:`BlockLanczosRun`.

    Raises:
        ValueError: if ``start`` holds more vectors than ``dim``.

    Cost: b products per step, as one block; the basis read four times per step (coefficients
    and combination, twice); one device-to-host transfer per step (b + 2 to 2b + 2 at an
    ill-conditioned or rank-deficient block). Memory: the basis, b · steps · P numbers (plus a
    chunk, :class:`~.basis.Basis`), and a few b · P blocks.
    """
    sp = space_of(op)
    b, local = start.shape
    if b > op.dim:
        raise ValueError(f"`start` must hold at most `dim` = {op.dim} vectors, got {b}.")
    m = min(int(max_steps), op.dim // b)
    dtype, device = op.dtype, op.device
    basis = new_basis(op, 1, local, basis_device)
    qr = _BlockQR(sp, basis, dtype, generator)
    Q, _, _, finite = qr(start.T.to(dtype=dtype, device=device, copy=True))
    qr.scale = 0.0  # the start's own norm is not the operator's scale (rounding noise is ε‖H‖)
    T = torch.zeros(0, 0, dtype=torch.float64)
    B = torch.zeros(b, b, dtype=torch.float64)
    before, steps = op.num_matvecs, 0
    for j in range(m if finite else 0):
        for i in range(b):
            basis.append(Q[:, i][None])
        W = op.matmat(Q)
        W = W if writable(W.T, Q.T) else W.clone()  # written in place: never the input's
        Q, A, B_next, finite = qr(W, fill=j + 1 < m)
        del W
        n = T.shape[0]
        grown = torch.zeros(n + b, n + b, dtype=torch.float64)
        grown[:n, :n], grown[n:, n:] = T, A
        if n:
            grown[n:, n - b : n], grown[n - b : n, n:] = B, B.T
        T, B, steps = grown, B_next, j + 1
        if not finite or (should_stop is not None and should_stop(T, B)):
            break
    return BlockLanczosRun(T, B, basis, b, steps, op.num_matvecs - before, finite)


def block_top_eigenvalues(
    op: LinearOperator,
    k: int = 1,
    *,
    block: int = 4,
    which: Which = "largest",
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    seed: int | None = None,
    basis_device: torch.device | str | None = None,
) -> EigenResult:
    """The k largest (or most negative) eigenvalues of a symmetric operator by block Lanczos.

    :func:`~.eigen.top_eigenvalues` with blocks of ``block`` products (opt-in: faster where a
    block of products costs less than its products one at a time, e.g. vmapped on a GPU). It
    stops when each wanted Ritz pair has residual ‖Hx − θx‖ = ‖B s_last‖ within ``tol`` (as
    :func:`.top_eigenvalues`: relative to each eigenvalue, after at least 2k + 1 products).

    Args:
        op: the operator (e.g. :class:`HessianOperator`).
        k: how many eigenvalues.
        block: vectors per block (products per step).
        which: ``"largest"`` (largest first) or ``"smallest"`` (most negative first).
        tol: residual tolerance relative to the spectral scale.
        max_matvecs: cap on products (rounded down to a multiple of ``block``); default
            ``min(dim, max(100, 20 k))``.
        seed: seed of the start block; ``None`` draws one (broadcast from rank 0).
        basis_device: where the basis is kept, as in :func:`~.eigen.top_eigenvalues`.

    Returns:
        An :class:`~.eigen.EigenResult`; ``num_matvecs`` is a multiple of ``block``.

    Raises:
        TypeError: if ``k``, ``block``, ``max_matvecs`` or ``seed`` is not an int, or
            ``basis_device`` is not a device.
        ValueError: if ``k`` or ``block`` is not in [1, dim], ``which`` is unknown, ``tol`` is
            not positive, ``max_matvecs`` is smaller than ``k`` or ``block``, or whole blocks
            within min(dim, ``max_matvecs``) hold fewer than ``k`` products.

    Cost: ``block`` products per step, in one block. Memory: the basis (products × P numbers,
    on ``basis_device``) plus a few ``block`` × P blocks.
    """
    _validate(k, which, tol, max_matvecs)
    check_positive_int("block", block)
    basis_device = check_basis_device(basis_device)
    for name, value in (("k", k), ("block", block)):
        if value > op.dim:
            raise ValueError(f"`{name}` must be at most the dimension {op.dim}, got {value}.")
        if max_matvecs is not None and max_matvecs < value:
            msg = f"`max_matvecs` must be at least `{name}` = {value}, got {max_matvecs}."
            raise ValueError(msg)
    gen = make_generator(resolve_seed(seed, op.distributed))
    limit = min(op.dim, max_matvecs if max_matvecs is not None else max(100, 20 * k))
    if (limit // block) * block < k:  # whole blocks only: fewer than k Ritz values otherwise
        raise ValueError(
            f"`k` = {k} needs more products than whole blocks of `block` = {block} give within "
            f"min(dim, max_matvecs) = {limit}."
        )
    start = space_of(op).draw(gaussian, (block, op.dim), gen)
    whole = (limit // block) * block  # the most products whole blocks allow
    stop = lambda T, B: _converged(T, B, k, which, tol, op.dim, whole)  # noqa: E731
    run = block_lanczos(
        op, start, limit // block, generator=gen, should_stop=stop, basis_device=basis_device
    )
    if not run.finite:
        nan = torch.full((k,), math.nan, dtype=torch.float64)
        vecs = torch.full((run.vectors.dim, k), math.nan, dtype=op.dtype, device=op.device)
        return EigenResult(nan, vecs, nan.clone(), run.num_matvecs, False, op.product_error)
    theta, S, res = run.ritz()
    res = floored(res, theta, op.dtype)
    idx = wanted(theta, k, which)
    vecs = run.vectors.combine(S[:, idx], device=op.device)
    exhausted = run.T.shape[0] >= op.dim
    converged = _converged(run.T, run.coupling, k, which, tol, op.dim, whole)
    converged = converged and (exhausted or within(theta, res, k, which, tol))
    return EigenResult(theta[idx], vecs, res[idx], run.num_matvecs, converged, op.product_error)


def _converged(
    T: Tensor, B: Tensor, k: int, which: str, tol: float, dim: int, cap: int | None = None
) -> bool:
    """True when the k wanted Ritz pairs are :func:`.eigen.within` tolerance after at least
    :func:`.eigen.min_steps` products (or the space is exhausted, or a product was not
    finite)."""
    if T.shape[0] < min(min_steps(k, dim), cap or dim):
        return False
    if not torch.isfinite(T).all() or not torch.isfinite(B).all() or T.shape[0] >= dim:
        return True
    theta, _, res = block_ritz(T, B)
    return within(theta, res, k, which, tol)
