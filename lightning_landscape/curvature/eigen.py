"""Extreme eigenvalues by Lanczos (largest, or most negative for saddle directions).

Power iteration (PyHessian) converges at rate λ₂/λ₁, which is often ≈ 0.97 for network Hessians;
Lanczos converges at a rate set by the gap relative to the spread of the spectrum and gives both
ends of the spectrum from one run (Dauphin et al. 2014 for the negative end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from lightning_landscape._core.checks import check_positive_int
from lightning_landscape._core.random import gaussian, make_generator, resolve_seed
from lightning_landscape._core.space import space_of
from lightning_landscape.curvature.basis import check_basis_device
from lightning_landscape.curvature.lanczos import LanczosRun, lanczos, ritz
from lightning_landscape.curvature.linear import LinearOperator

Which = Literal["largest", "smallest"]


@dataclass(frozen=True)
class EigenResult:
    """Extreme eigenpairs from Lanczos.

    Attributes:
        eigenvalues: ``(k,)`` largest first for ``which="largest"``, most negative first for
            ``"smallest"``.
        eigenvectors: ``(dim, k)`` unit Ritz vectors in the operator's dtype.
        residuals: ``(k,)`` Lanczos residual bounds ‖H x − θ x‖ (an eigenvalue lies within this
            distance of each value).
        num_matvecs: operator products spent.
        converged: every residual is within ``tol`` × the spectral scale.
        product_error: estimated relative error of the operator's products (0 when exact;
            finite differences estimate theirs, see :class:`HessianOperator`).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    num_matvecs: int
    converged: bool
    product_error: float = 0.0


def _validate(
    k: int,
    which: str,
    tol: float,
    max_matvecs: int | None,
    names: tuple[str, str] = ("k", "max_matvecs"),
) -> None:
    check_positive_int(names[0], k)
    if which not in ("largest", "smallest"):
        raise ValueError(f"`which` must be 'largest' or 'smallest', got {which!r}.")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 < tol < math.inf:
        raise ValueError(f"`tol` must be a positive number (finite), got {tol!r}.")
    check_positive_int(names[1], max_matvecs, allow_none=True)


def wanted(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the k wanted Ritz values, in reporting order."""
    k = min(k, theta.numel())
    idx = torch.arange(theta.numel())
    return idx.flip(0)[:k] if which == "largest" else idx[:k]


def is_converged(
    alphas: Tensor, betas: Tensor, k: int, which: str, tol: float, dim: int, cap: int | None = None
) -> bool:
    """True when the k wanted Ritz pairs are :func:`within` tolerance, after at least
    :func:`min_steps` steps, or all the ``cap`` allows (or the space is exhausted)."""
    if alphas.numel() < min(min_steps(k, dim), cap or dim):
        return False
    if not torch.isfinite(alphas).all() or not torch.isfinite(betas).all():
        return True
    if alphas.numel() >= dim:
        return True
    theta, _, res = ritz(alphas, betas)
    return within(theta, res, k, which, tol)


#: Below this share of max|θ| a wanted largest Ritz value is judged on the spectrum's scale.
BULK = 1e-2


def min_steps(k: int, dim: int) -> int:
    """Products before convergence can be declared: 2k + 1 (as ARPACK's default subspace), at
    most ``dim``. With k steps all k Ritz values are wanted and an eigenvalue the Krylov space
    has not reached yet goes unseen: top-4 of a spectrum 1000, 10, 9.5, 9 and a bulk in [0, 1]
    "converged" after 4 products at 0.80 and 0.21 for 9.5 and 9."""
    return min(2 * k + 1, dim)


def within(theta: Tensor, res: Tensor, k: int, which: str, tol: float) -> bool:
    """True when the k wanted of the Ritz values ``theta`` have residuals ``res`` within
    tolerance: for the largest, ≤ tol · max(|θᵢ|, ``BULK`` · max|θ|), each to its own relative
    accuracy (a bound tol · max|θ| let eigenvalues a hundredth of the largest come out wrong by
    the gaps between them); for the most negative, ≤ tol · max|θ|, the spectrum's scale (a
    saddle's curvature is read against the sharpest)."""
    scale = theta.abs().max().clamp(min=torch.finfo(torch.float64).tiny)
    idx = wanted(theta, k, which)
    bound = tol * (torch.clamp(theta[idx].abs(), min=BULK * scale) if which == "largest" else scale)
    return bool((res[idx] <= bound).all())


def extract(
    run: LanczosRun,
    k: int,
    which: str,
    tol: float,
    num_matvecs: int,
    dim: int,
    device: torch.device | None = None,
    cap: int | None = None,
) -> EigenResult:
    """Ritz pairs of chain 0 of a run, as an :class:`EigenResult` (vectors on ``device``,
    default where the basis lives)."""
    device = device or run.vectors.device
    if not run.finite:
        nan = torch.full((k,), float("nan"), dtype=torch.float64)
        local = run.vectors.dim  # this process's part of a vector (all of it unless sharded)
        vecs = torch.full((local, k), float("nan"), dtype=run.vectors.dtype, device=device)
        return EigenResult(nan, vecs, nan.clone(), num_matvecs, False)
    theta, S, res = run.ritz(0)
    res = floored(res, theta, run.vectors.dtype)
    idx = wanted(theta, k, which)
    vecs = run.vectors.combine(S[:, idx], device=device)
    converged = is_converged(run.alphas[0], run.betas[0], k, which, tol, dim, cap)
    converged = converged and (run.alphas[0].numel() >= dim or within(theta, res, k, which, tol))
    return EigenResult(theta[idx], vecs, res[idx], num_matvecs, converged)


def floored(res: Tensor, theta: Tensor, dtype: torch.dtype) -> Tensor:
    """Residuals no smaller than the products' rounding, 10 ε max|θ| in their dtype: Lanczos's
    |β s| went on shrinking past it (float32 at tol 1e-12: 1.7e-12 reported and converged,
    5.1e-7 true), so a tolerance below what the dtype can deliver is reported unmet."""
    return res.clamp(min=10 * torch.finfo(dtype).eps * float(theta.abs().max()))


def top_eigenvalues(
    op: LinearOperator,
    k: int = 1,
    *,
    which: Which = "largest",
    tol: float = 1e-3,
    max_matvecs: int | None = None,
    seed: int | None = None,
    basis_device: torch.device | str | None = None,
) -> EigenResult:
    """The k largest (or most negative) eigenvalues of a symmetric operator by Lanczos.

    Lanczos with full reorthogonalization from a random Gaussian start (the same on every rank);
    it stops, after at least 2k + 1 products, when each wanted Ritz pair has residual
    ‖Hx − θx‖ ≤ ``tol`` · max(|θ|, max|θ|/100) (largest; most negative: ``tol`` · max|θ|),
    since an eigenvalue lies within the residual of each Ritz value (and within
    residual²/gap once separated).

    Args:
        op: the operator (e.g. :class:`HessianOperator`).
        k: how many eigenvalues.
        which: ``"largest"`` (algebraically largest, largest first) or ``"smallest"`` (most
            negative first).
        tol: residual tolerance, relative to each eigenvalue (largest; at least a hundredth
            of the spectral scale) or to the spectral scale (most negative).
        max_matvecs: cap on products; default ``min(dim, max(100, 20 k))``.
        seed: seed of the start vector; ``None`` draws one (broadcast from rank 0).
        basis_device: where the Lanczos basis is kept (default the operator's device);
            ``"cpu"`` keeps it in host memory when steps × P does not fit the accelerator,
            ``"auto"`` on the device up to the operator's memory budget and on the host past it.

    Returns:
        An :class:`EigenResult`; ``converged`` is False if the cap was hit first, and values are
        NaN if a product was not finite.

    Raises:
        TypeError: if ``k``, ``max_matvecs`` or ``seed`` is not an int, or ``basis_device`` is
            not a device.
        ValueError: if ``k`` is not in [1, dim], ``which`` is unknown, ``tol`` is not positive,
            or ``max_matvecs`` is smaller than ``k``.

    Cost: one product per Lanczos step (typically 10-40 for k = 1 at tol 1e-3). Memory: the
    basis grows with the steps taken (steps · P numbers, on ``basis_device``) plus a few
    P-vectors, on top of what a product needs (see :class:`HessianOperator`).
    """
    _validate(k, which, tol, max_matvecs)
    basis_device = check_basis_device(basis_device)
    if k > op.dim:
        raise ValueError(f"`k` must be at most the dimension {op.dim}, got {k}.")
    if max_matvecs is not None and max_matvecs < k:
        raise ValueError(f"`max_matvecs` must be at least `k` = {k}, got {max_matvecs}.")
    gen = make_generator(resolve_seed(seed, op.distributed))
    limit = min(op.dim, max_matvecs if max_matvecs is not None else max(100, 20 * k))
    start = space_of(op).draw(gaussian, (1, op.dim), gen)
    before = op.num_matvecs

    def stop(alphas: Tensor, betas: Tensor) -> bool:
        return is_converged(alphas[0], betas[0], k, which, tol, op.dim, limit)

    run = lanczos(op, start, limit, generator=gen, should_stop=stop, basis_device=basis_device)
    res = extract(run, k, which, tol, op.num_matvecs - before, op.dim, op.device, limit)
    return replace(res, product_error=op.product_error)
