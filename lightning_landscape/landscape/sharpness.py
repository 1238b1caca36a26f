"""Sharpness of a minimum: worst case in a ball (SAM), in a weight-scaled ball (ASAM), in
Keskar's box, and on average under Gaussian noise (pure torch).

Every measure takes an objective, ``value(w)``, ``value_and_grad(w)`` and ``hessian_at(w)`` of
the loss at flat weights ``w``: :class:`FunctionObjective` wraps a function of a flat tensor (a
quadratic in the tests), :class:`BatchObjective` the mean loss of fixed batches at moved
parameters (reduced across ranks, parameters restored bit for bit from a saved copy after every
evaluation).

- SAM ρ-sharpness (Foret et al. 2021): max over ‖ε‖₂ ≤ ρ of L(w+ε) − L(w); at the minimum of a
  quadratic ρ² λ_max / 2.
- Adaptive sharpness (ASAM, Kwon et al. 2021): the same under ‖ε / (|w| + η)‖₂ ≤ ρ; with η = 0
  invariant under the layer rescalings of Dinh et al. 2017 ("Sharp minima can generalize").
- Keskar et al. 2017 ε-sharpness: 100 · [max over |εᵢ| ≤ ε(|wᵢ| + 1) of L(w+ε) − L(w)] / (1 + L(w)).
- Average-case (Jiang et al. 2020; Andriushchenko et al. 2023): E over ε ~ N(0, σ² I) of
  L(w+ε) − L(w), signed; σ² tr(H) / 2 on a quadratic.

Each result also carries its first-order part, the maximum of the linear term g·ε over the same
set (ρ‖g‖, ρ‖(|w| + η) ⊙ g‖, 100 Σ cᵢ|gᵢ| / (1 + L); zero for the average case, whose antithetic
pairs cancel g·ε), and ``curvature``, the measure minus it. On trained digits networks ρ‖∇L‖ is
a median 44 % (up to 92 %) of SAM and reversed a small- against large-batch ranking relative to
the Hessian's; ``curvature`` reads the ranking without it.

Worst cases (``method="krylov"``, the default) solve the second-order problem max gᵀδ + ½δᵀHδ
in the Krylov space of ``steps`` Lanczos steps on the objective's Hessian (the curvature
engine's, started from g: GLTR, Gould et al. 1999), then climb the true loss from its maximizer
by ``polish`` gradient steps; ``method="gradient"`` climbs from the first-order point. Relative
underestimates, median (worst) (``benchmarks/sharpness_ascent.py``):

- quadratic at its minimum, eigenvalues linspace(0.1, 4, 20), 20 random bases: projected
  gradient 10 % (17 %) at 10 steps, 3.9 % (11 %) at 20; the pure normalized step (a power
  iteration) 4.4 % (11 %) and 0.85 % (10 %), 38 % (75 %) with an added eigenvalue −6, onto which
  it locks; Krylov with 10 polish steps 0.013 % (5.2 %) at 10 products, 4e-8 (0.11 %) at 15,
  exact at 20 (3e-9 in dimension 200 with 180 more eigenvalues in [0, 0.1]); a start from the
  top Lanczos eigenvector ignores g and stays 0.93 % (5 %) low at w* + 0.01 z. The trust-region
  maximum never follows negative curvature: ρ² max(λ_max, 0) / 2 at a stationary point.
- a digits MLP (2,410 parameters, 3 seeds, 100 or 600 training steps, ρ 0.05-0.5): 10 gradient
  steps 0.5-6.9 % (48 %); the Krylov maximizer alone 0.7-9.4 % (47 %), since third-order terms
  move the maximum; with 10 polish steps 7e-5 to 4e-4 (9.5 %).

Worst cases are lower bounds of the maxima.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_landscape._core.checks import check_choice, check_int, check_positive, check_real
from lightning_landscape._core.random import gaussian
from lightning_landscape._core.stats import ONE_SIGMA, student_t_quantile
from lightning_landscape.landscape._ascent import ball_ascent, better, box_ascent
from lightning_landscape.landscape._objectives import BatchObjective as BatchObjective
from lightning_landscape.landscape._objectives import FunctionObjective as FunctionObjective
from lightning_landscape.landscape._objectives import Objective
from lightning_landscape.landscape._trust_region import KrylovModel as KrylovModel
from lightning_landscape.landscape._trust_region import curvature_model as curvature_model

Method = Literal["krylov", "gradient"]


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
        first_order: the maximum of the linear term over the same set, normalized like the
            measure (0 for the average case).
        num_hvp: Hessian-vector products of this call (over single batches).
    """

    sharpness: float
    stderr: float
    loss: float
    perturbed_loss: float
    perturbation: Tensor | None
    num_forward: int
    num_backward: int
    first_order: float = 0.0
    num_hvp: int = 0

    @property
    def curvature(self) -> float:
        """The measure minus its first-order part (signed: negative curvature can make it < 0)."""
        return self.sharpness - self.first_order


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(0)
    return generator


def _counts(objective: Objective) -> tuple[int, int, int]:
    return objective.num_forward, objective.num_backward, objective.num_hvp


def _start(objective: Objective, w: Tensor, base: tuple[float, Tensor] | None):
    before = _counts(objective)
    loss0, grad0 = base if base is not None else objective.value_and_grad(w)
    return before, float(loss0), grad0


def _result(objective, before, value, stderr, loss0, best, eps, first) -> SharpnessResult:
    fwd, bwd, hvp = (a - b for a, b in zip(_counts(objective), before, strict=True))
    return SharpnessResult(value, stderr, loss0, best, eps, fwd, bwd, first, hvp)


def _checks(steps: int, method: str, polish: int) -> None:
    check_int("steps", steps, low=1, what="an int >= 1")
    check_choice("method", method, ("krylov", "gradient"))
    check_int("polish", polish, low=0, what="an int >= 0")


def ball_sharpness(
    objective: Objective,
    w: Tensor,
    rho: float,
    *,
    scale: Tensor | None = None,
    steps: int = 20,
    method: Method = "krylov",
    polish: int = 10,
    generator: torch.Generator | None = None,
    base: tuple[float, Tensor] | None = None,
    model: KrylovModel | None = None,
) -> SharpnessResult:
    """max over ‖ε / scale‖₂ ≤ ρ of L(w+ε) − L(w).

    In δ = ε / scale the constraint is the Euclidean ball ‖δ‖ ≤ ρ, the gradient is
    scale ⊙ ∇L(w + scale ⊙ δ) and the Hessian scale ⊙ H ⊙ scale.

    - ``"krylov"``: the global maximizer of the second-order model in its Krylov space
      (:func:`curvature_model`, ``steps`` products, or ``model``), then ``polish`` steps of
      ``"gradient"`` from there and one loss. ``steps=1`` is SAM's first-order ε = ρ g/‖g‖
      (unless the curvature along g is below −‖g‖/ρ).
    - ``"gradient"``: δ ← Proj_ρ(δ + ρ d/‖d‖) from δ = 0, d the gradient in δ: ``steps - 1``
      gradients and one loss; one step is SAM's (and ASAM's) first-order
      ε = ρ scale² ⊙ ∇L / ‖scale ⊙ ∇L‖. It converges at half the rate of a power iteration.

    Where ∇L(w) = 0 (an exact minimum) the start is random (from ``generator``). The largest loss
    evaluated is kept: a lower bound of the maximum.

    Args:
        objective: the loss at flat weights.
        w: the weights (flat).
        rho: the radius ρ > 0.
        scale: per-coordinate scale of the ball (None: the Euclidean ball).
        steps: Lanczos steps (``"krylov"``) or ascent steps (``"gradient"``), ≥ 1.
        method: ``"krylov"`` or ``"gradient"`` (needs no Hessian-vector product).
        polish: gradient steps after the Krylov maximizer (``"krylov"`` only), ≥ 0.
        generator: CPU generator of the random start (identical on every rank).
        base: ``(L(w), ∇L(w))`` when already known.
        model: a :func:`curvature_model` of this ``scale`` at ``w``, shared between radii.

    Returns:
        A :class:`SharpnessResult` (``stderr`` NaN, ``first_order`` ρ‖scale ⊙ ∇L(w)‖).

    Raises:
        TypeError, ValueError: on an invalid ``rho``, ``steps``, ``method`` or ``polish``.
    """
    rho = check_positive("rho", rho)
    _checks(steps, method, polish)
    before, loss0, grad = _start(objective, w, base)
    gen = _generator(generator)

    def eps_of(d: Tensor) -> Tensor:
        return d if scale is None else scale * d

    if method == "gradient":
        best, eps = ball_ascent(objective, w, rho, eps_of, torch.zeros_like(w), steps, gen, grad)
    else:
        if model is None:
            model = curvature_model(objective, w, grad, scale=scale, steps=steps, generator=gen)
        delta, _ = model.ball_max(rho)
        if torch.isfinite(delta).all():
            best, eps = ball_ascent(objective, w, rho, eps_of, delta, polish, gen)
        else:
            best, eps = math.nan, torch.zeros_like(w)
    first = rho * float(eps_of(grad).norm())
    return _result(objective, before, best - loss0, math.nan, loss0, best, eps, first)


def sam_sharpness(
    objective: Objective, w: Tensor, rho: float, *, steps: int = 20, **kwargs: Any
) -> SharpnessResult:
    """SAM ρ-sharpness (Foret et al. 2021): max over ‖ε‖₂ ≤ ρ of L(w+ε) − L(w).

    See :func:`ball_sharpness` (``method``, ``polish``, ``generator``, ``base`` and ``model`` are
    passed on). ρ²λ_max/2 at the minimum of a quadratic with Hessian eigenvalues λ
    (ρ² max(λ_max, 0)/2 at any stationary point).
    """
    return ball_sharpness(objective, w, rho, steps=steps, **kwargs)


def adaptive_sharpness(
    objective: Objective,
    w: Tensor,
    rho: float,
    *,
    eta: float = 0.01,
    steps: int = 20,
    **kwargs: Any,
) -> SharpnessResult:
    """Adaptive sharpness (ASAM, Kwon et al. 2021): max over ‖ε / (|w| + η)‖₂ ≤ ρ.

    With η = 0 the measure is invariant under any rescaling w ↦ Dw (D positive diagonal) that
    leaves the loss unchanged, as scaling a ReLU layer up and the next one down (Dinh et al.
    2017). ρ²λ_max(T H T)/2 at the minimum of a quadratic, T = diag(|w| + η). Every parameter
    is scaled, biases included (as Andriushchenko et al. 2023 do, with η = 0); Kwon et al.'s
    code scales only the weights and gives biases T = 1. See :func:`ball_sharpness`.

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
    steps: int = 20,
    method: Method = "krylov",
    polish: int = 10,
    generator: torch.Generator | None = None,
    base: tuple[float, Tensor] | None = None,
    model: KrylovModel | None = None,
) -> SharpnessResult:
    """Keskar et al. 2017 ε-sharpness, in percent:
    100 · [max over the box |εᵢ| ≤ cᵢ = ε(|wᵢ| + 1) of L(w+ε) − L(w)] / (1 + L(w)).

    The maximum of a convex function over a box is at a corner: ε = c ⊙ s, s ∈ {−1, 1}^P (an
    NP-hard search in general; Keskar et al. used L-BFGS-B).

    - ``"krylov"``: candidate corners from the second-order model on the Krylov space of
      ``steps`` Lanczos steps on K H K, K = |w| + 1 (:func:`curvature_model`, or ``model``): the
      signs of its maximizer over the ball through the corners and of its top three Ritz
      vectors; the best of them by the true loss, then up to ``polish`` steps of ``"gradient"``.
    - ``"gradient"``: ε ← c ⊙ sign(∇L(w+ε)) from the first-order corner c ⊙ sign(∇L(w)) (at an
      exact minimum a random corner), up to ``steps`` steps, stopping at a fixed corner.

    The largest loss is kept: a lower bound of the maximum.

    Args:
        objective, w, steps, method, generator, base, model: as in :func:`ball_sharpness`.
        epsilon: the box size ε > 0 (Keskar et al.: 1e-3 and 5e-4).
        polish: corner steps after the best Krylov corner (``"krylov"`` only), ≥ 0.

    Returns:
        A :class:`SharpnessResult` (``first_order`` 100 Σ cᵢ|∇ᵢL(w)| / (1 + L(w))).

    Raises:
        TypeError, ValueError: on an invalid ``epsilon``, ``steps``, ``method`` or ``polish``.
    """
    epsilon = check_positive("epsilon", epsilon)
    _checks(steps, method, polish)
    before, loss0, grad = _start(objective, w, base)
    gen = _generator(generator)
    box = epsilon * (w.abs() + 1)
    if method == "gradient":
        best, eps = box_ascent(objective, w, box, torch.zeros_like(w), steps, gen, grad)
    else:
        if model is None:
            model = curvature_model(
                objective, w, grad, scale=w.abs() + 1, steps=steps, generator=gen
            )
        best, eps = -math.inf, torch.zeros_like(w)
        corners = model.corners(epsilon * math.sqrt(w.numel())) if model.finite else []
        for sign in corners:
            loss = objective.value(w + box * sign)
            if better(loss, best):
                best, eps = loss, box * sign
        if not corners:
            best = math.nan
        elif math.isfinite(best) and polish > 0:
            loss, far = box_ascent(objective, w, box, eps, polish, gen)
            if better(loss, best):
                best, eps = loss, far
    first = 100.0 * float((box * grad).abs().sum()) / (1.0 + loss0)
    value = 100.0 * (best - loss0) / (1.0 + loss0)
    return _result(objective, before, value, math.nan, loss0, best, eps, first)


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
    Monte-Carlo variance away from a minimum, cancels (so there is no first-order part:
    ``first_order`` is 0 and ``curvature`` the measure itself). The stderr is the sample standard
    deviation of the pair values over √samples, times Student's t factor for samples − 1 degrees
    of freedom (:mod:`~lightning_landscape._core.stats`), so that ±1 stderr covers about 68 % of
    runs even from 2 samples (1.84x at 2, 1.06x at 10). σ² tr(H)/2 on a quadratic.

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
    before = _counts(objective)
    loss0 = float(base_loss) if base_loss is not None else objective.value(w)
    gen = _generator(generator)
    values = []
    for _ in range(samples):
        eps = sigma * gaussian(tuple(w.shape), gen, w.dtype, w.device)
        values.append((objective.value(w + eps) + objective.value(w - eps)) / 2 - loss0)
    v = torch.tensor(values, dtype=torch.float64)
    t = student_t_quantile(ONE_SIGMA, samples - 1)
    mean, stderr = float(v.mean()), t * float(v.std()) / math.sqrt(samples)
    return _result(objective, before, mean, stderr, loss0, mean + loss0, None, 0.0)
