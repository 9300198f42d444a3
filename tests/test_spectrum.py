"""Spectra and eigen-decay fits (minintk.spectrum) against synthetic spectra and a kernel of known decay."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minintk.plots import plot_spectrum
from minintk.spectrum import (
    SpectrumError,
    default_range,
    eigenvalues,
    fit_power_law,
    implied_rate,
)


def noisy_power_law(beta: float, n: int, s: float, seed: int) -> np.ndarray:
    """i^-beta with multiplicative log-normal noise exp(s z_i), sorted descending as a spectrum is."""
    z = np.random.default_rng(seed).standard_normal(n)
    return np.sort(np.arange(1, n + 1) ** -beta * np.exp(s * z))[::-1]


@given(beta=st.floats(0.5, 3.0), seed=st.integers(0, 2**31 - 1))
def test_decay_fit_recovers_beta_within_0_05(beta, seed):
    """Issue 6 acceptance: beta in 0.5..3, 10% multiplicative noise, 200 eigenvalues, default range 4..200."""
    fit = fit_power_law(noisy_power_law(beta, 200, 0.1, seed))
    assert (fit.first, fit.last) == (4, 200)
    assert abs(fit.beta - beta) <= 0.05, f"beta = {beta:.3f}, fitted {fit.beta:.4f}"


def test_decay_fit_is_exact_on_an_exact_power_law():
    mu = 3.0 * np.arange(1, 101, dtype=float) ** -1.7
    fit = fit_power_law(mu, index_range=(2, 90))
    assert fit.beta == pytest.approx(1.7, abs=1e-12) and fit.C == pytest.approx(3.0, rel=1e-10)
    assert fit.beta_ci[1] - fit.beta_ci[0] < 1e-10 and fit.r2 == pytest.approx(1.0)


def test_confidence_interval_has_its_coverage():
    """With independent log-normal noise small enough not to reorder the spectrum (the regression's own
    assumptions), the 95% interval covers the true beta in about 95% of draws, and the bootstrap one too."""
    beta, n, s = 2.0, 60, 0.004
    covered = boot_covered = 0
    draws = 40
    for seed in range(draws):
        z = np.random.default_rng(seed).standard_normal(n)
        mu = np.arange(1, n + 1) ** -beta * np.exp(s * z)
        assert np.all(np.diff(mu) < 0), "the noise must not reorder the spectrum for this test"
        fit = fit_power_law(mu, index_range=(4, n), bootstrap=100, seed=seed)
        covered += fit.beta_ci[0] <= beta <= fit.beta_ci[1]
        boot_covered += fit.bootstrap_ci[0] <= beta <= fit.bootstrap_ci[1]
        assert fit.beta_ci[1] - fit.beta_ci[0] < 0.05
    assert covered >= 0.85 * draws, f"regression CI covered beta in {covered}/{draws} draws"
    assert boot_covered >= 0.8 * draws, f"bootstrap CI covered beta in {boot_covered}/{draws} draws"


def test_sobolev_kernel_has_beta_2():
    """min(x, x') on [0, 1] has eigenvalues ~ 1/((k - 1/2)^2 pi^2): beta = 2 (docs/theory.md section 4)."""
    n = 400
    x = np.arange(1, n + 1) / n
    spec = eigenvalues(np.minimum.outer(x, x))
    assert spec.mu[0] == pytest.approx(4 / math.pi**2, rel=0.01)
    fit = fit_power_law(spec.mu, index_range=(10, 100))
    assert fit.beta == pytest.approx(2.0, abs=0.05), f"fitted beta {fit.beta:.4f}"


def test_eigenvalues_normalize_sort_and_floor():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((30, 8))
    K = A @ A.T  # rank 8: 22 eigenvalues are rounding noise
    spec = eigenvalues(K)
    assert np.allclose(spec.mu, np.clip(np.linalg.eigvalsh(K)[::-1] / 30, 0, None), atol=1e-13)
    assert np.all(np.diff(spec.mu) <= 0) and spec.mu.min() >= 0
    assert spec.n_above_floor == 8
    assert default_range(spec.mu, floor=spec.floor) == (4, 8)
    spec32 = eigenvalues(torch.from_numpy(K).float())
    assert spec32.floor > 1e6 * spec.floor  # fp32 Grams have a higher numerical floor
    assert spec32.n_above_floor == 8


def test_implied_rate():
    assert implied_rate(2.0, 1.0, 1000) == pytest.approx(1000 ** (-2 / 3))
    assert implied_rate(1.0, 0.5, 100) == pytest.approx((0.25 / 100) ** 0.5)
    # faster decay, fewer samples for the same error
    assert implied_rate(3.0, 1.0, 500) < implied_rate(1.0, 1.0, 500)


def test_plot_spectrum_writes_a_png(tmp_path):
    mu = noisy_power_law(1.5, 80, 0.05, 0)
    path = plot_spectrum(mu, fit_power_law(mu), tmp_path / "sub" / "spectrum.png", floor=1e-8)
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: eigenvalues(np.array([[1.0, 0.3], [0.0, 1.0]])), "symmetric"),
        (lambda: eigenvalues(np.array([[1.0, 2.0], [2.0, 1.0]])), "positive semi-definite"),
        (lambda: eigenvalues(np.array([[1.0, np.nan], [np.nan, 1.0]])), "non-finite"),
        (lambda: eigenvalues(np.ones(3)), "square"),
        (lambda: fit_power_law(np.arange(1.0, 20.0)), "descending"),
        (lambda: fit_power_law(np.arange(20.0, 0.0, -1.0), index_range=(5, 6)), ">= 3 eigenvalues"),
        (lambda: fit_power_law(np.r_[np.arange(20.0, 1.0, -1.0), 0.0], index_range=(2, 20)), "<= 0"),
        (lambda: implied_rate(2.0, 0.0, 10), "sigma > 0"),
    ],
)
def test_bad_input_gives_a_clear_error(call, match):
    with pytest.raises(SpectrumError, match=match):
        call()
