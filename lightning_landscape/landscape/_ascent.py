"""Gradient ascents of the worst-case sharpness measures on the true loss (pure torch).

Both keep the largest loss among the points they evaluate (a lower bound of the maximum; a NaN
loss wins and stays) and stop early at a fixed point.

- :func:`ball_ascent`: δ ← Proj_ρ(δ + ρ d/‖d‖), d the gradient in the coordinates δ = ε / scale.
  Its fixed points satisfy δ ∥ ∇ (the first-order condition of the ball maximum); from δ = 0 at
  the minimum of a quadratic it is a shifted power iteration, at half its rate.
- :func:`box_ascent`: ε ← c ⊙ sign(∇L(w+ε)), the projection of ε + a∇L on the box |εᵢ| ≤ cᵢ as
  a → ∞ (for a convex loss each step can only increase it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_landscape._core.random import gaussian


def better(loss: float, best: float) -> bool:
    """Whether ``loss`` replaces the best so far (a NaN loss wins and stays)."""
    return not math.isnan(best) and (math.isnan(loss) or loss > best)


def ball_ascent(
    objective,
    w: Tensor,
    rho: float,
    eps_of: Callable[[Tensor], Tensor],
    delta: Tensor,
    steps: int,
    generator: torch.Generator,
    grad: Tensor | None = None,
) -> tuple[float, Tensor]:
    """``steps`` projected steps from ``delta`` (where ``grad``, if given, is the gradient: its
    loss is then not evaluated), then one loss: ``steps`` gradients (``steps - 1`` with
    ``grad``) and one loss. At δ = 0 with a zero gradient the first direction is random.

    Returns:
        The largest loss evaluated and its perturbation ε.
    """
    best, best_eps = -math.inf, torch.zeros_like(w)
    for k in range(steps):
        if k > 0 or grad is None:
            loss, grad = objective.value_and_grad(w + eps_of(delta))
            if better(loss, best):
                best, best_eps = loss, eps_of(delta)
        direction = eps_of(grad)  # scale ⊙ ∇L: the gradient in δ
        norm = float(direction.norm())
        if not math.isfinite(norm):
            return math.nan, best_eps
        if norm == 0.0:
            if k > 0 or bool(delta.any()):  # a stationary point: nothing to climb
                return best, best_eps
            direction = gaussian(tuple(w.shape), generator, w.dtype, w.device)
            norm = float(direction.norm())
        delta = delta + (rho / norm) * direction
        length = float(delta.norm())
        if length > rho:
            delta = delta * (rho / length)
    loss = objective.value(w + eps_of(delta))
    if better(loss, best):
        best, best_eps = loss, eps_of(delta)
    return best, best_eps


def box_ascent(
    objective,
    w: Tensor,
    box: Tensor,
    eps: Tensor,
    steps: int,
    generator: torch.Generator,
    grad: Tensor | None = None,
) -> tuple[float, Tensor]:
    """Up to ``steps`` corner steps from ``eps`` (where ``grad``, if given, is the gradient: its
    loss is then not evaluated), each a gradient, and a loss at the last corner if not yet
    evaluated. Coordinates with zero gradient keep their value; from ε = 0 with a zero gradient
    the first corner is random. Stops at a fixed corner.

    Returns:
        The largest loss evaluated and its perturbation ε.
    """
    best, best_eps, evaluated = -math.inf, eps, False
    for k in range(steps):
        if k > 0 or grad is None:
            loss, grad = objective.value_and_grad(w + eps)
            evaluated = True
            if better(loss, best):
                best, best_eps = loss, eps
        if not torch.isfinite(grad).all():
            return math.nan, best_eps
        sign = torch.sign(grad)
        if k == 0 and not sign.any() and not eps.any():
            bits = torch.randint(0, 2, tuple(w.shape), generator=generator)
            sign = (bits.to(w.dtype) * 2 - 1).to(w.device)
        new = torch.where(sign != 0, box * sign, eps)
        if evaluated and torch.equal(new, eps):
            break
        eps, evaluated = new, False
    if not evaluated:
        loss = objective.value(w + eps)
        if better(loss, best):
            best, best_eps = loss, eps
    return best, best_eps
