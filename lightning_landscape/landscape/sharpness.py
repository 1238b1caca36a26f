"""Sharpness of a minimum: worst case in a ball (SAM), in a weight-scaled ball (ASAM), in
Keskar's box, and on average under Gaussian noise (pure torch).

Every measure takes an objective, ``value(w)`` and ``value_and_grad(w)`` of the loss at flat
weights ``w``: :class:`FunctionObjective` wraps a function of a flat tensor (a quadratic in the
tests), :class:`BatchObjective` the mean loss of fixed batches at moved parameters (reduced across
ranks, parameters restored bit for bit from a saved copy after every evaluation).

- SAM ρ-sharpness (Foret et al. 2021): max over ‖ε‖₂ ≤ ρ of L(w+ε) − L(w); at the minimum of a
  quadratic ρ² λ_max / 2.
- Adaptive sharpness (ASAM, Kwon et al. 2021): the same under ‖ε / (|w| + η)‖₂ ≤ ρ; with η = 0
  invariant under the layer rescalings of Dinh et al. 2017 ("Sharp minima can generalize").
- Keskar et al. 2017 ε-sharpness: 100 · [max over |εᵢ| ≤ ε(|wᵢ| + 1) of L(w+ε) − L(w)] / (1 + L(w)).
- Average-case (Jiang et al. 2020; Andriushchenko et al. 2023): E over ε ~ N(0, σ² I) of
  L(w+ε) − L(w), signed; σ² tr(H) / 2 on a quadratic.

Worst cases are found by ascent and are lower bounds of the maxima.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_landscape._core.checks import check_int, check_positive, check_real
from lightning_landscape._core.random import gaussian
from lightning_landscape.landscape._objectives import BatchObjective as BatchObjective
from lightning_landscape.landscape._objectives import FunctionObjective as FunctionObjective
from lightning_landscape.landscape._objectives import Objective


@dataclass(frozen=True)
class SharpnessResult:
    """One sharpness measurement.

    Attributes:
        sharpness: the measure (Keskar's is normalized and in percent).
        stderr: standard error (average case; NaN for the worst cases).
        loss: L(w).
        perturbed_loss: the largest L(w+ε) found (worst cases) or the mean (average case).
        perturbation: the perturbation ε that gave the largest loss (worst cases) or None.
        num_forward, num_backward: cost of this call (passes counted by the objective).
    """

    sharpness: float
    stderr: float
    loss: float
    perturbed_loss: float
    perturbation: Tensor | None
    num_forward: int
    num_backward: int


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(0)
    return generator


def _better(loss: float, best: float) -> bool:
    """Whether ``loss`` replaces the best so far (a NaN loss wins and stays)."""
    return not math.isnan(best) and (math.isnan(loss) or loss > best)


def _start(objective: Objective, w: Tensor, base: tuple[float, Tensor] | None):
    before = (objective.num_forward, objective.num_backward)
    loss0, grad0 = base if base is not None else objective.value_and_grad(w)
    return before, float(loss0), grad0


def _cost(objective: Objective, before: tuple[int, int]) -> tuple[int, int]:
    return objective.num_forward - before[0], objective.num_backward - before[1]


def ball_sharpness(
    objective: Objective,
    w: Tensor,
    rho: float,
    *,
    scale: Tensor | None = None,
    steps: int = 10,
    generator: torch.Generator | None = None,
    base: tuple[float, Tensor] | None = None,
) -> SharpnessResult:
    """max over ‖ε / scale‖₂ ≤ ρ of L(w+ε) − L(w), by normalized gradient ascent.

    In δ = ε / scale the constraint is the Euclidean ball ‖δ‖ ≤ ρ and the gradient is
    scale ⊙ ∇L(w + scale ⊙ δ). Each step is δ ← Proj_ρ(δ + ρ d/‖d‖) from δ = 0, so one step is
    SAM's (and ASAM's) first-order ε = ρ scale² ⊙ ∇L / ‖scale ⊙ ∇L‖; at the minimum of a quadratic
    the iteration converges to the top eigenvector as a shifted power iteration. Where ∇L(w) = 0
    (an exact minimum) the first direction is random (from ``generator``). The largest loss among
    the iterates is kept: a lower bound of the maximum.

    Args:
        objective: the loss at flat weights.
        w: the weights (flat).
        rho: the radius ρ > 0.
        scale: per-coordinate scale of the ball (None: the Euclidean ball).
        steps: ascent steps (≥ 1): ``steps - 1`` gradients and one loss beyond the base point.
        generator: CPU generator of the random start (identical on every rank).
        base: ``(L(w), ∇L(w))`` when already known.

    Returns:
        A :class:`SharpnessResult` (``stderr`` NaN).

    Raises:
        TypeError, ValueError: on an invalid ``rho`` or ``steps``.
    """
    rho = check_positive("rho", rho)
    steps = check_int("steps", steps, low=1, what="an int >= 1")
    before, loss0, grad = _start(objective, w, base)
    delta = torch.zeros_like(w)
    best, best_eps = -math.inf, torch.zeros_like(w)

    def eps_of(d: Tensor) -> Tensor:
        return d if scale is None else scale * d

    for k in range(steps):
        if k > 0:
            loss, grad = objective.value_and_grad(w + eps_of(delta))
            if _better(loss, best):
                best, best_eps = loss, eps_of(delta)
        direction = grad if scale is None else scale * grad
        norm = float(direction.norm())
        if not math.isfinite(norm):
            best = math.nan
            break
        if norm == 0.0:
            if k > 0:  # a stationary point inside the ball: nothing to climb
                break
            direction = gaussian(tuple(w.shape), _generator(generator), w.dtype, w.device)
            norm = float(direction.norm())
        delta = delta + (rho / norm) * direction
        length = float(delta.norm())
        if length > rho:
            delta = delta * (rho / length)
    else:
        loss = objective.value(w + eps_of(delta))
        if _better(loss, best):
            best, best_eps = loss, eps_of(delta)
    fwd, bwd = _cost(objective, before)
    return SharpnessResult(best - loss0, math.nan, loss0, best, best_eps, fwd, bwd)


def sam_sharpness(
    objective: Objective, w: Tensor, rho: float, *, steps: int = 10, **kwargs: Any
) -> SharpnessResult:
    """SAM ρ-sharpness (Foret et al. 2021): max over ‖ε‖₂ ≤ ρ of L(w+ε) − L(w).

    See :func:`ball_sharpness` (``generator`` and ``base`` are passed on). ρ²λ_max/2 at the
    minimum of a quadratic with Hessian eigenvalues λ.
    """
    return ball_sharpness(objective, w, rho, steps=steps, **kwargs)


def adaptive_sharpness(
    objective: Objective,
    w: Tensor,
    rho: float,
    *,
    eta: float = 0.01,
    steps: int = 10,
    **kwargs: Any,
) -> SharpnessResult:
    """Adaptive sharpness (ASAM, Kwon et al. 2021): max over ‖ε / (|w| + η)‖₂ ≤ ρ.

    With η = 0 the measure is invariant under any rescaling w ↦ Dw (D positive diagonal) that
    leaves the loss unchanged, as scaling a ReLU layer up and the next one down (Dinh et al.
    2017). See :func:`ball_sharpness`.

    Raises:
        TypeError, ValueError: on invalid ``rho``, ``steps`` or ``eta`` (must be ≥ 0).
    """
    check_real("eta", eta, low=0.0, what="a non-negative number")
    return ball_sharpness(objective, w, rho, scale=w.abs() + eta, steps=steps, **kwargs)


def keskar_sharpness(
    objective: Objective,
    w: Tensor,
    epsilon: float = 1e-3,
    *,
    steps: int = 10,
    generator: torch.Generator | None = None,
    base: tuple[float, Tensor] | None = None,
) -> SharpnessResult:
    """Keskar et al. 2017 ε-sharpness, in percent:
    100 · [max over the box |εᵢ| ≤ cᵢ = ε(|wᵢ| + 1) of L(w+ε) − L(w)] / (1 + L(w)).

    Projected gradient ascent with the full step: projecting ε + a∇L on the box as a → ∞ gives
    the corner c ⊙ sign(∇L) (the maximizer of the linearized loss over the box; for a convex loss
    each step can only increase it). Coordinates with zero gradient keep their value; at an exact
    minimum the first corner is random. Stops at a fixed corner or after ``steps`` steps and keeps
    the largest loss: a lower bound of the maximum (Keskar et al. used L-BFGS-B).

    Args:
        objective, w, steps, generator, base: as in :func:`ball_sharpness`.
        epsilon: the box size ε > 0 (Keskar et al.: 1e-3 and 5e-4).

    Raises:
        TypeError, ValueError: on an invalid ``epsilon`` or ``steps``.
    """
    epsilon = check_positive("epsilon", epsilon)
    steps = check_int("steps", steps, low=1, what="an int >= 1")
    before, loss0, grad = _start(objective, w, base)
    box = epsilon * (w.abs() + 1)
    eps = torch.zeros_like(w)
    best, best_eps, evaluated = -math.inf, eps, False
    for k in range(steps):
        if k > 0:
            loss, grad = objective.value_and_grad(eps + w)
            evaluated = True
            if _better(loss, best):
                best, best_eps = loss, eps
        sign = torch.sign(grad)
        if not torch.isfinite(grad).all():
            best = math.nan
            evaluated = True
            break
        if k == 0 and not sign.any():
            bits = torch.randint(0, 2, tuple(w.shape), generator=_generator(generator))
            sign = (bits.to(w.dtype) * 2 - 1).to(w.device)
        new = torch.where(sign != 0, box * sign, eps)
        if k > 0 and torch.equal(new, eps):
            break
        eps, evaluated = new, False
    if not evaluated:
        loss = objective.value(w + eps)
        if _better(loss, best):
            best, best_eps = loss, eps
    fwd, bwd = _cost(objective, before)
    value = 100.0 * (best - loss0) / (1.0 + loss0)
    return SharpnessResult(value, math.nan, loss0, best, best_eps, fwd, bwd)


def average_sharpness(
    objective: Objective,
    w: Tensor,
    sigma: float,
    *,
    samples: int = 10,
    generator: torch.Generator | None = None,
    base_loss: float | None = None,
) -> SharpnessResult:
    """Average-case sharpness E over ε ~ N(0, σ² I) of L(w+ε) − L(w), signed, with its stderr.

    Antithetic pairs: each direction ε is evaluated at w + ε and w − ε and the pair contributes
    (L(w+ε) + L(w−ε))/2 − L(w): unbiased, and the first-order term g·ε, which dominates the plain
    Monte-Carlo variance away from a minimum, cancels. The stderr is the sample standard
    deviation of the pair values over √samples. σ² tr(H)/2 on a quadratic.

    Args:
        objective, w: as in :func:`ball_sharpness`.
        sigma: the noise level σ > 0.
        samples: directions (≥ 2), two losses each.
        generator: CPU generator of the directions (identical on every rank).
        base_loss: L(w) when already known.

    Raises:
        TypeError, ValueError: on an invalid ``sigma`` or ``samples``.
    """
    sigma = check_positive("sigma", sigma)
    samples = check_int("samples", samples, low=2, what="an int >= 2")
    before = (objective.num_forward, objective.num_backward)
    loss0 = float(base_loss) if base_loss is not None else objective.value(w)
    gen = _generator(generator)
    values = []
    for _ in range(samples):
        eps = sigma * gaussian(tuple(w.shape), gen, w.dtype, w.device)
        values.append((objective.value(w + eps) + objective.value(w - eps)) / 2 - loss0)
    v = torch.tensor(values, dtype=torch.float64)
    mean, stderr = float(v.mean()), float(v.std() / math.sqrt(samples))
    fwd, bwd = _cost(objective, before)
    return SharpnessResult(mean, stderr, loss0, mean + loss0, None, fwd, bwd)
