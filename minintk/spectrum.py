"""Eigen-decay of a Gram matrix and the sample efficiency it predicts (docs/theory.md section 5).

eigenvalues(K) gives the spectrum of K_n = K / n (the matrix of docs/theory.md section 4), descending, clipped
at 0, with the numerical floor below which eigenvalues are rounding noise. fit_power_law fits
mu_i ~ C i^{-beta} by least squares of log mu_i on log i over a stated index range; implied_rate turns
beta into the error rate (sigma^2 / n)^{beta / (beta + 1)}; plot_spectrum draws it all on log-log axes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np


class SpectrumError(ValueError):
    """A Gram matrix, spectrum or fit range that cannot be used."""


class Spectrum(NamedTuple):
    """mu: (n,) eigenvalues of K/n, descending, clipped at 0; floor: n * eps(input dtype) * mu_1, the level
    below which an eigenvalue is rounding noise; min_raw: the most negative eigenvalue before clipping (or the
    smallest, if none is negative); n_above_floor: how many exceed the floor."""

    mu: np.ndarray
    floor: float
    min_raw: float
    n_above_floor: int


class PowerLawFit(NamedTuple):
    """mu_i ~ C i^{-beta} fitted on indices first..last (1-based, inclusive).

    beta_ci: regression (t-distribution, standard error) confidence interval at `level`; bootstrap_ci: pairs
    bootstrap percentile interval, or None. se: standard error of beta; r2 of the log-log regression.
    """

    beta: float
    C: float
    beta_ci: tuple[float, float]
    se: float
    first: int
    last: int
    level: float
    bootstrap_ci: tuple[float, float] | None
    r2: float


def eigenvalues(K: Any) -> Spectrum:
    """Spectrum of K/n (docs/theory.md sections 4-5). K: (n, n) numpy or torch, symmetric -> Spectrum (fp64).
    For several outputs give ntk(..., trace=True), the mean over outputs: its K/n is the kernel each output
    moves with under the loss (1/2n) sum ||f - y||^2 (docs/theory.md section 2.2).

    The floor uses the machine epsilon of K's own dtype (fp32 Grams have ~1e-7 relative noise), as
    numpy.linalg.matrix_rank does: floor = n * eps * max|mu|. Raises SpectrumError for a non-square,
    non-finite, non-symmetric K, or one with a negative eigenvalue beyond max(1e-9, 10 n eps) * max|mu|.
    """
    if hasattr(K, "detach"):  # a torch tensor: its dtype says its precision
        import torch

        K = K.detach().cpu()
        eps_in = float(torch.finfo(K.dtype).eps) if K.dtype.is_floating_point else 2.0**-52
        K = K.double().numpy()
    else:
        K = np.asarray(K)
        eps_in = float(np.finfo(K.dtype).eps) if np.issubdtype(K.dtype, np.floating) else 2.0**-52
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise SpectrumError(f"K must be a non-empty square (n, n) matrix, got shape {K.shape}")
    if not np.all(np.isfinite(K)):
        raise SpectrumError("K has non-finite entries")
    n = K.shape[0]
    scale = float(np.abs(K).max())
    if float(np.abs(K - K.T).max()) > 1e-5 * max(scale, np.finfo(np.float64).tiny):
        raise SpectrumError(f"K must be symmetric: max |K - K^T| = {np.abs(K - K.T).max():.3g}")
    raw = np.linalg.eigvalsh(0.5 * (K + K.T) / n)[::-1]
    top = float(np.abs(raw).max())
    floor = n * eps_in * top
    if raw[-1] < -max(1e-9 * top, 10 * floor):  # the rounding tolerance of dynamics.psd_tolerance
        raise SpectrumError(
            f"K is not positive semi-definite: K/n has the eigenvalue {raw[-1]:.3g} against the largest {top:.3g}, "
            f"beyond rounding ({max(1e-9, 10 * n * eps_in):.1g} x largest); a Gram J J^T is PSD"
        )
    mu = np.clip(raw, 0.0, None)
    return Spectrum(mu, floor, float(raw.min()), int(np.sum(mu > floor)))


def _mu(mu: Any) -> np.ndarray:
    m = np.asarray(mu.detach().cpu().double().numpy() if hasattr(mu, "detach") else mu, dtype=np.float64)
    if m.ndim != 1 or m.size < 3 or not np.all(np.isfinite(m)):
        raise SpectrumError(f"mu must be a finite 1-D spectrum with >= 3 values, got shape {m.shape}")
    if np.any(np.diff(m) > 1e-12 * max(float(np.abs(m).max()), 1e-300)):
        raise SpectrumError("mu must be sorted in descending order (spectrum.eigenvalues returns it so)")
    return m


def default_range(mu: Any, *, floor: float = 0.0, drop_top: int = 3) -> tuple[int, int]:
    """Default fit range (1-based, inclusive): drop the top `drop_top` eigenvalues, keep every later one
    above `floor` (and > 0). mu: (n,) descending."""
    m = _mu(mu)
    above = np.nonzero(m > max(floor, 0.0))[0]
    last = int(above[-1]) + 1 if above.size else 0
    return drop_top + 1, last


def fit_power_law(
    mu: Any,
    *,
    index_range: tuple[int, int] | None = None,
    floor: float = 0.0,
    drop_top: int = 3,
    level: float = 0.95,
    bootstrap: int = 0,
    seed: int = 0,
) -> PowerLawFit:
    """Fit mu_i ~ C i^{-beta} by least squares of log mu_i on log i (docs/theory.md section 5).

    mu: (n,) descending eigenvalues (of K/n). index_range: (first, last), 1-based inclusive; default
    default_range(mu, floor, drop_top). The regression CI treats the residuals as independent, which they
    are not along a smooth spectrum: read it as the precision of the fit on that range, and compare ranges
    (or use bootstrap > 0 resamples of (i, mu_i) pairs, percentile interval) for the model error.
    """
    m = _mu(mu)
    first, last = default_range(m, floor=floor, drop_top=drop_top) if index_range is None else index_range
    first, last = int(first), int(last)
    if not (1 <= first and last <= m.size and last - first + 1 >= 3):
        raise SpectrumError(
            f"fit range {first}:{last} must lie in 1..{m.size} and hold >= 3 eigenvalues "
            f"(lower drop_top, or give index_range)"
        )
    if not np.all(m[first - 1 : last] > 0):
        raise SpectrumError(f"fit range {first}:{last} contains eigenvalues <= 0; end it before the floor")
    if not 0 < level < 1:
        raise SpectrumError(f"level must be in (0, 1), got {level}")
    x = np.log(np.arange(first, last + 1, dtype=np.float64))
    z = np.log(m[first - 1 : last])
    slope, intercept, se, r2 = ols(x, z)
    from scipy.stats import t as student_t

    q = float(student_t.ppf(0.5 + level / 2, df=max(x.size - 2, 1)))
    beta = -slope
    boot = None
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, x.size, size=(int(bootstrap), x.size))
        betas = np.array([-ols(x[i], z[i])[0] for i in idx if np.ptp(x[i]) > 0])
        lo, hi = np.quantile(betas, [0.5 - level / 2, 0.5 + level / 2])
        boot = (float(lo), float(hi))
    return PowerLawFit(
        float(beta), float(math.exp(intercept)), (beta - q * se, beta + q * se), float(se),
        first, last, float(level), boot, float(r2),
    )


def ols(x: np.ndarray, z: np.ndarray) -> tuple[float, float, float, float]:
    """z = a + b x by least squares, x and z (k,) -> (b, a, standard error of b, r^2)."""
    xm, zm = x.mean(), z.mean()
    sxx = float(((x - xm) ** 2).sum())
    b = float(((x - xm) * (z - zm)).sum()) / sxx
    a = zm - b * xm
    res = z - a - b * x
    dof = max(x.size - 2, 1)
    se = math.sqrt(float((res**2).sum()) / dof / sxx)
    szz = float(((z - zm) ** 2).sum())
    r2 = 1.0 - float((res**2).sum()) / szz if szz > 0 else 1.0
    return b, float(a), se, r2


def implied_rate(beta: float, sigma: float, n: int) -> float:
    """(sigma^2 / n)^{beta / (beta + 1)}: the squared-error rate of eigen-decay i^{-beta} (docs/theory.md
    sections 4-5)."""
    if not beta > 0 or not sigma > 0 or not n >= 1:
        raise SpectrumError(f"need beta > 0, sigma > 0, n >= 1; got beta={beta}, sigma={sigma}, n={n}")
    return float((sigma**2 / n) ** (beta / (beta + 1.0)))
