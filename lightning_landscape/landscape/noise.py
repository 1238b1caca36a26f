"""Gradient-noise statistics of SGD: temperature and gradient noise scale (pure torch).

**Temperature** (Chaudhari & Soatto, "Stochastic gradient descent performs variational
inference", ICLR 2018, Lemma 2): SGD with step η on mini-batches of b samples follows the
diffusion dx = −∇f dt + sqrt(2 β⁻¹ D(x)) dW with β⁻¹ = η / (2b), D the per-sample gradient
covariance. With heavy-ball momentum μ and dampening d (PyTorch's SGD) the effective step is
η (1 − d) / (1 − μ) (Smith et al. 2018). Sampling without replacement adds a factor (1 − b/N)
(their Remark 12), not applied here.

**Effective batch.** When the stepped gradient averages micro-batches of different sizes (a short
last batch), it is Σᵢ wᵢ ∇ℓᵢ with per-sample weights wᵢ, and its noise is that of a batch of
(Σ wᵢ)² / Σ wᵢ² samples. For k micro-batches of sizes b₁…b_k on each of W ranks, each divided
by A = accumulate_grad_batches (Lightning's automatic optimization), the temperature
η Σ wᵢ² / (2 Σ wᵢ) equals η / (2 B) with B = b_h · W · A, b_h = k / Σⱼ 1/bⱼ the harmonic
mean of the micro-batch sizes (b_h = b when they are equal).

**Gradient noise scale** (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of
Large-Batch Training", appendix A): B_simple = tr(Σ) / |G|², Σ the per-sample gradient covariance,
G the full-batch gradient. From gradient norms at two batch sizes B_small < B_big,

    |G|²   ≈ (B_big |G_big|² − B_small |G_small|²) / (B_big − B_small),
    tr(Σ)  ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

are unbiased; their ratio is not, so they are averaged separately (:class:`NoiseScaleEMA`) and
divided afterwards. Per-step |G|² estimates can be negative: never take per-step ratios.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_landscape._core.checks import check_real


def _check_number(name: str, value: object, *, low: float, strict: bool) -> float:
    relation = ">" if strict else ">="
    return check_real(
        name,
        value,
        low=low,
        strict=strict,
        type_what="a number",
        what=f"a finite number {relation} {low:g}",
    )


def temperature(
    lr: float, batch_size: float, *, momentum: float = 0.0, dampening: float = 0.0
) -> float:
    """SGD temperature β⁻¹ = lr (1 − dampening) / (2 B (1 − momentum)).

    Args:
        lr: learning rate η (≥ 0).
        batch_size: the (effective, global) batch size B (> 0).
        momentum: heavy-ball momentum μ in [0, 1).
        dampening: dampening d in [0, 1] (PyTorch SGD's).

    Returns:
        The temperature (η / 2B without momentum).

    Raises:
        TypeError: if an argument is not a number.
        ValueError: if an argument is out of range.

    Example::

        temperature(0.1, 128)                 # 0.1 / 256
        temperature(0.1, 128, momentum=0.9)   # 10x hotter
    """
    lr = _check_number("lr", lr, low=0.0, strict=False)
    batch_size = _check_number("batch_size", batch_size, low=0.0, strict=True)
    momentum = _check_number("momentum", momentum, low=0.0, strict=False)
    dampening = _check_number("dampening", dampening, low=0.0, strict=False)
    if momentum >= 1.0:
        raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
    if dampening > 1.0:
        raise ValueError(f"`dampening` must be in [0, 1], got {dampening!r}.")
    return lr * (1.0 - dampening) / (2.0 * batch_size * (1.0 - momentum))


def effective_batch_size(
    micro_batch_sizes: Sequence[int], world_size: int = 1, accumulate_grad_batches: int = 1
) -> float:
    """B = b_h · W · A, b_h the harmonic mean of the micro-batch sizes of one optimizer step.

    See the module docstring: with this B, η / (2B) is the temperature of a step whose gradient
    is Σⱼ mean-loss-gradient(bⱼ) / A, averaged over W ranks. When the ranks see different sizes,
    pass the sizes of all ranks (their union has the right harmonic mean; the monitor does this).

    Raises:
        ValueError: if there is no micro-batch, a size is not positive, or W, A < 1.
    """
    sizes = [float(b) for b in micro_batch_sizes]
    if not sizes or any(not b > 0 for b in sizes):
        raise ValueError(f"`micro_batch_sizes` must be positive sizes, got {micro_batch_sizes!r}.")
    if world_size < 1 or accumulate_grad_batches < 1:
        raise ValueError(
            f"`world_size` and `accumulate_grad_batches` must be >= 1, got {world_size!r} and "
            f"{accumulate_grad_batches!r}."
        )
    harmonic = len(sizes) / sum(1.0 / b for b in sizes)
    return harmonic * world_size * accumulate_grad_batches


@dataclass(frozen=True)
class NoiseEstimate:
    """Unbiased one-step estimates of |G|² and tr(Σ) (McCandlish et al. 2018, appendix A).

    Attributes:
        grad_norm_sq: estimate of |G|² (may be negative).
        trace_covariance: estimate of tr(Σ) (may be negative).
        b_small, b_big: the two batch sizes used.
    """

    grad_norm_sq: float
    trace_covariance: float
    b_small: float
    b_big: float


def noise_estimates(small_sq: float, big_sq: float, b_small: float, b_big: float) -> NoiseEstimate:
    """The two-batch-size unbiased estimators of |G|² and tr(Σ).

    Args:
        small_sq: |G_small|², squared norm of a gradient over ``b_small`` samples (or the mean of
            several such squared norms).
        big_sq: |G_big|², squared norm of a gradient over ``b_big`` samples.
        b_small, b_big: the batch sizes, 0 < b_small < b_big.

    Returns:
        A :class:`NoiseEstimate`.

    Raises:
        ValueError: unless 0 < b_small < b_big.
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < `b_small` < `b_big`, got {b_small!r} and {b_big!r}.")
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trs = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return NoiseEstimate(float(g2), float(trs), float(b_small), float(b_big))


def micro_batch_estimates(
    small_sq_sum: float, inv_size_sum: float, num_small: int, big_sq: float
) -> NoiseEstimate:
    """Estimates from n micro-batch gradients g₁…g_n and their mean G_big = (1/n) Σⱼ gⱼ.

    With E|gⱼ|² = |G|² + tr(Σ)/bⱼ, the mean of the |gⱼ|² is a small-batch norm of size
    B_small = n / Σⱼ 1/bⱼ (harmonic), and E|G_big|² = |G|² + tr(Σ)/(n B_small), so
    B_big = n B_small. This is how the micro-batches of gradient accumulation, or the local
    gradients of the ranks under DDP (and both at once), serve as the small batches.

    Args:
        small_sq_sum: Σⱼ |gⱼ|².
        inv_size_sum: Σⱼ 1/bⱼ.
        num_small: n ≥ 2.
        big_sq: |G_big|².

    Raises:
        ValueError: if ``num_small < 2`` or ``inv_size_sum <= 0``.
    """
    if num_small < 2:
        raise ValueError(f"need at least 2 small-batch gradients, got {num_small!r}.")
    if not inv_size_sum > 0:
        raise ValueError(f"`inv_size_sum` must be positive, got {inv_size_sum!r}.")
    b_small = num_small / inv_size_sum
    return noise_estimates(small_sq_sum / num_small, big_sq, b_small, num_small * b_small)


@dataclass(frozen=True)
class ExactNoise:
    """tr(Σ), |G|² and their ratio from per-sample gradients (the test oracle)."""

    grad_norm_sq: float
    trace_covariance: float
    noise_scale: float


def exact_noise_scale(per_sample_grads: Tensor) -> ExactNoise:
    """B_simple = tr(Σ)/|G|² from an (N, d) matrix of per-sample gradients (Σ with 1/N).

    Raises:
        ValueError: if ``per_sample_grads`` is not a 2-D tensor with at least 2 rows.
    """
    if not isinstance(per_sample_grads, Tensor) or per_sample_grads.dim() != 2:
        raise ValueError("`per_sample_grads` must be a 2-D tensor (samples x parameters).")
    if per_sample_grads.shape[0] < 2:
        raise ValueError("`per_sample_grads` needs at least 2 samples.")
    g = per_sample_grads.to(torch.float64)
    mean = g.mean(0)
    trs = float((g - mean).pow(2).sum(1).mean())
    g2 = float(mean.pow(2).sum())
    return ExactNoise(g2, trs, trs / g2 if g2 > 0 else math.nan)


class NoiseScaleEMA:
    """Exponential moving averages of the |G|² and tr(Σ) estimates, bias-corrected (as Adam's
    moments), and their ratio B_simple = tr(Σ)/|G|².

    Args:
        decay: β in [0, 1); 0 keeps the last estimate only.

    Raises:
        TypeError, ValueError: if ``decay`` is not a number in [0, 1).

    Example::

        ema = NoiseScaleEMA(0.95)
        ema.update(micro_batch_estimates(sq_sum, inv_sum, n, big_sq))
        ema.noise_scale
    """

    def __init__(self, decay: float = 0.95) -> None:
        decay = _check_number("decay", decay, low=0.0, strict=False)
        if decay >= 1.0:
            raise ValueError(f"`decay` must be in [0, 1), got {decay!r}.")
        self.decay = decay
        self.count = 0
        self._g2 = 0.0
        self._trs = 0.0

    def update(self, estimate: NoiseEstimate) -> None:
        """Fold one step's estimates in (non-finite ones are ignored)."""
        if not (math.isfinite(estimate.grad_norm_sq) and math.isfinite(estimate.trace_covariance)):
            return
        self._g2 = self.decay * self._g2 + (1 - self.decay) * estimate.grad_norm_sq
        self._trs = self.decay * self._trs + (1 - self.decay) * estimate.trace_covariance
        self.count += 1

    def _corrected(self, value: float) -> float:
        if self.count == 0:
            return math.nan
        return value / (1 - self.decay**self.count)

    @property
    def grad_norm_sq(self) -> float:
        """Smoothed |G|² (NaN before the first update)."""
        return self._corrected(self._g2)

    @property
    def trace_covariance(self) -> float:
        """Smoothed tr(Σ) (NaN before the first update)."""
        return self._corrected(self._trs)

    @property
    def noise_scale(self) -> float:
        """Smoothed tr(Σ) / smoothed |G|²; NaN while the smoothed |G|² is not positive."""
        g2 = self.grad_norm_sq
        return self.trace_covariance / g2 if g2 > 0 else math.nan

    def state_dict(self) -> dict[str, float]:
        return {"decay": self.decay, "count": self.count, "g2": self._g2, "trs": self._trs}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count = int(state.get("count", 0))
        self._g2 = float(state.get("g2", 0.0))
        self._trs = float(state.get("trs", 0.0))
