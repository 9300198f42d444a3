"""The metrics of a width scan against width (docs/theory.md section 6): their table (label, definition, the
theory's slope), the K_0 spread across seeds, and least-squares fits of log(metric) on log(width) with a verdict
against the predicted slope."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .spectrum import ols
from .width_config import WidthScanError

METRICS = {  # name: (short label, definition, theory's slope against width; docs/theory.md section 6)
    "spread": ("K_0 spread", "||K_0^s - mean_s K_0||_F / ||mean_s K_0||_F across seeds s", -0.5),
    "drift": ("kernel drift", "||K_t - K_0||_F / ||K_0||_F", -0.5),
    "movement": ("weight movement", "||theta_t - theta_0|| / ||theta_0||", -0.5),
    "lin_error": ("linearization error", "RMS_test(f_t - f_lin,t) / RMS(y_test), held-out inputs", -0.5),
    "loss_gap": ("test-loss gap", "|L_test(f_t) - L_test(f_lin,t)|", None),  # theory: -> 0, no rate stated
    "pretrain_move": ("pretraining movement", "||theta_pre - theta_init|| / ||theta_init||", -0.5),
}


class Slope(NamedTuple):
    """log(metric) = a + slope log(width), least squares over all (width, seed) points; ci at `level` (t)."""

    slope: float
    ci: tuple[float, float]
    se: float
    intercept: float
    r2: float
    n_points: int
    level: float


def fit_slope(widths, values, level: float = 0.95) -> Slope | None:
    """Fit values ~ C width^slope on log-log axes. widths, values: (N,) paired points (e.g. one per seed and
    width); non-positive or non-finite values are left out. None when fewer than 3 distinct widths remain: with
    two, the interval would measure only the spread over seeds, not the fit of a power law."""
    from scipy.stats import t as student_t

    w, v = np.asarray(widths, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if w.shape != v.shape or w.ndim != 1:
        raise WidthScanError(f"widths and values must be paired 1-D arrays, got {w.shape} and {v.shape}")
    ok = np.isfinite(v) & (v > 0) & np.isfinite(w) & (w > 0)
    w, v = w[ok], v[ok]
    if np.unique(w).size < 3:
        return None
    b, a, se, r2 = ols(np.log(w), np.log(v))
    q = float(student_t.ppf(0.5 + level / 2, df=w.size - 2))
    return Slope(b, (b - q * se, b + q * se), se, a, r2, int(w.size), level)


def verdict(fit: Slope | None, prediction: float | None) -> str:
    """Words for a fitted slope against the predicted one: matches / steeper / shallower / no decay / grows."""
    if fit is None:
        return "no fit"
    lo, hi = fit.ci
    if lo > 0:
        return "grows"
    if hi >= 0:
        return "no significant decay"
    if prediction is None:
        return "decays"
    return "matches" if lo <= prediction <= hi else "steeper" if hi < prediction else "shallower"


def spread(K0s: list) -> list[float]:
    """||K_s - mean K||_F / ||mean K||_F for each Gram of K0s, a list of (n, n) arrays from different seeds."""
    Ks = np.stack([np.asarray(K, dtype=np.float64) for K in K0s])
    mean = Ks.mean(0)
    return [float(np.linalg.norm(K - mean) / np.linalg.norm(mean)) for K in Ks]
