"""Width-scan metrics (minintk.width_metrics): slope fits against scipy's regression, the K_0 spread, verdicts."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy.stats import linregress
from scipy.stats import t as student_t

from minintk.width_config import WidthScanError
from minintk.width_metrics import Slope, fit_slope, spread, verdict


@given(st.lists(st.sampled_from([8, 16, 32, 64, 128]), min_size=3, max_size=12),
       st.lists(st.floats(-3, 3), min_size=12, max_size=12))
def test_fit_slope_is_ordinary_least_squares_on_log_log_axes(widths, logs):
    v = np.exp(np.array(logs[: len(widths)]))
    fit = fit_slope(widths, v, level=0.9)
    if len(set(widths)) < 3:
        assert fit is None, "an interval from fewer than 3 widths is not a power-law fit"
        return
    assume(np.ptp(v[: len(widths)]) > 1e-9)  # linregress's stderr is NaN for constant values (ours: 0)
    ref = linregress(np.log(widths), np.log(v))
    q = student_t.ppf(0.95, len(widths) - 2)
    assert fit.slope == pytest.approx(ref.slope, abs=1e-9) and fit.se == pytest.approx(ref.stderr, abs=1e-9)
    assert fit.ci == pytest.approx((ref.slope - q * ref.stderr, ref.slope + q * ref.stderr), abs=1e-8)


def test_fit_slope_recovers_a_power_law_and_skips_unusable_points():
    w = np.array([32, 64, 128, 256, 32, 64])
    fit = fit_slope(w, 3.0 * w**-0.5)
    assert fit.slope == pytest.approx(-0.5, abs=1e-12) and np.exp(fit.intercept) == pytest.approx(3.0)
    assert fit_slope([32, 64, 128], [1.0, 0.0, np.nan]) is None, "zeros and NaN cannot enter a log-log fit"
    with pytest.raises(WidthScanError, match="paired"):
        fit_slope([32, 64], [1.0])


@given(st.integers(2, 6), st.integers(2, 5), st.floats(0.01, 2.0))
def test_spread_of_symmetric_perturbations(n, seeds, scale):
    """K_s = K + c_s E with sum_s c_s = 0: the mean is K and seed s deviates by |c_s| ||E|| / ||K||."""
    rng = np.random.default_rng(n * seeds)
    A, E = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    K = A @ A.T + n * np.eye(n)
    c = scale * rng.standard_normal(seeds)
    c -= c.mean()
    got = spread([K + ci * E for ci in c])
    assert np.allclose(got, np.abs(c) * np.linalg.norm(E) / np.linalg.norm(K), rtol=1e-10, atol=1e-14)


def test_verdicts():
    def s(lo, hi):
        return Slope((lo + hi) / 2, (lo, hi), 0.1, 0.0, 1.0, 10, 0.95)

    assert verdict(s(-0.7, -0.3), -0.5) == "matches"
    assert verdict(s(-1.2, -0.8), -0.5) == "steeper"
    assert verdict(s(-0.4, -0.1), -0.5) == "shallower"
    assert verdict(s(-0.4, 0.1), -0.5) == "no significant decay"
    assert verdict(s(0.1, 0.4), -0.5) == "grows"
    assert verdict(s(-0.4, -0.1), None) == "decays" and verdict(None, -0.5) == "no fit"
