"""The tensor arithmetic of Entropy-SGD, one function at a time."""

import math

import pytest
import torch

from lightning_landscape.optim._validation import check_choice, check_int, check_real
from lightning_landscape.optim.functional import (
    average_step_,
    langevin_noise_std,
    langevin_step_,
    local_entropy_grad,
    scoped_gamma,
    stable_gamma_max,
)


def test_scoped_gamma_grows_geometrically():
    assert scoped_gamma(0.03, 1e-3, 0) == 0.03
    assert scoped_gamma(0.3, 30 ** (1 / 300) - 1, 300) == pytest.approx(9.0, rel=1e-12)
    assert scoped_gamma(0.5, 0.0, 1000) == 0.5


def test_scoped_gamma_stops_at_the_cap_and_never_overflows():
    assert scoped_gamma(0.03, 1e-3, 10, gamma_max=10.0) == 0.03 * 1.001**10
    assert scoped_gamma(0.03, 1e-3, 10**9, gamma_max=10.0) == 10.0
    assert scoped_gamma(0.5, 0.5, 8, gamma_max=10.0) == 10.0  # 0.5 * 1.5^8 = 12.8
    assert scoped_gamma(0.03, 1e-3, 10**9) == math.inf  # no cap: inf, not OverflowError
    assert stable_gamma_max(0.1) == pytest.approx(10.0)


def test_noise_std_conventions():
    # paper: sqrt(eta') * eps (temperature eps^2 / 2); code: sqrt(2 eta') * eps (temperature eps^2)
    assert langevin_noise_std(0.01, 1.0, "sqrt_lr") == pytest.approx(0.1)
    assert langevin_noise_std(0.01, 1.0, "sqrt_2lr") == pytest.approx(math.sqrt(0.02))
    assert langevin_noise_std(0.1, 0.0, "sqrt_lr") == 0.0


def test_langevin_step_without_noise_is_a_coupled_gradient_step():
    sample = torch.tensor([1.0, -2.0], dtype=torch.float64)
    anchor = torch.tensor([0.5, 0.5], dtype=torch.float64)
    grad = torch.tensor([3.0, 1.0], dtype=torch.float64)
    expected = sample - 0.1 * (grad - 2.0 * (anchor - sample))
    langevin_step_(sample, grad, anchor, gamma=2.0, sgld_lr=0.1, noise_std=0.0)
    torch.testing.assert_close(sample, expected, rtol=0, atol=1e-15)


def test_langevin_step_noise_comes_from_the_generator():
    gen = torch.Generator().manual_seed(3)
    sample = torch.zeros(1000, dtype=torch.float64)
    langevin_step_(
        sample, torch.zeros_like(sample), torch.zeros_like(sample), gamma=1.0, sgld_lr=0.1,
        noise_std=0.5, generator=gen,
    )  # fmt: skip
    expected = 0.5 * torch.randn(
        1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    assert torch.equal(sample, expected)


def test_langevin_noise_on_a_complex_weight_is_that_of_its_two_real_parts():
    """torch's complex randn gives each part variance 1/2: the chain ran at half its temperature
    (each part's std 0.22 instead of 0.32 here)."""
    z = torch.zeros(500, dtype=torch.cdouble)
    langevin_step_(
        z, torch.zeros_like(z), torch.zeros_like(z), gamma=1.0, sgld_lr=0.1, noise_std=0.5,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    expected = 0.5 * torch.randn(500, 2, generator=gen, dtype=torch.float64)
    assert torch.equal(torch.view_as_real(z), expected)


@pytest.mark.parametrize("nesterov", [True, False])
def test_langevin_momentum_acts_on_the_data_gradient_only(nesterov):
    sample = torch.tensor([1.0, -2.0], dtype=torch.float64)
    anchor = torch.tensor([0.5, 0.5], dtype=torch.float64)
    grad = torch.tensor([3.0, 1.0], dtype=torch.float64)
    buffer = torch.tensor([1.0, -1.0], dtype=torch.float64)
    new_buffer = 0.9 * buffer + grad
    d = grad + 0.9 * new_buffer if nesterov else new_buffer
    expected = sample - 0.1 * (d - 2.0 * (anchor - sample))
    langevin_step_(
        sample, grad, anchor, gamma=2.0, sgld_lr=0.1, noise_std=0.0, momentum_buffer=buffer,
        momentum=0.9, nesterov=nesterov,
    )  # fmt: skip
    torch.testing.assert_close(buffer, new_buffer, rtol=0, atol=1e-15)
    torch.testing.assert_close(sample, expected, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="`momentum_buffer` is needed"):
        langevin_step_(sample, grad, anchor, gamma=2.0, sgld_lr=0.1, noise_std=0.0, momentum=0.9)


@pytest.mark.parametrize(("weights", "alpha", "new"), [("new", 0.75, 0.75), ("old", 0.75, 0.25)])
def test_average_step_alpha_conventions(weights, alpha, new):
    mean = torch.tensor([0.0], dtype=torch.float64)
    average_step_(
        mean, torch.tensor([1.0], dtype=torch.float64), alpha=alpha, alpha_weights=weights
    )
    assert mean.item() == pytest.approx(new)


def test_local_entropy_grad_with_and_without_gamma():
    x, mu = torch.tensor([1.0]), torch.tensor([0.25])
    assert local_entropy_grad(x, mu, gamma=2.0, outer_gamma=True).item() == 1.5
    assert local_entropy_grad(x, mu, gamma=2.0, outer_gamma=False).item() == 0.75


def test_checks_name_the_argument_and_value():
    with pytest.raises(TypeError, match=r"`lr` must be a real number, got 'a'"):
        check_real("lr", "a")
    with pytest.raises(TypeError, match=r"`lr` must be a real number, got True"):
        check_real("lr", True)
    with pytest.raises(ValueError, match=r"`lr` must be finite, got nan"):
        check_real("lr", float("nan"))
    with pytest.raises(ValueError, match=r"`gamma` must be positive, got 0"):
        check_real("gamma", 0, low=0.0, strict=True)
    with pytest.raises(ValueError, match=r"`alpha` must be <= 1.0, got 2"):
        check_real("alpha", 2, high=1.0)
    with pytest.raises(ValueError, match=r"`lr` must be >= 0.0, got -1"):
        check_real("lr", -1, low=0.0)
    with pytest.raises(TypeError, match=r"`L` must be an int, got 2.0"):
        check_int("L", 2.0)
    with pytest.raises(ValueError, match=r"`L` must be a positive int, got 0"):
        check_int("L", 0, low=1)
    with pytest.raises(ValueError, match=r"`mode` must be one of \['a', 'b'\], got 'c'"):
        check_choice("mode", "c", ("a", "b"))
