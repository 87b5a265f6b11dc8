"""pgolf.report.stats against independent computations: numerical integration of the densities, closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pgolf.report.stats import (
    mean_confidence_interval,
    regularized_incomplete_beta,
    std,
    student_t_cdf,
    student_t_ppf,
    student_t_sf,
    welch_df,
    welch_one_sided,
)


def simpson(f, a: float, b: float, n: int = 20_000) -> float:
    """Composite Simpson rule on n (even) intervals."""
    x = np.linspace(a, b, n + 1)
    y = f(x)
    h = (b - a) / n
    return float(h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum()))


def t_sf_by_integration(t: float, df: float) -> float:
    """P(T > t) by integrating the Student-t density, with no incomplete beta function involved.

    With s = sqrt(df) tan(phi), then u = pi/2 - phi = w^4:
    density(s) ds = c sqrt(df) cos(phi)^(df-1) dphi = c sqrt(df) sin(w^4)^(df-1) 4 w^3 dw,
    c = Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)). The w^4 substitution smooths the endpoint at phi = pi/2,
    where cos(phi)^(df-1) has an unbounded derivative for df < 2, so Simpson's rule stays accurate.
    """
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    u_max = math.pi / 2 - math.atan(t / math.sqrt(df))
    return c * math.sqrt(df) * simpson(lambda w: np.sin(w**4) ** (df - 1) * 4 * w**3, 0.0, u_max**0.25)


@pytest.mark.parametrize("df", [1.0, 2.0, 3.7, 1.3, 10.0, 30.5])
@pytest.mark.parametrize("t", [-2.0, 0.0, 0.3, 1.5, 5.0, 31.0])
def test_t_sf_matches_numerical_integration(t, df):
    expected = t_sf_by_integration(t, df)
    assert student_t_sf(t, df) == pytest.approx(expected, rel=1e-7, abs=1e-12)
    assert student_t_cdf(t, df) == pytest.approx(1.0 - expected, rel=1e-7, abs=1e-12)


def test_t_closed_forms():
    for t in (-3.0, -0.5, 0.25, 2.0, 40.0):
        assert student_t_cdf(t, 1.0) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-14)  # Cauchy
        assert student_t_cdf(t, 2.0) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-14)
    assert student_t_sf(math.inf, 3.0) == 0.0 and student_t_sf(-math.inf, 3.0) == 1.0
    with pytest.raises(ValueError, match="df > 0"):
        student_t_sf(1.0, 0.0)


@pytest.mark.parametrize(
    "a,b,x", [(1.0, 1.0, 0.3), (2.5, 1.5, 0.6), (3.0, 7.0, 0.2), (1.0, 4.0, 0.9), (6.0, 2.0, 0.75)]
)
def test_incomplete_beta_matches_integration(a, b, x):
    """I_x(a, b) = int_0^x t^(a-1) (1-t)^(b-1) dt / B(a, b); integrands are smooth for a, b >= 1."""
    beta = math.exp(math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    expected = simpson(lambda u: u ** (a - 1) * (1 - u) ** (b - 1), 0.0, x) / beta
    assert regularized_incomplete_beta(a, b, x) == pytest.approx(expected, rel=1e-9)
    assert regularized_incomplete_beta(a, b, x) + regularized_incomplete_beta(b, a, 1 - x) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        regularized_incomplete_beta(a, b, 1.5)


@pytest.mark.parametrize("df", [2.0, 2.6, 9.0])
@pytest.mark.parametrize("q", [0.025, 0.5, 0.9, 0.975])
def test_ppf_inverts_cdf(q, df):
    t = student_t_ppf(q, df)
    assert 1.0 - t_sf_by_integration(t, df) == pytest.approx(q, abs=1e-9)


def test_std_kinds_and_interval_match_numpy():
    values = [1.05989, 1.06125, 1.06209]
    assert std(values, ddof=1) == pytest.approx(float(np.std(values, ddof=1)), rel=1e-12)
    assert std(values, ddof=0) == pytest.approx(float(np.std(values, ddof=0)), rel=1e-12)
    assert std([1.0], ddof=1) is None
    lo, hi = mean_confidence_interval(values, 0.95)
    half = (hi - lo) / 2
    # the 97.5 % quantile of t with 2 df, from the closed form of its CDF: q = 1/2 + t / (2 sqrt(2 + t^2))
    t975 = math.sqrt(2) * 0.95 / math.sqrt(1 - 0.95**2)
    assert half == pytest.approx(t975 * np.std(values, ddof=1) / math.sqrt(3), rel=1e-9)
    assert mean_confidence_interval([1.0], 0.95) is None


def test_welch_example_from_the_issue():
    """Candidate: 3 seeds, mean 1.06108, sample std 0.00111 (bpb) vs a baseline row of 1.0810 bpb (std unknown)."""
    cand_mean, cand_std, n = 1.06108, 0.00111, 3
    baseline = 1.0810
    improvement = baseline - cand_mean  # by hand: 0.01992 bpb
    t = improvement / (cand_std / math.sqrt(n))  # one-sample limit of Welch: the baseline is exact
    p = t_sf_by_integration(t, n - 1)
    result = welch_one_sided(cand_mean, cand_std, n, baseline, None, 0)
    assert result.kind == "one_sample"
    assert result.improvement == pytest.approx(0.01992, abs=1e-12)
    assert result.t == pytest.approx(t, rel=1e-12)
    assert result.df == pytest.approx(2.0)
    assert result.p_value == pytest.approx(p, rel=1e-6)
    assert 1e-4 < result.p_value < 1e-3  # t ~ 31 with 2 df: significant, but not astronomically so


def test_welch_with_known_baseline_std():
    """Both groups noisy: Welch-Satterthwaite df by hand, p by integration."""
    a_mean, a_std, a_n = 1.06108, 0.00111, 3
    b_mean, b_std, b_n = 1.06335, 0.0015, 4
    va, vb = a_std**2 / a_n, b_std**2 / b_n
    df = (va + vb) ** 2 / (va**2 / (a_n - 1) + vb**2 / (b_n - 1))
    t = (b_mean - a_mean) / math.sqrt(va + vb)
    result = welch_one_sided(a_mean, a_std, a_n, b_mean, b_std, b_n)
    assert result.kind == "welch"
    assert result.df == pytest.approx(df, rel=1e-12) and not float(result.df).is_integer()
    assert result.t == pytest.approx(t, rel=1e-12)
    assert result.p_value == pytest.approx(t_sf_by_integration(t, df), rel=1e-6)
    assert welch_df(va * a_n, a_n, 0.0, b_n) == pytest.approx(a_n - 1)


def test_welch_direction_and_refusals():
    worse = welch_one_sided(1.07, 0.001, 3, 1.06, None, 3)  # candidate HIGHER than the baseline
    assert worse.improvement < 0 and worse.p_value > 0.5
    with pytest.raises(ValueError, match="at least 2 candidate seeds"):
        welch_one_sided(1.0, 0.0, 1, 1.1, None, 3)
    with pytest.raises(ValueError, match="baseline std needs at least 2"):
        welch_one_sided(1.0, 0.01, 3, 1.1, 0.01, 1)


def test_printed_figures_never_seem_to_meet_a_rule_they_miss():
    """An improvement of 0.0049996 nats printed to 6 decimals reads 0.005000, the README's threshold; p = 0.2499999
    to 3 digits reads 0.25, the progression cutoff. The report prints as many digits as it takes."""
    from pgolf.report.summary import beside, improvement_text, p_text

    assert beside(0.0049996, (0.005,), 4) == "0.0049996" and beside(0.00497, (0.005,), 4) == "0.00497"
    assert beside(0.005, (0.005,), 4) == "0.005"  # exactly at the threshold prints as it
    sig = {"p_value": 0.2499999, "readme_p": 0.01, "progression_p": 0.25, "improvement_nats_per_token": 0.0049996,
           "readme_threshold_nats_per_token": 0.005}
    assert p_text(sig, 3) == "0.2499999" and improvement_text(sig, 4) == "0.0049996"
