"""The ball maximum of a quadratic model, in a Krylov space of the Hessian (pure torch).

A worst case in a ball, max over ‖δ‖ ≤ ρ of L(w+δ) − L(w), is to second order the trust-region
problem max over ‖δ‖ ≤ ρ of m(δ) = gᵀδ + ½ δᵀHδ. Its global solution (Moré & Sorensen 1983) is
δ = (μI − H)⁻¹ g with μ ≥ max(λ_max(H), 0) and μ (ρ − ‖δ‖) = 0; in the "hard case" (g orthogonal
to the top eigenspace) δ adds a multiple of a top eigenvector to reach the sphere. At a minimum
(g = 0) the maximum is ρ² max(λ_max, 0) / 2: negative curvature can never win, however large.

The problem is solved in the Krylov space of H started from g (Lanczos, as in GLTR, Gould et al.
1999): m Lanczos steps give H ≈ Q T Qᵀ with g = ‖g‖ q₁, and the small problem in T is solved
exactly. Lanczos converges to the top of the spectrum at a rate set by the gap relative to the
spread, where the normalized ascent step δ ← ρ∇L(w+δ)/‖∇L(w+δ)‖ is a power iteration (rate
λ₂/λ₁, and it follows the largest |λ|, negative curvature included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_landscape._core.checks import check_int
from lightning_landscape._core.random import gaussian
from lightning_landscape.curvature.lanczos import lanczos
from lightning_landscape.curvature.operator import LinearOperator
from lightning_landscape.landscape._objectives import Objective


def ball_max_dense(T: Tensor, b: Tensor, rho: float) -> tuple[Tensor, float]:
    """The global maximizer of bᵀy + ½ yᵀTy over ‖y‖ ≤ ρ for a small symmetric T, and the
    maximum (float64, by eigendecomposition and bisection on the multiplier μ).

    Where ‖b‖ / ρ is below the rounding of the largest |λ| (a gradient at round-off level: a
    stationary point to working precision), μ cannot be resolved from λ_max: the hard case's
    solution is taken (the sphere filled along a top eigenvector, the sign of b's component
    there), whose value is off by at most ‖b‖ ρ. The maximizer returned is always in the ball.
    """
    T, b = T.double(), b.double()
    lam, V = torch.linalg.eigh(T)
    c = V.T @ b
    top = float(lam[-1])
    scale = max(float(lam.abs().max()), float(b.norm()) / rho, 1e-300)

    def y_of(mu: float) -> Tensor:
        return c / (mu - lam)

    if top < 0 and float(y_of(0.0).norm()) <= rho:  # concave, interior maximizer
        y = y_of(0.0)
    else:
        low = max(top, 0.0)
        near = lam >= low - 1e-10 * scale  # the top eigenspace (if λ_max ≥ 0)
        rest = torch.where(near, torch.zeros_like(c), c / (low - lam).clamp(min=1e-300))
        hard = float(c[near].norm()) <= 1e-12 * float(b.norm()) + 1e-300 and rest.norm() <= rho
        width = float(b.norm()) / rho  # μ − λ_max is at most this
        eps = torch.finfo(torch.float64).eps
        unresolved = bool(near.any()) and width <= 64 * eps * scale  # scale ≥ |λ| ≥ λ_max
        if hard or unresolved:  # μ = λ_max: fill the sphere along a top eigenvector
            y = rest * min(1.0, rho / max(float(rest.norm()), 1e-300))
            index = int(torch.nonzero(near)[-1])
            fill = math.sqrt(max(rho**2 - float(y.norm()) ** 2, 0.0))
            y[index] = math.copysign(fill, float(c[index]))
        else:
            lo, hi = low, low + width + 1e-300
            for _ in range(200):  # ‖y(μ)‖ decreases on (λ_max, ∞)
                mid = 0.5 * (lo + hi)
                if mid <= lo or mid >= hi:
                    break
                if float(y_of(mid).norm()) > rho:
                    lo = mid
                else:
                    hi = mid
            y = y_of(hi)
        if float(y.norm()) > rho:  # rounding: back onto the sphere
            y = y * (rho / float(y.norm()))
    value = float(c @ y + 0.5 * (lam * y * y).sum())
    return V @ y, value


class ScaledOperator(LinearOperator):
    """S H S for a positive diagonal S (a vector): the Hessian in the coordinates δ = ε / S of a
    weight-scaled ball or box."""

    def __init__(self, op: LinearOperator, scale: Tensor) -> None:
        super().__init__()
        self.op, self.scale = op, scale
        self.dim, self.dtype, self.device = op.dim, op.dtype, op.device
        self.distributed = op.distributed

    def _matmat(self, Vt: Tensor) -> Tensor:
        return (self.op.matmat((Vt * self.scale).T).T) * self.scale


@dataclass(frozen=True)
class KrylovModel:
    """The quadratic model m(δ) = gᵀδ + ½ δᵀHδ on a Krylov space of H started from g:
    δ = Qᵀy with y in the space, gᵀδ = ‖g‖ y₁ and δᵀHδ = yᵀTy (Lanczos, Q orthonormal).

    Attributes:
        basis: ``(m, dim)`` orthonormal rows Q (from g; from a random vector where g = 0).
        tridiagonal: ``(m, m)`` float64 T = Q H Qᵀ.
        grad_norm: ‖g‖.
        finite: False if a product was not finite (every maximum is then NaN).
    """

    basis: Tensor
    tridiagonal: Tensor
    grad_norm: float
    finite: bool

    def linear(self) -> Tensor:
        b = torch.zeros(self.tridiagonal.shape[0], dtype=torch.float64)
        b[0] = self.grad_norm  # Qg = ‖g‖ e₁ (zero when the start was random)
        return b

    def ball_max(self, rho: float) -> tuple[Tensor, float]:
        """The model's maximizer over ‖δ‖ ≤ ρ in the space, and the model maximum."""
        if not self.finite:
            return torch.full_like(self.basis[0], math.nan), math.nan
        y, value = ball_max_dense(self.tridiagonal, self.linear(), rho)
        return self.lift(y), value

    def lift(self, y: Tensor) -> Tensor:
        return self.basis.T @ y.to(self.basis.dtype).to(self.basis.device)

    def corners(self, radius: float, count: int = 3) -> list[Tensor]:
        """Sign vectors s ∈ {−1, 1}^dim to try as maximizers of m over the cube |sᵢ| ≤ 1: the
        signs of the ball maximizer of radius ``radius`` (√dim: the ball through the corners)
        and of the top ``count`` Ritz vectors (oriented along g)."""
        if not self.finite:
            return []
        _, S = torch.linalg.eigh(self.tridiagonal)
        out = [self.lift(ball_max_dense(self.tridiagonal, self.linear(), radius)[0])]
        for j in range(1, min(count, S.shape[1]) + 1):
            y = S[:, -j] * (-1.0 if S[0, -j] < 0 else 1.0)
            out.append(self.lift(y))
        return [torch.where(v < 0, -1.0, 1.0).to(v.dtype) for v in out]


def krylov_model(
    op: LinearOperator, g: Tensor, steps: int, generator: torch.Generator
) -> KrylovModel:
    """:class:`KrylovModel` of ``op`` from ``g`` by ``steps`` Lanczos steps (the curvature
    engine's, full reorthogonalization), from a random vector of ``generator`` where g = 0.

    Cost: ``steps`` products (capped at dim); memory ``steps`` vectors of the operator's size.
    """
    norm = float(g.norm())
    start = g if norm > 0 else gaussian((op.dim,), generator, op.dtype, op.device)
    run = lanczos(op, start[None].to(op.dtype), steps, generator=generator)
    T = run.tridiagonal(0)
    return KrylovModel(run.basis[0], T, norm, run.finite and bool(torch.isfinite(T).all()))


def curvature_model(
    objective: Objective,
    w: Tensor,
    grad: Tensor,
    *,
    scale: Tensor | None = None,
    steps: int = 20,
    generator: torch.Generator | None = None,
) -> KrylovModel:
    """The second-order model gᵀδ + ½δᵀHδ of L(w + scale ⊙ δ) − L(w) on a Krylov space: ``steps``
    Lanczos steps on scale ⊙ H ⊙ scale from scale ⊙ g (from a random vector of ``generator``
    where g = 0; default seed 0). One model serves every radius of
    :func:`~lightning_landscape.landscape.sharpness.ball_sharpness` (and every ε of
    :func:`~lightning_landscape.landscape.sharpness.keskar_sharpness` with ``scale = |w| + 1``).

    Raises:
        TypeError, ValueError: if ``steps`` is not an int >= 1.

    Cost: ``steps`` Hessian-vector products (the first also builds the gradient graphs, about a
    gradient); memory ``steps`` vectors of P.
    """
    check_int("steps", steps, low=1, what="an int >= 1")
    if generator is None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(0)
    with objective.hessian_at(w) as op:
        op = op if scale is None else ScaledOperator(op, scale)
        g = grad if scale is None else scale * grad
        return krylov_model(op, g, steps, generator)
