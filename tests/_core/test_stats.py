"""Student's t quantiles against scipy, and the argument checks."""

import math

import pytest
from scipy import stats

from lightning_landscape._core.stats import ONE_SIGMA, student_t_quantile


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 19, 30, 99, 100, 101, 1000, 10**6])
@pytest.mark.parametrize("p", [0.5, 0.6, ONE_SIGMA, 0.975, 0.999])
def test_matches_scipy(p, df):
    assert math.isclose(student_t_quantile(p, df), stats.t.ppf(p, df), rel_tol=1e-8, abs_tol=1e-12)


def test_one_sigma_factors():
    """The ±1 standard deviation factors: 1.84 at one degree of freedom, 1 in the limit."""
    assert math.isclose(ONE_SIGMA, 0.8413447460685429)
    assert math.isclose(student_t_quantile(ONE_SIGMA, 1), math.tan(math.pi * (ONE_SIGMA - 0.5)))
    assert math.isclose(student_t_quantile(ONE_SIGMA, 10**9), 1.0, rel_tol=1e-8)


@pytest.mark.parametrize(
    ("p", "df", "match"),
    [
        (0.4, 3, "`p` must be in"),
        (1.0, 3, "`p` must be in"),
        (0.9, 0, "`df` must be a positive int"),
        (0.9, 2.0, "`df` must be a positive int"),
        (0.9, True, "`df` must be a positive int"),
    ],
)
def test_raises(p, df, match):
    with pytest.raises(ValueError, match=match):
        student_t_quantile(p, df)
