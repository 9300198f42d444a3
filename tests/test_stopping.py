"""The stopping rules (minintk.stopping) against their definitions (docs/theory.md section 4) and closed forms."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minintk.dynamics import gradient_descent_mse, step_sums
from minintk.spectrum import implied_rate
from minintk.stopping import (
    StoppingError,
    bound_curve,
    critical_radius,
    drift_from_predictions,
    drift_stopping_time,
    error_bound,
    estimate_sigma,
    holdout_stop,
    local_rademacher,
    oracle_stop,
    stopping_time,
)

E = math.e
spectra = st.lists(st.floats(0.0, 10.0), min_size=1, max_size=40).map(np.array)


def R_direct(mu: np.ndarray, eps: float) -> float:
    """R(eps) = sqrt((1/n) sum_i min(mu_i, eps^2)), written out."""
    return math.sqrt(sum(min(m, eps * eps) for m in mu) / len(mu))


@given(mu=spectra, eps=st.floats(0.0, 5.0))
def test_local_rademacher_is_its_formula(mu, eps):
    got = float(local_rademacher(mu, eps))
    assert got == pytest.approx(R_direct(mu, eps), rel=1e-12, abs=1e-300)
    assert float(local_rademacher(mu, np.inf)) == pytest.approx(math.sqrt(mu.mean()), rel=1e-12, abs=1e-300)


@given(mu=spectra.filter(lambda m: m.max() > 1e-6), sigma=st.floats(0.01, 10.0))
def test_critical_radius_solves_its_fixed_point(mu, sigma):
    eps = critical_radius(mu, sigma)
    lhs, rhs = R_direct(mu, eps), eps * eps / (2 * E * sigma)
    assert lhs <= rhs * (1 + 1e-12), f"R(eps_n) = {lhs} > eps_n^2/(2 e sigma) = {rhs}"
    below = eps * (1 - 1e-9)
    assert R_direct(mu, below) > below * below / (2 * E * sigma), "a smaller eps already satisfies the inequality"


def test_critical_radius_closed_form_for_a_flat_spectrum():
    """r eigenvalues c, the rest 0: while eps^2 <= c, R(eps) = eps sqrt(r/n), so eps_n = 2 e sigma sqrt(r/n)."""
    n, r, c, sigma = 100, 9, 1.0, 0.5
    mu = np.r_[np.full(r, c), np.zeros(n - r)]
    expect = 2 * E * sigma * math.sqrt(r / n)
    assert expect**2 <= c
    assert critical_radius(mu, sigma) == pytest.approx(expect, rel=1e-13)
    assert error_bound(mu, sigma) == pytest.approx(12 * expect**2, rel=1e-12)
    assert critical_radius(np.zeros(5), 1.0) == 0.0


@pytest.mark.parametrize("beta", [1.5, 2.0, 3.0])
def test_critical_radius_has_the_power_law_rate(beta):
    """mu_i = i^-beta: eps_n^2 ~ (sigma^2/n)^(beta/(beta+1)) (docs/theory.md section 4), the rate
    spectrum.implied_rate gives."""
    ns = np.array([2000, 8000, 32000])
    eps2 = [critical_radius(np.arange(1, n + 1, dtype=float) ** -beta, 0.5) ** 2 for n in ns]
    slope = np.polyfit(np.log(ns), np.log(eps2), 1)[0]
    assert slope == pytest.approx(-beta / (beta + 1), abs=0.02), f"beta={beta}: log-log slope {slope:.4f}"
    ratio = [e / implied_rate(beta, 0.5, int(n)) for e, n in zip(eps2, ns)]
    assert max(ratio) / min(ratio) < 1.1, f"eps_n^2 / implied_rate drifts with n: {ratio}"


def first_exceeding(mu, sigma, eta):
    """Brute force: the first t with R(1/sqrt(eta_t)) > (2 e sigma eta_t)^-1 (docs/theory.md section 4), or None."""
    for t, e in enumerate(eta):
        if e > 0 and R_direct(mu, 1 / math.sqrt(e)) > 1 / (2 * E * sigma * e):
            return t
    return None


@given(
    mu=spectra.filter(lambda m: m.max() > 1e-3),
    sigma=st.floats(0.05, 3.0),
    alpha=st.floats(0.1, 2.0),
)
def test_stopping_time_is_the_published_rule(mu, sigma, alpha):
    t_hat = stopping_time(mu, sigma, alpha)
    eta = alpha * np.arange(t_hat + 3)
    assert first_exceeding(mu, sigma, eta) == t_hat + 1
    # equivalently the last t with eta_t <= 1/eps_n^2
    eps = critical_radius(mu, sigma)
    assert eta[t_hat] <= 1 / eps**2 * (1 + 1e-9) and eta[t_hat + 1] > 1 / eps**2 * (1 - 1e-9)


@given(mu=spectra.filter(lambda m: m.max() > 1e-3), sigma=st.floats(0.05, 3.0), seed=st.integers(0, 1000))
def test_stopping_time_with_a_schedule(mu, sigma, seed):
    alpha = np.random.default_rng(seed).uniform(0.05, 1.0, size=60)
    t_hat = stopping_time(mu, sigma, alpha)
    first = first_exceeding(mu, sigma, step_sums(alpha, np.arange(61)))
    assert t_hat == (60 if first is None else first - 1)


def test_norm_bound_rescaling():
    mu = np.arange(1, 201, dtype=float) ** -2.0
    assert stopping_time(mu, 0.3, 1.0, B=2.0) == stopping_time(mu, 0.15, 1.0)
    assert stopping_time(mu, 0.3, 1.0, B=2.0) > stopping_time(mu, 0.3, 1.0)  # a larger f* needs longer
    assert error_bound(mu, 0.3, B=2.0) == pytest.approx(4 * 12 * critical_radius(mu, 0.15) ** 2, rel=1e-12)


def test_bias_variance_curves_cross_at_the_rule():
    mu = np.arange(1, 301, dtype=float) ** -2.0
    sigma, alpha, T = 0.2, 0.7, 400
    t_hat = stopping_time(mu, sigma, alpha)
    c = bound_curve(mu, sigma, step_sums(alpha, np.arange(T + 1)))
    n = mu.size
    v = 4 * E * sigma**2 / n * np.minimum(np.outer(c.eta, mu), 1).sum(1)
    assert np.allclose(c.variance, v, rtol=1e-12) and np.allclose(c.bias[1:], 1 / (E * c.eta[1:]), rtol=1e-14)
    assert c.variance[t_hat] <= c.bias[t_hat] and c.variance[t_hat + 1] > c.bias[t_hat + 1]


def test_drift_variant():
    mu = np.arange(1, 301, dtype=float) ** -2.0
    sigma, alpha, T = 0.2, 1.0, 300
    t_hat = stopping_time(mu, sigma, alpha)
    zero = drift_stopping_time(mu, sigma, alpha, np.zeros(T + 1))
    assert zero.t_stop == t_hat, "Delta = 0 must reduce to the rule"
    assert zero.t_min == 1 + int(np.argmin(zero.curve.total[1:]))
    delta = np.maximum.accumulate(1e-4 * np.arange(T + 1) ** 1.5)
    moved = drift_stopping_time(mu, sigma, alpha, delta)
    assert moved.t_stop < t_hat, f"a growing Delta must stop earlier: {moved.t_stop} vs {t_hat}"
    c = moved.curve
    assert c.variance[moved.t_stop] + delta[moved.t_stop] <= c.bias[moved.t_stop]
    assert c.variance[moved.t_stop + 1] + delta[moved.t_stop + 1] > c.bias[moved.t_stop + 1]
    assert drift_stopping_time(mu, sigma, alpha, np.zeros(11)).t_stop == min(t_hat, 10)  # capped at T
    with pytest.raises(StoppingError, match="non-decreasing"):
        drift_stopping_time(mu, sigma, alpha, np.array([0.0, 0.2, 0.1]))


def test_drift_from_predictions():
    f_lin = np.zeros((4, 3))
    f_net = np.array([[0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 2, 0]], dtype=float)
    assert np.allclose(drift_from_predictions(f_net, f_lin), [0, 1 / 3, 1 / 3, 4 / 3])


def test_holdout_stop_and_oracle():
    assert holdout_stop([5, 4, 3, 3.5, 3.6, 3.7, 2], 3) == (5, 2, True)
    assert holdout_stop([5, 4, 3, 3.5, 3.6, 3.7, 2], 4) == (6, 6, False)
    assert holdout_stop([3, 3, 3], 2) == (2, 0, True)  # ties do not improve; the first is kept
    assert holdout_stop([np.nan, 2.0, np.nan, np.nan], 2) == (3, 1, True)
    assert oracle_stop([3.0, 1.0, 2.0, 1.0]) == 1
    with pytest.raises(StoppingError, match="patience"):
        holdout_stop([1.0, 2.0], 0)


def sobolev_problem(n: int, sigma: float, seed: int):
    x = np.arange(1, n + 1) / n
    K = np.minimum.outer(x, x)
    fstar = np.abs(x - 0.5) - 0.5  # ||f*||_H^2 = int f'^2 = 1
    return K, fstar, fstar + sigma * np.random.default_rng(seed).standard_normal(n)


def test_sigma_estimator_on_synthetic_data():
    """estimate_sigma (GCV ridge, ||y - S y||^2 / (n - tr S)) recovers a known noise level within a few %."""
    for sigma in (0.1, 1.0):
        est = [estimate_sigma(sobolev_problem(300, sigma, s)[0], sobolev_problem(300, sigma, s)[2]).sigma
               for s in range(6)]
        assert np.mean(est) == pytest.approx(sigma, rel=0.05), f"sigma={sigma}: estimates {est}"
    K, fstar, _ = sobolev_problem(50, 1.0, 0)
    assert estimate_sigma(K, fstar).sigma < 0.02  # no noise: the estimate is the small fit bias only


def test_the_rule_meets_its_guarantee_on_the_sobolev_problem():
    n, sigma = 400, 0.5
    K, fstar, _ = sobolev_problem(n, sigma, 0)
    mu = np.clip(np.linalg.eigvalsh(K / n)[::-1], 0, None)
    t_hat = stopping_time(mu, sigma, 1.0)
    for seed in range(3):
        y = sobolev_problem(n, sigma, seed)[2]
        err = np.mean((gradient_descent_mse(K, y, 1.0)(t_hat) - fstar) ** 2)
        assert err <= error_bound(mu, sigma), f"||f_T - f*||_n^2 = {err:.3g} > 12 eps_n^2"


def load_simulation():
    path = Path(__file__).resolve().parents[1] / "scripts" / "stopping_simulation.py"
    spec = importlib.util.spec_from_file_location("stopping_simulation", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reduced_stopping_simulation(tmp_path):
    """scripts/stopping_simulation.py at n = 50..800 with 10 draws (the full run: n to 3200, 20 draws): errors fall
    with n near the -2/3 rate for the Sobolev kernel, faster for the Gaussian one, the rule stays within a constant
    of the oracle and under its 12 eps_n^2 bound; the report files are written."""
    sim = load_simulation()
    assert sim.main(["--ns", "50,100,200,400,800", "--reps", "10", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "stopping_simulation.json").read_text())
    assert (tmp_path / "stopping_simulation.png").stat().st_size > 10_000
    assert "| log-log slope" in (tmp_path / "stopping_simulation.md").read_text()
    sob, gau = res["kernels"]["sobolev"], res["kernels"]["gaussian"]
    for k in (sob, gau):
        for r in k["rows"]:
            assert r["mean_oracle"] <= r["mean_rule"] <= r["bound_12eps2"]
            assert r["ratio_rule_oracle"] < 12, f"rule/oracle = {r['ratio_rule_oracle']:.2f} at n = {r['n']}"
    slope = {name: k["slopes"]["rule"]["slope"] for name, k in res["kernels"].items()}
    assert -0.9 < slope["sobolev"] < -0.4, f"Sobolev rule: log-log slope {slope['sobolev']:.3f}, expected ~ -2/3"
    assert slope["gaussian"] < slope["sobolev"] - 0.2, f"the Gaussian kernel's rate is not faster: {slope}"
    assert sob["slopes"]["bound_12eps2"]["slope"] == pytest.approx(-2 / 3, abs=0.1)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: critical_radius(np.ones(3), 0.0), "sigma must be a positive"),
        (lambda: critical_radius(np.ones(3), -1.0), "sigma must be a positive"),
        (lambda: stopping_time(np.ones(3), "x"), "sigma must be a positive"),
        (lambda: critical_radius(np.array([1.0, np.nan]), 1.0), "non-finite"),
        (lambda: critical_radius(np.array([1.0, -0.5]), 1.0), "positive semi-definite"),
        (lambda: critical_radius(np.ones((2, 2)), 1.0), "1-D"),
        (lambda: estimate_sigma(np.eye(3), np.ones(4)), "n = 3"),
        (lambda: local_rademacher(np.ones(3), -1.0), "eps must be"),
    ],
)
def test_bad_input_gives_a_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
