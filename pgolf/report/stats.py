"""Small statistics for multi-seed results, with no scipy: Student-t distribution and the one-sided Welch test.

Why our own: the GPU machine has no scipy, and the acceptance rule of the challenge is a t-test on 2-5 seeds,
where the Welch-Satterthwaite degrees of freedom are not integers. The Student-t CDF is computed through the
regularized incomplete beta function,

    P(T > t) = 0.5 * I_x(df / 2, 1 / 2),   x = df / (df + t^2),   t >= 0,

and I_x(a, b) through its continued fraction (evaluated with the modified Lentz method), which converges fast
for x < (a + 1) / (a + b + 2); the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) covers the other side.
All functions are pure and take plain floats.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

_TINY = 1e-300
_EPS = 1e-15
_MAX_TERMS = 10_000


# --------------------------------------------------------------------------------------------------------------
# Descriptive statistics
# --------------------------------------------------------------------------------------------------------------


def mean(values: Sequence[float]) -> float:
    if len(values) == 0:
        raise ValueError("mean: no values")
    return math.fsum(values) / len(values)


def std(values: Sequence[float], ddof: int) -> Optional[float]:
    """Standard deviation with ``ddof`` (1: sample std, 0: population std); None when len(values) <= ddof."""
    n = len(values)
    if n <= ddof:
        return None
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - ddof))


# --------------------------------------------------------------------------------------------------------------
# Incomplete beta and Student t
# --------------------------------------------------------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction 1 + d1/(1 + d2/(1 + ...)) of I_x(a, b), by the modified Lentz method.

    d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)),  d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m)).
    """
    f = 1.0
    c = 1.0
    d = 0.0
    for j in range(1, 2 * _MAX_TERMS):
        m = j // 2
        if j % 2 == 1:
            term = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            term = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + term * d
        d = _TINY if abs(d) < _TINY else d
        d = 1.0 / d
        c = 1.0 + term / c
        c = _TINY if abs(c) < _TINY else c
        delta = c * d
        f *= delta
        if abs(delta - 1.0) < _EPS:
            return f
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def _incomplete_beta(a: float, b: float, x: float, y: float) -> float:
    """I_x(a, b) given both x and y = 1 - x (each exact: 1 - x loses digits when x is close to 1)."""
    if x == 0.0 or y == 0.0:
        return 0.0 if x == 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _incomplete_beta(b, a, y, x)
    log_front = a * math.log(x) + b * math.log(y) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    return math.exp(log_front) / (a * _beta_continued_fraction(a, b, x))


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"regularized_incomplete_beta: expected a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"regularized_incomplete_beta: expected 0 <= x <= 1, got {x}")
    return _incomplete_beta(a, b, x, 1.0 - x)


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` > 0 degrees of freedom (``df`` need not be an integer).

    P(T > |t|) = 0.5 I_x(df/2, 1/2) with x = df / (df + t^2); for small |t| the complement
    0.5 - 0.5 I_y(1/2, df/2), y = t^2 / (df + t^2), keeps full precision near t = 0.
    """
    if not df > 0:
        raise ValueError(f"student_t_sf: expected df > 0, got {df}")
    if math.isnan(t):
        raise ValueError("student_t_sf: t is NaN")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    x, y = df / (df + t * t), t * t / (df + t * t)
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, x, y)  # P(T > |t|)
    return tail if t >= 0 else 1.0 - tail


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t)."""
    return student_t_sf(-t, df)


def student_t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on the CDF; 200 halvings reach float precision)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"student_t_ppf: expected 0 < q < 1, got {q}")
    lo, hi = -1.0, 1.0
    while student_t_cdf(lo, df) > q:
        lo *= 2.0
    while student_t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def mean_confidence_interval(values: Sequence[float], level: float = 0.95) -> Optional[tuple[float, float]]:
    """Two-sided t interval for the mean: mean +- t_{(1+level)/2, n-1} * s / sqrt(n); None for fewer than 2 values."""
    n = len(values)
    s = std(values, ddof=1)
    if s is None:
        return None
    half = student_t_ppf(0.5 + level / 2.0, n - 1) * s / math.sqrt(n)
    m = mean(values)
    return (m - half, m + half)


# --------------------------------------------------------------------------------------------------------------
# One-sided Welch test: is the candidate's mean LOWER (better) than the baseline's?
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WelchResult:
    """Outcome of :func:`welch_one_sided`; ``improvement`` = baseline mean - candidate mean (positive is better)."""

    kind: str  # "welch" (both variances known) or "one_sample" (baseline std unknown: baseline treated as exact)
    improvement: float
    standard_error: float
    t: float
    df: float
    p_value: float  # P(T >= t) under H0: equal means; small means the candidate is really lower

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def welch_df(var_a: float, n_a: int, var_b: float, n_b: int) -> float:
    """Welch-Satterthwaite degrees of freedom; a group with variance 0 contributes nothing (one-sample limit)."""
    va, vb = var_a / n_a, var_b / n_b
    denom = (va * va / (n_a - 1) if va > 0 else 0.0) + (vb * vb / (n_b - 1) if vb > 0 else 0.0)
    if denom == 0.0:
        return float(n_a + n_b - 2) if (n_a > 1 and n_b > 1) else float(max(n_a, n_b) - 1)
    return (va + vb) ** 2 / denom


def welch_one_sided(
    candidate_mean: float,
    candidate_std: float,
    candidate_n: int,
    baseline_mean: float,
    baseline_std: Optional[float],
    baseline_n: int,
) -> WelchResult:
    """One-sided Welch t-test of H1: candidate mean < baseline mean, from summary statistics (sample stds).

    ``baseline_std`` None means unknown (a leaderboard row that publishes only its mean): the baseline is then
    treated as exact and the test is the one-sample t-test of the candidate seeds (df = n - 1), which is the
    Welch test's limit as the baseline variance goes to zero. That is optimistic when the baseline was noisy,
    and the report says so.
    """
    if candidate_n < 2:
        raise ValueError(f"welch_one_sided: needs at least 2 candidate seeds, got {candidate_n}")
    if candidate_std < 0 or (baseline_std is not None and baseline_std < 0):
        raise ValueError("welch_one_sided: standard deviations must be >= 0")
    kind = "one_sample" if baseline_std is None else "welch"
    if baseline_std is not None and baseline_n < 2:
        raise ValueError(f"welch_one_sided: a baseline std needs at least 2 baseline seeds, got {baseline_n}")
    var_a = candidate_std**2
    var_b = 0.0 if baseline_std is None else baseline_std**2
    n_b = max(baseline_n, 2)
    improvement = baseline_mean - candidate_mean
    se = math.sqrt(var_a / candidate_n + var_b / n_b)
    # the one-sample test has n - 1 degrees of freedom whatever the variances (welch_df's zero-variance fallback
    # would pool the baseline's n in when the candidate seeds agree exactly)
    df = float(candidate_n - 1) if baseline_std is None else welch_df(var_a, candidate_n, var_b, n_b)
    if se == 0.0:
        t = math.copysign(math.inf, improvement) if improvement != 0 else 0.0
        p = 0.0 if improvement > 0 else (1.0 if improvement < 0 else 0.5)
    else:
        t = improvement / se
        p = student_t_sf(t, df)
    return WelchResult(kind=kind, improvement=improvement, standard_error=se, t=t, df=df, p_value=p)
