"""The arithmetic of Entropy-SGD on tensors: Langevin steps, the running mean, the outer gradient.

Chaudhari, Choromanska, Soatto, LeCun, Baldassi, Borgs, Chayes, Sagun, Zecchina, "Entropy-SGD:
Biasing gradient descent into wide valleys", ICLR 2017 (arXiv 1611.01838), Algorithm 1.

The local entropy of a loss f at x with scope γ is
``F(x, γ) = log ∫ exp(−f(x') − γ/2 ‖x − x'‖²) dx'`` and its negative gradient is
``−∇F(x, γ) = γ (x − ⟨x'⟩)``, the mean taken under the Gibbs measure
``x' ~ exp(−f(x') − γ/2 ‖x − x'‖²)``. Algorithm 1 estimates ``⟨x'⟩`` with stochastic gradient
Langevin dynamics (SGLD) started at x and an exponential average μ of the samples. These
functions do one piece of it each, in place, and import nothing from Lightning, so that
:class:`~lightning_landscape.optim.EntropySGD` is glue around them and tests can call them alone.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

NoiseScale = Literal["sqrt_lr", "sqrt_2lr"]
AlphaWeights = Literal["new", "old"]


def scoped_gamma(
    gamma: float, scoping: float, outer_step: int, gamma_max: float = math.inf
) -> float:
    """The scope of outer step k: ``γ_k = min(γ₀ (1 + γ₁)^k, γ_max)`` (the paper's "scoping").

    The growth is compared with the cap in logarithms, so with a finite cap no k overflows
    (without one, an overflow gives inf).

    Args:
        gamma: γ₀, the coupling at the first outer step.
        scoping: γ₁, the relative growth of γ per outer step (0 keeps γ fixed).
        outer_step: k, the number of outer updates done so far.
        gamma_max: the cap γ_max (inf: none).

    Returns:
        γ_k as a Python float.
    """
    if gamma >= gamma_max:
        return float(gamma_max)
    if outer_step * math.log1p(scoping) >= math.log(gamma_max / gamma):
        return float(gamma_max)
    try:
        return min(gamma * (1.0 + scoping) ** outer_step, gamma_max)
    except OverflowError:  # only without a cap
        return math.inf


def stable_gamma_max(sgld_lr: float) -> float:
    """The default cap of the scope, ``γ_max = 1/η'``.

    On the coupling term alone a Langevin step maps ``x' − x`` to ``(1 − η'γ)(x' − x)``: it
    diverges once ``η'γ > 2`` (measured on digits: γ₀ = 0.03 scoped by 1e-3 per outer step passes
    ``η'γ = 2`` after about 30k gradients at L = 5, and the loss goes 2.4 → 4.5e4 → NaN). The cap
    ``η'γ ≤ 1`` keeps half of that margin for the curvature of the loss itself.

    Args:
        sgld_lr: η', the Langevin step size.

    Returns:
        ``1 / η'``.
    """
    return 1.0 / sgld_lr


def langevin_noise_std(sgld_lr: float, noise: float, noise_scale: NoiseScale) -> float:
    """The standard deviation of the Gaussian added at each Langevin step.

    The paper's Algorithm 1 adds ``sqrt(η')·ε·N(0, I)`` (``noise_scale="sqrt_lr"``, temperature
    ε²/2); the reference code adds ``sqrt(2η')·ε·N(0, I)`` (``"sqrt_2lr"``, temperature ε²).
    SGLD at temperature T adds ``sqrt(2η'T)·N(0, I)``.

    Args:
        sgld_lr: η', the Langevin step size.
        noise: ε, the thermal noise.
        noise_scale: which of the two conventions above.

    Returns:
        The standard deviation as a Python float.
    """
    factor = sgld_lr if noise_scale == "sqrt_lr" else 2.0 * sgld_lr
    return math.sqrt(factor) * noise


def langevin_step_(
    sample: Tensor,
    grad: Tensor,
    anchor: Tensor,
    *,
    gamma: float,
    sgld_lr: float,
    noise_std: float,
    generator: torch.Generator | None = None,
    momentum_buffer: Tensor | None = None,
    momentum: float = 0.0,
    nesterov: bool = False,
) -> None:
    """One SGLD step on the coupled loss, in place: ``x' ← x' − η'(d − γ(x − x')) + σ·N(0, I)``.

    Without momentum ``d = ∇f(x')`` (the paper). With ``momentum`` β > 0 (the reference code)
    the data gradient alone goes through a momentum buffer b, ``b ← β b + ∇f(x')``, and
    ``d = ∇f(x') + β b`` (Nesterov) or ``d = b``; the coupling and the noise do not.

    Args:
        sample: x', updated in place.
        grad: ∇f(x') on the current mini-batch.
        anchor: x, the point the chain is coupled to.
        gamma: γ, the coupling.
        sgld_lr: η', the step size.
        noise_std: σ (see :func:`langevin_noise_std`); 0 skips the draw.
        generator: the source of the noise; it is drawn on the generator's device in the
            sample's dtype and then moved to the sample's device.
        momentum_buffer: b, updated in place (used when ``momentum > 0``); start it at zero.
        momentum: β (0: plain SGLD).
        nesterov: Nesterov's form ``d = ∇f + β b`` instead of ``d = b``.

    Raises:
        ValueError: if ``momentum > 0`` without a ``momentum_buffer``.
    """
    direction = grad
    if momentum > 0:
        if momentum_buffer is None:
            raise ValueError("`momentum_buffer` is needed when `momentum` > 0.")
        momentum_buffer.mul_(momentum).add_(grad)
        direction = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    direction = direction - gamma * (anchor - sample)
    sample.sub_(sgld_lr * direction)
    if noise_std > 0:
        device = generator.device if generator is not None else sample.device
        # a complex weight is two real coordinates, each with variance noise_std² (torch's
        # complex randn gives each part half the variance)
        real = torch.view_as_real(sample) if sample.is_complex() else sample
        eps = torch.randn(real.shape, generator=generator, device=device, dtype=real.dtype)
        real.add_(noise_std * eps.to(sample.device))


def average_step_(
    mean: Tensor, sample: Tensor, *, alpha: float, alpha_weights: AlphaWeights
) -> None:
    """Fold a sample into the exponential average μ, in place.

    ``alpha_weights="new"`` (the paper read literally): ``μ ← (1 − α) μ + α x'``.
    ``alpha_weights="old"`` (the reference code): ``μ ← α μ + (1 − α) x'``.

    Args:
        mean: μ, updated in place.
        sample: x'.
        alpha: α.
        alpha_weights: whether α weights the new sample or the old mean.
    """
    keep, new = (1.0 - alpha, alpha) if alpha_weights == "new" else (alpha, 1.0 - alpha)
    mean.mul_(keep).add_(new * sample)


def local_entropy_grad(anchor: Tensor, mean: Tensor, *, gamma: float, outer_gamma: bool) -> Tensor:
    """The outer gradient ``γ (x − μ)`` (``outer_gamma=True``, the paper) or ``x − μ`` (the code).

    Args:
        anchor: x.
        mean: μ, the estimate of ⟨x'⟩.
        gamma: γ_k.
        outer_gamma: whether the outer gradient carries the factor γ.

    Returns:
        A new tensor: the estimate of −∇F(x, γ) (up to the factor γ when ``outer_gamma=False``).
    """
    diff = anchor - mean
    return gamma * diff if outer_gamma else diff
