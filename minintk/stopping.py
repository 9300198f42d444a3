"""When to stop gradient descent: the Raskutti-Wainwright-Yu rule, its drift variant, hold-out, oracle.

Everything follows docs/theory.md section 4. Inputs are the eigenvalues mu (n,) of the normalized kernel
K_n = K / n (spectrum.eigenvalues gives them, descending and clipped at 0), the noise level sigma of
y = f*(X) + w, and the steps alpha_t of gradient descent in function space (dynamics.py), whose running sum
is eta_t = sum_{tau<t} alpha_tau. The theory assumes ||f*||_H <= B with B = 1; for another B every function
takes `B` and applies the rule to y / B, whose noise level is sigma / B (see critical_radius).

Bias and variance bounds (Raskutti et al. 2014, proof of Theorem 1; units of ||.||_n^2; ||f*||_H <= B):
    bias      b(t) = B^2 / (e eta_t)
    variance  v(t) = 4 e sigma^2 eta_t R(1/sqrt(eta_t))^2 = (4 e sigma^2 / n) sum_i min(eta_t mu_i, 1).
The paper's variance lemma has the constant 5 where v has 4e (~10.87 > 5), so v is still an upper bound; 4e is
the constant for which the crossing b(t) = v(t) is exactly the published rule: v(t) <= b(t) is the same
inequality as R(1/sqrt(eta_t)) <= (2 e (sigma/B) eta_t)^{-1}. b decreases in t, v is non-decreasing
(each min(eta mu_i, 1) is), so the rule stops at the last t before v overtakes b.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import numpy as np

from .dynamics import as_f64, input_eps, kernel_eigh, psd_tolerance, step_sums

E = math.e


class StoppingError(ValueError):
    """An input to a stopping rule (spectrum, noise level, steps, curve) cannot be used."""


class BoundCurve(NamedTuple):
    """Bias, variance and drift bounds and their total over a grid of t, each (T+1,) in units of ||.||_n^2."""

    eta: np.ndarray
    bias: np.ndarray
    variance: np.ndarray
    drift: np.ndarray
    total: np.ndarray


class DriftStop(NamedTuple):
    """t_stop: the balancing stop (last t with v + Delta <= b); t_min: argmin of the total bound; curve."""

    t_stop: int
    t_min: int
    curve: BoundCurve


class HoldoutStop(NamedTuple):
    """stop_index: evaluation at which training stops; best_index: the best evaluation seen up to then;
    stopped: True when patience ran out before the curve ended."""

    stop_index: int
    best_index: int
    stopped: bool


class SigmaEstimate(NamedTuple):
    """sigma: estimated noise level; lam: ridge parameter of the fit used; dof: its tr(S)."""

    sigma: float
    lam: float
    dof: float


def as_spectrum(mu: Any) -> np.ndarray:
    """Eigenvalues of K/n as a 1-D fp64 array; negatives within rounding (dynamics.psd_tolerance) count as 0."""
    try:
        m = as_f64(mu, "mu")
    except ValueError as e:
        raise StoppingError(str(e)) from None
    if m.ndim != 1 or m.size == 0:
        raise StoppingError(f"mu must be the 1-D array of eigenvalues of K/n, got shape {m.shape}")
    tol = psd_tolerance(m.size, input_eps(mu)) * float(np.max(np.abs(m)))
    if m.min() < -tol:
        raise StoppingError(
            f"mu has the negative eigenvalue {m.min():.3g} (max |mu| = {np.max(np.abs(m)):.3g}): K is not "
            f"positive semi-definite beyond rounding"
        )
    return np.clip(m, 0.0, None)


def positive_number(x: Any, name: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise StoppingError(f"{name} must be a positive finite number, got {x!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise StoppingError(f"{name} must be a positive finite number, got {x!r}")
    return v


def local_rademacher(mu: Any, eps: Any) -> np.ndarray:
    """R(eps) = sqrt((1/n) sum_i min(mu_i, eps^2)) (docs/theory.md section 4). mu: (n,) eigenvalues of K/n;
    eps: any shape, >= 0 (inf allowed) -> eps.shape fp64. Non-decreasing in eps; R(eps)/eps non-increasing."""
    m = np.sort(as_spectrum(mu))
    e = np.asarray(eps, dtype=np.float64)  # +inf allowed: R(inf) = sqrt(mean(mu))
    if np.any(np.isnan(e)) or np.any(e < 0):
        raise StoppingError(f"eps must be >= 0 (inf allowed), got {e!r}")
    csum = np.concatenate([[0.0], np.cumsum(m)])
    e2 = e * e
    k = np.searchsorted(m, e2, side="right")  # number of mu_i <= eps^2
    with np.errstate(invalid="ignore"):
        tail = np.where(k < m.size, (m.size - k) * e2, 0.0)  # avoids 0 * inf at eps = inf
    return np.sqrt((csum[k] + tail) / m.size)


def critical_radius(mu: Any, sigma: float, *, B: float = 1.0) -> float:
    """eps_n: the smallest eps > 0 with R(eps) <= eps^2 / (2 e sigma') (docs/theory.md section 4), sigma' = sigma/B.

    With ||f*||_H <= B the rule is run on y / B, whose noise is sigma / B; eps_n is then in the units of
    y / B (the error bound in the units of y is B^2 * 12 eps_n^2, see error_bound). Found by bisection on
    log eps of phi(eps) = R(eps)/eps - eps/(2 e sigma'): R(eps)/eps = sqrt(mean(min(mu_i/eps^2, 1))) is
    non-increasing and eps/(2 e sigma') strictly increasing, so phi is strictly decreasing, the inequality
    holds exactly on [eps_n, inf), and eps_n is phi's unique root. Returns the upper end of the final
    bracket (relative width 1e-15), at which the inequality holds; 0.0 when K = 0.
    """
    m = as_spectrum(mu)
    s = positive_number(sigma, "sigma") / positive_number(B, "B")
    pos = m[m > 0]
    if pos.size == 0:
        return 0.0

    def phi(eps: float) -> float:
        return float(local_rademacher(m, eps)) / eps - eps / (2 * E * s)

    hi = 2 * E * s  # R(eps)/eps <= 1 = hi/(2 e s): phi(hi) <= 0
    # below sqrt(min positive mu), R(eps)/eps = sqrt(k/n), k = #{mu > 0}: phi(lo) > 0 once lo < 2es sqrt(k/n)
    lo = 0.5 * min(math.sqrt(pos.min()), 2 * E * s * math.sqrt(pos.size / m.size))
    for _ in range(400):
        if hi / lo - 1.0 <= 1e-15:
            break
        mid = math.sqrt(lo * hi)
        if phi(mid) > 0:
            lo = mid
        else:
            hi = mid
    return hi


def error_bound(mu: Any, sigma: float, *, B: float = 1.0) -> float:
    """12 B^2 eps_n^2: the bound on ||f_{T_hat} - f*||_n^2 that holds w.p. >= 1 - c1 exp(-c2 n eps_n^2)."""
    return 12.0 * float(B) ** 2 * critical_radius(mu, sigma, B=B) ** 2


def _rule_exceeded(m: np.ndarray, s: float, eta: float) -> bool:
    """R(1/sqrt(eta)) > (2 e s eta)^{-1}: the event that ends the run (False at eta = 0)."""
    if eta <= 0:
        return False
    return float(local_rademacher(m, 1.0 / math.sqrt(eta))) > 1.0 / (2 * E * s * eta)


def default_step(mu: Any) -> float:
    """min(1, 1/mu_1), mu_1 the largest eigenvalue of K/n: the largest constant step Raskutti et al.'s analysis
    admits (alpha_t <= min(1, 1/mu_1), docs/theory.md section 4). Gradient descent on (1/2n)||f - y||^2 is
    stable for alpha < 2/mu_1, so this step always is. Raises StoppingError for a spectrum with no positive
    eigenvalue."""
    m = as_spectrum(mu)
    if m.size == 0 or m[0] <= 0:
        raise StoppingError("K/n has no positive eigenvalue: no step size follows from it")
    return min(1.0, 1.0 / float(m[0]))


def stopping_time(mu: Any, sigma: float, alpha: Any = None, *, B: float = 1.0) -> int:
    """T_hat = argmin{t : R(1/sqrt(eta_t)) > (2 e sigma' eta_t)^{-1}} - 1 (docs/theory.md section 4), sigma' =
    sigma/B, in gradient-descent steps.

    mu: (n,) eigenvalues of K/n (not of K: spectrum.eigenvalues divides by n; for several outputs, of the
    traced Gram ntk(..., trace=True), the mean over outputs); sigma: noise level of y, in y's units; alpha:
    constant step or schedule (T,) with eta_t its running sum; None (default) takes default_step(mu) =
    min(1, 1/mu_1). The event is monotone in t (it is eta_t > 1/eps_n^2, and eta_t
    increases): the first t is found by bisection on t, evaluating the rule itself. A schedule that ends before
    the event returns its length T (run to the end). Warns (UserWarning) when a constant step is unstable
    (alpha mu_1 >= 2: gradient descent diverges on this Gram) and when the rule stops at T_hat = 0 (the noise
    sigma/B dominates from the first step). Raises StoppingError for invalid inputs.
    """
    m = as_spectrum(mu)
    s = positive_number(sigma, "sigma") / positive_number(B, "B")
    a = as_f64(default_step(m) if alpha is None else alpha, "alpha")
    if a.ndim > 1 or a.size == 0 or np.any(a <= 0):
        raise StoppingError(f"alpha must be a positive scalar or 1-D schedule of positive steps, got {a!r}")
    if m.size and float(np.max(a)) * float(m[0]) >= 2:
        warnings.warn(f"step alpha = {float(np.max(a)):.4g} times mu_1 = {float(m[0]):.4g} (top eigenvalue of K/n) "
                      f"is >= 2: gradient descent diverges on this Gram; take alpha < 2/mu_1 (default "
                      f"min(1, 1/mu_1) = {min(1.0, 1 / float(m[0])) if m[0] > 0 else 1.0:.4g})", stacklevel=2)
    t_hat = _first_event(m, s, a) - 1
    if t_hat == 0:
        warnings.warn(f"the rule stops at T_hat = 0: with sigma/B = {s:.4g} the variance bound overtakes the bias "
                      f"bound at the first step (eta_1 = {float(a.flat[0]):.4g} > 1/eps_n^2); check sigma and B in "
                      f"y's units, or take a smaller step", stacklevel=2)
    return t_hat


def _first_event(m: np.ndarray, s: float, a: np.ndarray) -> int:
    """The first t with R(1/sqrt(eta_t)) > (2 e s eta_t)^{-1} (a schedule's length + 1 if it never happens)."""
    eps_n = critical_radius(m, s)
    if a.ndim == 1:
        eta = step_sums(a, np.arange(a.size + 1))
        if not _rule_exceeded(m, s, float(eta[-1])):
            return int(a.size) + 1
        cond = lambda t: _rule_exceeded(m, s, float(eta[t]))  # noqa: E731
        hi = a.size
    else:
        if eps_n == 0.0:
            raise StoppingError("K/n has no positive eigenvalue: the rule never stops (give a schedule)")
        step = float(a)
        cond = lambda t: _rule_exceeded(m, s, step * t)  # noqa: E731
        hi = max(2, int(math.floor(1.0 / (step * eps_n**2))) + 2)
        while not cond(hi):  # guards the float rounding of 1/eps_n^2
            hi *= 2
    lo = 0  # cond(lo) is False, cond(hi) is True
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cond(mid):
            hi = mid
        else:
            lo = mid
    return hi


def bound_curve(mu: Any, sigma: float, eta: Any, *, B: float = 1.0, delta: Any = None) -> BoundCurve:
    """b(t) = B^2/(e eta_t), v(t) = (4 e sigma^2/n) sum_i min(eta_t mu_i, 1), Delta(t), and their sum.

    mu: (n,) eigenvalues of K/n; eta: (T+1,) running step sums (dynamics.step_sums); delta: None or (T+1,).
    b is inf at eta = 0.
    """
    m = as_spectrum(mu)
    sig = positive_number(sigma, "sigma")
    b2 = positive_number(B, "B") ** 2
    eta = as_f64(eta, "eta").reshape(-1)
    with np.errstate(divide="ignore"):
        bias = np.where(eta > 0, b2 / (E * np.where(eta > 0, eta, 1.0)), np.inf)
    r2 = local_rademacher(m, np.where(eta > 0, 1.0 / np.sqrt(np.where(eta > 0, eta, 1.0)), np.inf)) ** 2
    var = np.where(eta > 0, 4 * E * sig**2 * eta * r2, 0.0)
    drift = np.zeros_like(eta) if delta is None else _drift(delta, eta.size)
    return BoundCurve(eta, bias, var, drift, bias + var + drift)


def _drift(delta: Any, size: int) -> np.ndarray:
    d = as_f64(delta, "delta").reshape(-1)
    if d.size != size:
        raise StoppingError(f"delta must have one value per t = 0..T ({size} values), got {d.size}")
    if np.any(d < 0) or np.any(np.diff(d) < -1e-12 * max(1.0, float(np.abs(d).max()))):
        raise StoppingError(
            "delta must be >= 0 and non-decreasing in t; take np.maximum.accumulate of a measured curve"
        )
    return d


def drift_stopping_time(mu: Any, sigma: float, alpha: Any, delta: Any, *, B: float = 1.0) -> DriftStop:
    """Sun & Raskutti's rule for a moving kernel: a non-decreasing Delta(t) joins the bound (docs/theory.md section 4).

    Total bound Phi(t) = b(t) + v(t) + Delta(t) (module doc; Delta in units of ||.||_n^2, e.g. from
    drift_from_predictions). Stops by balancing: t_stop = last t in 0..T with v(t) + Delta(t) <= b(t). Since b
    decreases and v + Delta does not, {t : v + Delta <= b} = {0..t_stop}, so
      * Delta = 0 gives exactly T_hat of stopping_time (same inequality), capped at T;
      * a larger Delta never stops later;
      * Phi(t_stop) <= 2 (eta_{t_stop+1} / eta_{t_stop}) min_t Phi(t): the smallest total bound up to the
        balancing principle's factor (t <= t_stop: Phi >= b(t_stop); t > t_stop: Phi > b(t_stop + 1)).
    t_min, the exact argmin of Phi over 1..T, is returned too. delta: (T+1,) for t = 0..T; alpha: constant
    or a schedule of length >= T.
    """
    d = as_f64(delta, "delta").reshape(-1)
    a = as_f64(alpha, "alpha")
    if a.ndim == 1 and a.size < d.size - 1:
        raise StoppingError(f"the schedule has {a.size} steps but delta covers t = 0..{d.size - 1}")
    if a.ndim > 1 or np.any(a <= 0):
        raise StoppingError(f"alpha must be a positive scalar or 1-D schedule of positive steps, got {a!r}")
    eta = step_sums(a if a.ndim == 0 else a[: d.size - 1], np.arange(d.size))
    curve = bound_curve(mu, sigma, eta, B=B, delta=d)
    ok = curve.variance + curve.drift <= curve.bias
    t_stop = int(np.argmin(ok)) - 1 if not ok.all() else d.size - 1
    t_min = 1 + int(np.argmin(curve.total[1:])) if d.size > 1 else 0
    return DriftStop(t_stop, t_min, curve)


def drift_from_predictions(f_net: Any, f_lin: Any) -> np.ndarray:
    """Delta(t) = max_{tau<=t} ||f_net,tau - f_lin,tau||_n^2 from a training run (network vs its linearization
    on the n training points). f_net, f_lin: (T+1, n) or (T+1, n, C) -> (T+1,) non-decreasing."""
    a, b = as_f64(f_net, "f_net"), as_f64(f_lin, "f_lin")
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise StoppingError(f"f_net and f_lin must both be (T+1, n[, C]), got {a.shape} and {b.shape}")
    sq = (a - b) ** 2
    per_t = sq.reshape(sq.shape[0], sq.shape[1], -1).sum(axis=2).mean(axis=1)
    return np.maximum.accumulate(per_t)


def holdout_stop(val: Any, patience: int) -> HoldoutStop:
    """Hold-out early stopping on a validation curve val (k,) evaluated in order (lower is better).

    An evaluation improves when it is strictly below the best so far (NaN never improves). Training stops at
    the first evaluation that is the `patience`-th in a row without improvement; the model kept is the best
    evaluation seen up to then (first one on ties). If the curve ends first, stop_index = k - 1 and
    stopped = False. E.g. val = [5, 4, 3, 3.5, 3.6, 3.7, 2], patience = 3 -> stop 5, best 2.
    """
    v = np.asarray(val, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise StoppingError("the validation curve is empty")
    if int(patience) != patience or patience < 1:
        raise StoppingError(f"patience must be an integer >= 1, got {patience!r}")
    best, best_i, since = np.inf, 0, 0
    for i, x in enumerate(v):
        if x < best:
            best, best_i, since = float(x), i, 0
        else:
            since += 1
            if since >= patience:
                return HoldoutStop(i, best_i, True)
    return HoldoutStop(v.size - 1, best_i, False)


def oracle_stop(err: Any) -> int:
    """The oracle stopping index: argmin of the true error curve err (k,) in hindsight (first on ties)."""
    e = as_f64(err, "err").reshape(-1)
    if e.size == 0:
        raise StoppingError("the error curve is empty")
    return int(np.argmin(e))


def estimate_sigma(K: Any, y: Any, lam: float | None = None) -> SigmaEstimate:
    """Noise level from a kernel ridge fit: sigma^2 = ||y - S y||^2 / (n - tr S), S = K (K + n lam I)^{-1}.

    K: (n, n); y: (n,) or (n, C) (pooled over columns). lam None picks lam by generalized cross-validation,
    GCV(lam) = n ||(I - S) y||^2 / (n - tr S)^2, on 241 log-spaced values in [1e-10, 10] * mu_1, keeping
    tr S <= n / 2 so that the residual keeps at least half of the degrees of freedom. The estimator (Wahba
    1983) is consistent when the fit's bias ||(I - S) f*||^2 / n -> 0; otherwise that bias inflates it.
    """
    l, V = kernel_eigh(K)
    n = l.size
    Y = as_f64(y, "y")
    if Y.ndim not in (1, 2) or Y.shape[0] != n:
        raise StoppingError(f"y must be (n,) or (n, C) with n = {n}, got {Y.shape}")
    mu = np.clip(l / n, 0.0, None)
    c2 = ((V.T @ Y.reshape(n, -1)) ** 2).sum(axis=1)  # squared coordinates of y in the eigenbasis
    cols = Y.reshape(n, -1).shape[1]

    def fit(lams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = mu[None, :] / (mu[None, :] + lams[:, None])
        return ((1 - s) ** 2 * c2[None, :]).sum(axis=1), s.sum(axis=1)

    if lam is None:
        top = max(float(mu.max()), np.finfo(np.float64).tiny)
        grid = top * np.logspace(-10, 1, 241)
        rss, dof = fit(grid)
        ok = dof <= n / 2
        if not ok.any():
            raise StoppingError("no ridge parameter keeps tr S <= n/2; give lam explicitly")
        gcv = np.where(ok, n * rss / np.maximum(n - dof, 1e-300) ** 2, np.inf)
        lam_v = float(grid[int(np.argmin(gcv))])
    else:
        lam_v = positive_number(lam, "lam")
    rss, dof = fit(np.array([lam_v]))
    sigma2 = float(rss[0]) / (cols * (n - float(dof[0])))
    return SigmaEstimate(math.sqrt(sigma2), lam_v, float(dof[0]))
