"""Small-sample statistics: Student's t quantiles, so that an error bar estimated from a few
samples still means what a reader expects of it.

A standard error estimated from ν degrees of freedom makes (estimate − truth) / stderr a
Student's t variable with ν degrees of freedom (for Gaussian samples), not a standard normal
one: with ν = 1, "±1 stderr" covers 50 % of runs, not 68 %. Scaling the stderr by
``student_t_quantile(ONE_SIGMA, ν)`` restores the 68 % (Student 1908).
"""

from __future__ import annotations

import math
from statistics import NormalDist

ONE_SIGMA = NormalDist().cdf(1.0)  # 0.8413...: the quantile of "±1 standard deviation"
_EXPANSION_DF = 100  # from here on, the Cornish-Fisher expansion (relative error < 1e-8)


def student_t_quantile(p: float, df: int) -> float:
    """The ``p``-quantile of Student's t distribution with ``df`` degrees of freedom.

    Below 100 degrees of freedom the exact two-sided probability P(|T| ≤ t) (Abramowitz and
    Stegun 26.7.3-4, finite trigonometric sums for integer ``df``) is inverted by bisection;
    from 100 on, the Cornish-Fisher expansion in 1/df (26.7.5, four terms).

    Args:
        p: the probability, in [0.5, 1).
        df: the degrees of freedom, a positive int.

    Returns:
        t with P(T ≤ t) = p.

    Raises:
        ValueError: if ``p`` is not in [0.5, 1) or ``df`` is not a positive int.
    """
    if not 0.5 <= p < 1:
        raise ValueError(f"`p` must be in [0.5, 1), got {p!r}.")
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"`df` must be a positive int, got {df!r}.")
    if df >= _EXPANSION_DF:
        x = NormalDist().inv_cdf(p)
        g1 = (x**3 + x) / 4
        g2 = (5 * x**5 + 16 * x**3 + 3 * x) / 96
        g3 = (3 * x**7 + 19 * x**5 + 17 * x**3 - 15 * x) / 384
        g4 = (79 * x**9 + 776 * x**7 + 1482 * x**5 - 1920 * x**3 - 945 * x) / 92160
        return x + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4
    target = 2 * p - 1
    lo, hi = 0.0, 1.0
    while _two_sided(hi, df) < target:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if _two_sided(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * hi:
            break
    return (lo + hi) / 2


def _two_sided(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with integer ``df`` (Abramowitz and Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin θ (1 + c²/2 + 1·3/(2·4) c⁴ + ... + c^(df−2) term)
        term = total = 1.0
        for k in range(2, df, 2):
            term *= (k - 1) / k * c2
            total += term
        return s * total
    # (2/π) (θ + sin θ (c + 2/3 c³ + 2·4/(3·5) c⁵ + ... + c^(df−2) term)); df = 1: 2θ/π
    term = math.cos(theta)
    total = term if df > 1 else 0.0
    for k in range(3, df - 1, 2):
        term *= (k - 1) / k * c2
        total += term
    return 2 / math.pi * (theta + s * total)
