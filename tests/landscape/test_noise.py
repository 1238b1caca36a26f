"""Temperature formulas and the two-batch-size gradient-noise estimators."""

import math

import pytest
import torch

from lightning_landscape.landscape.noise import (
    NoiseEstimate,
    NoiseScaleEMA,
    effective_batch_size,
    exact_noise_scale,
    micro_batch_estimates,
    noise_estimates,
    temperature,
)


def test_temperature_formulas():
    assert temperature(0.1, 8) == pytest.approx(0.1 / 16, rel=1e-15)
    assert temperature(0.1, 8, momentum=0.9) == pytest.approx(0.1 / 16 / 0.1, rel=1e-12)
    assert temperature(0.1, 8, momentum=0.9, dampening=0.5) == pytest.approx(0.05 / 1.6, rel=1e-12)
    assert temperature(0.0, 8) == 0.0


def test_effective_batch_is_the_exact_temperature_of_the_step():
    """lr Σw²/(2Σw) over the per-sample weights of a Lightning step equals lr / (2B)."""
    assert effective_batch_size([4, 4], world_size=2, accumulate_grad_batches=2) == 16
    for sizes, world, accumulate in [([4, 2], 1, 2), ([4, 4, 3], 2, 4), ([2], 2, 2), ([5], 1, 1)]:
        # sample weights: 1 / (W · A · b_j) for every sample of micro-batch j on every rank
        weights = torch.cat(
            [torch.full((b,), 1.0 / (world * accumulate * b), dtype=torch.float64) for b in sizes]
            * world
        )
        exact = float(weights.pow(2).sum() / (2 * weights.sum()))
        batch = effective_batch_size(sizes, world, accumulate)
        assert temperature(1.0, batch) == pytest.approx(exact, rel=1e-12)
    assert effective_batch_size([4, 2], 1, 2) == pytest.approx(2 * 8 / 3)


def _regression(seed=0, n=2000, d=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x * torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    w_star = torch.randn(d, generator=g, dtype=torch.float64)
    y = x @ w_star + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    w = w_star + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    return (x @ w - y)[:, None] * x, g  # per-sample gradients of ½(xᵀw − y)²


@pytest.mark.parametrize("num_small,b", [(4, 8), (2, 16)])
def test_noise_scale_converges_to_exact_on_linear_regression(num_small, b):
    per_sample, g = _regression()
    exact = exact_noise_scale(per_sample)
    assert exact.noise_scale == pytest.approx(
        float(torch.trace(torch.cov(per_sample.T, correction=0))) / exact.grad_norm_sq
    )
    ema = NoiseScaleEMA(0.999)
    sums = torch.zeros(2, dtype=torch.float64)
    steps = 2000
    for _ in range(steps):
        idx = torch.randint(0, per_sample.shape[0], (num_small, b), generator=g)
        small = per_sample[idx].mean(1)  # num_small gradients of b samples (with replacement)
        big = small.mean(0)
        est = micro_batch_estimates(
            float(small.pow(2).sum()), num_small / b, num_small, float(big.pow(2).sum())
        )
        ema.update(est)
        sums += torch.tensor([est.grad_norm_sq, est.trace_covariance], dtype=torch.float64)
    mean_g2, mean_trs = (sums / steps).tolist()
    assert mean_g2 == pytest.approx(exact.grad_norm_sq, rel=0.1)
    assert mean_trs == pytest.approx(exact.trace_covariance, rel=0.1)
    assert ema.noise_scale == pytest.approx(exact.noise_scale, rel=0.1)
    assert ema.count == steps


def test_micro_batch_estimates_equal_two_size_formulas():
    est = micro_batch_estimates(small_sq_sum=10.0, inv_size_sum=4 / 8, num_small=4, big_sq=1.5)
    ref = noise_estimates(small_sq=2.5, big_sq=1.5, b_small=8, b_big=32)
    assert est == ref
    assert ref.grad_norm_sq == pytest.approx((32 * 1.5 - 8 * 2.5) / 24)
    assert ref.trace_covariance == pytest.approx((2.5 - 1.5) / (1 / 8 - 1 / 32))
    # unequal micro-batches: the harmonic size is the small batch, n times it the big one
    est = micro_batch_estimates(3.0, 1 / 4 + 1 / 2, 2, 1.0)
    assert est.b_small == pytest.approx(8 / 3) and est.b_big == pytest.approx(16 / 3)


def test_ema_bias_correction_ratio_and_state():
    ema = NoiseScaleEMA(0.9)
    assert math.isnan(ema.noise_scale) and math.isnan(ema.grad_norm_sq)
    ema.update(NoiseEstimate(2.0, 10.0, 1, 2))
    assert ema.grad_norm_sq == pytest.approx(2.0) and ema.noise_scale == pytest.approx(5.0)
    ema.update(NoiseEstimate(4.0, 10.0, 1, 2))
    assert ema.grad_norm_sq == pytest.approx((0.9 * 0.1 * 2 + 0.1 * 4) / (1 - 0.81))
    ema.update(NoiseEstimate(math.nan, 1.0, 1, 2))  # ignored
    assert ema.count == 2
    other = NoiseScaleEMA(0.9)
    other.load_state_dict(ema.state_dict())
    assert other.noise_scale == ema.noise_scale and other.count == 2
    last = NoiseScaleEMA(0.0)
    last.update(NoiseEstimate(-1.0, 3.0, 1, 2))
    assert last.trace_covariance == 3.0 and math.isnan(last.noise_scale)  # |G|² ≤ 0: no ratio


def test_errors():
    with pytest.raises(ValueError, match="`batch_size` must be"):
        temperature(0.1, 0)
    with pytest.raises(ValueError, match="`lr` must be"):
        temperature(-0.1, 8)
    with pytest.raises(TypeError, match="`lr` must be a number"):
        temperature("0.1", 8)
    with pytest.raises(ValueError, match="`momentum` must be in"):
        temperature(0.1, 8, momentum=1.0)
    with pytest.raises(ValueError, match="`dampening` must be in"):
        temperature(0.1, 8, dampening=2.0)
    with pytest.raises(ValueError, match="`micro_batch_sizes`"):
        effective_batch_size([])
    with pytest.raises(ValueError, match="`world_size`"):
        effective_batch_size([4], world_size=0)
    with pytest.raises(ValueError, match="b_small"):
        noise_estimates(1.0, 1.0, 8, 8)
    with pytest.raises(ValueError, match="at least 2"):
        micro_batch_estimates(1.0, 0.1, 1, 1.0)
    with pytest.raises(ValueError, match="`inv_size_sum`"):
        micro_batch_estimates(1.0, 0.0, 2, 1.0)
    with pytest.raises(ValueError, match="2-D"):
        exact_noise_scale(torch.zeros(3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        exact_noise_scale(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="`decay` must be in"):
        NoiseScaleEMA(1.0)
    with pytest.raises(TypeError, match="`decay` must be a number"):
        NoiseScaleEMA(None)
