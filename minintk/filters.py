"""Spectral filters of kernel gradient descent and gradient flow (docs/theory.md section 3): how t steps (or
time s of flow) act on each eigenvalue of the Gram, with an optional ridge term and the limit t = inf. Also the
array conversions and checks the dynamics and the stopping rule share.

With eigenvalues l of K (not K/n), n training points, steps alpha_tau and a ridge lam >= 0 (the loss
(1/2n)||f - y||^2 + (lam/2)||f - f_0||_H^2, which for the linearized model is weight decay towards theta_0):

    h_t(l) = l / (l + n lam) * (1 - prod_{tau<t} (1 - alpha_tau (l/n + lam)))     (train outputs)
    g_t(l) = (1 - prod_{tau<t} (1 - alpha_tau (l/n + lam))) / (l + n lam)        (test outputs, via Theta(x, X))

so that u_t = u_0 + V h V^T (y - u_0) and f_t = f_0 + Theta(x, X) V g V^T (y - u_0). At lam = 0, g's limit at
l = 0 is eta_t / n (what iterating gives in the null space of K); at t = inf (a stable step) the filters are
those of kernel ridge regression with lam (min-norm interpolation at lam = 0). Flow replaces the product by
exp(-eta s (l/n + lam)).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_CHUNK = 2048  # schedule steps per block when accumulating log-products (bounds memory at _CHUNK x n)


class DynamicsError(ValueError):
    """An input to the dynamics (kernel, targets, steps, times) has a shape or value that cannot be used."""


def as_f64(x: Any, name: str) -> np.ndarray:
    """A numpy or torch array (or nested list, scalar) as a float64 numpy array; rejects non-finite values."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu()
        x = x.double() if hasattr(x, "double") else x
        x = x.numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DynamicsError(f"{name} must be a numeric array, got {type(x).__name__}: {e}") from None
    if not np.all(np.isfinite(a)):
        bad = int(np.sum(~np.isfinite(a)))
        raise DynamicsError(f"{name} has {bad} non-finite entries; give finite values")
    return a


def _steps(alpha: Any) -> np.ndarray:
    """alpha: a positive scalar (constant step) or a 1-D schedule (T,) of positive steps."""
    a = as_f64(alpha, "alpha")
    if a.ndim > 1 or a.size == 0 or np.any(a <= 0):
        raise DynamicsError(f"alpha must be a positive scalar or a 1-D array of positive steps, got {a!r}")
    return a


def _rate(eta: Any) -> float:
    e = as_f64(eta, "eta")
    if e.ndim != 0 or e <= 0:
        raise DynamicsError(f"eta (gradient-flow rate) must be a positive scalar, got {e!r}")
    return float(e)


def _times(t: Any, integer: bool, horizon: int | None) -> np.ndarray:
    """Times as fp64: >= 0, integers for gradient descent, within a schedule's horizon; +inf allowed (the limit)."""
    t = np.asarray(t.detach().cpu().double().numpy() if hasattr(t, "detach") else t, dtype=np.float64)
    if np.any(np.isnan(t)) or np.any(t < 0):
        raise DynamicsError(f"times must be >= 0 (inf allowed), got {t.min() if t.size else t}")
    finite = t[np.isfinite(t)]
    if integer and np.any(finite != np.round(finite)):
        raise DynamicsError("gradient-descent times are step counts: give integers (flow takes real times)")
    if horizon is not None and t.size and t.max() > horizon:
        raise DynamicsError(f"time {t.max():g} is past the end of the step schedule (length {horizon}); t = inf "
                            f"needs a constant step")
    return t


def _ridge(lam: Any) -> float:
    r = as_f64(lam, "lam")
    if r.ndim != 0 or r < 0:
        raise DynamicsError(f"lam (ridge) must be a scalar >= 0, got {r!r}")
    return float(r)


def step_sums(alpha: Any, t: Any) -> np.ndarray:
    """eta_t = sum_{tau<t} alpha_tau (docs/theory.md section 4). alpha: scalar or (T,); t: ints -> t.shape fp64."""
    a = _steps(alpha)
    t = _times(t, integer=True, horizon=None if a.ndim == 0 else a.size)
    if a.ndim == 0:
        return float(a) * t
    return np.concatenate([[0.0], np.cumsum(a)])[t.astype(np.int64)]


def gd_filters(l: Any, n: int, alpha: Any, t: Any, lam: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Spectral filters of t gradient-descent steps with ridge lam (module docstring).

    l: (p,) eigenvalues of K (not K/n); n: number of training points; alpha: step (scalar) or schedule (T,);
    t: step counts, any shape (np.inf: the limit, for a constant step that is stable: alpha (l_max/n + lam)
    < 2); lam: ridge >= 0. Returns h, g of shape t.shape + (p,). Raises DynamicsError for bad inputs.
    """
    l = as_f64(l, "l").reshape(-1)
    a, lam = _steps(alpha), _ridge(lam)
    tt = _times(t, integer=True, horizon=None if a.ndim == 0 else a.size)
    flat = tt.reshape(-1)
    ls = l + n * lam  # the eigenvalues the steps contract: of K + n lam I
    done = np.isinf(flat)
    if done.any() and float(a) * float(np.max(ls)) / n >= 2:
        raise DynamicsError(f"t = inf needs a stable step: alpha (l_max/n + lam) = {float(a) * np.max(ls) / n:.3g} "
                            f">= 2 (take alpha < {2 * n / np.max(ls):.3g}, see max_stable_step)")
    steps = np.where(done, 0.0, flat)
    if a.ndim == 0:
        x = float(a) * ls / n  # alpha (l/n + lam) per eigenvalue
        pos = x < 1.0  # every factor 1 - x > 0: stable log-form
        logq = np.where(pos, np.log1p(-np.where(pos, x, 0.0)), 0.0)
        with np.errstate(over="ignore", invalid="ignore"):
            base_stable = -np.expm1(steps[:, None] * logq[None, :])
            base_direct = 1.0 - np.power((1.0 - x)[None, :], steps[:, None])
        base = np.where(pos[None, :], base_stable, base_direct)
    else:
        base = _schedule_filter(ls / n, a, steps)
    h, g = _shifted(l, ls, base, step_sums(a, steps) / n, lam)
    h, g = np.where(done[:, None], _limit(l, ls, n)[0], h), np.where(done[:, None], _limit(l, ls, n)[1], g)
    shape = tt.shape + (l.size,)
    return h.reshape(shape), g.reshape(shape)


def _shifted(l: np.ndarray, ls: np.ndarray, base: np.ndarray, small: np.ndarray, lam: float):
    """(h, g) from base = 1 - prod(...) on the shifted eigenvalues ls: g = base / ls (limit `small` at ls = 0),
    h = base (lam = 0: the same value, full relative precision) or l g."""
    tiny = np.abs(ls) < np.finfo(np.float64).tiny
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(tiny[None, :], small[:, None], base / np.where(tiny, 1.0, ls)[None, :])
    return (base if lam == 0 else l[None, :] * g), g


def _limit(l: np.ndarray, ls: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The t = inf filters: kernel ridge's l / ls and 1 / ls, with directions of (numerically) zero ls left
    where they start (min-norm), as dynamics.kernel_ridge treats them."""
    cutoff = n * np.finfo(np.float64).eps * max(float(np.max(np.abs(ls))), np.finfo(np.float64).tiny)
    keep = np.abs(ls) > cutoff
    g = np.where(keep, 1.0 / np.where(keep, ls, 1.0), 0.0)
    return l * g, g


def _schedule_filter(mu: np.ndarray, a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """h_t = 1 - prod_{tau<t}(1 - a_tau mu) for a schedule a (T,), accumulated in blocks; t (m,) -> (m, p)."""
    order = np.argsort(t, kind="stable")
    out = np.empty((t.size, mu.size))
    logabs = np.zeros(mu.size)  # sum log |1 - a_tau mu|
    negs = np.zeros(mu.size, dtype=np.int64)  # number of negative factors
    zero = np.zeros(mu.size, dtype=bool)  # some factor is exactly 0
    cur = 0
    for k in order:
        stop = int(t[k])
        while cur < stop:
            nxt = min(stop, cur + _CHUNK)
            x = a[cur:nxt, None] * mu[None, :]
            pos = x < 1.0
            with np.errstate(divide="ignore"):
                logabs += np.where(pos, np.log1p(-np.where(pos, x, 0.0)), np.log(np.abs(1.0 - x))).sum(axis=0)
            negs += (x > 1.0).sum(axis=0)
            zero |= (x == 1.0).any(axis=0)
            cur = nxt
        with np.errstate(over="ignore", invalid="ignore"):
            stable = (negs == 0) & ~zero
            sign = np.where(negs % 2 == 0, 1.0, -1.0)
            out[k] = np.where(stable, -np.expm1(logabs), np.where(zero, 1.0, 1.0 - sign * np.exp(logabs)))
    return out


def flow_filters(l: Any, n: int, eta: float, s: Any, lam: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Spectral filters of gradient flow du/ds = -eta ((1/n) K (u - y) + lam (u - u_0)) at times s (any shape,
    real >= 0, np.inf for the limit). l: (p,) eigenvalues of K. Returns h = l/ls (1 - exp(-eta s ls / n)) and
    g = (1 - exp(-eta s ls / n)) / ls with ls = l + n lam (limit eta s / n at ls = 0), each s.shape + (p,)."""
    l = as_f64(l, "l").reshape(-1)
    eta, lam = _rate(eta), _ridge(lam)
    ss = _times(s, integer=False, horizon=None)
    flat = ss.reshape(-1)
    ls = l + n * lam
    done = np.isinf(flat)
    finite = np.where(done, 0.0, flat)
    with np.errstate(over="ignore"):
        base = -np.expm1(-eta * finite[:, None] * ls[None, :] / n)
    h, g = _shifted(l, ls, base, eta * finite / n, lam)
    h, g = np.where(done[:, None], _limit(l, ls, n)[0], h), np.where(done[:, None], _limit(l, ls, n)[1], g)
    shape = ss.shape + (l.size,)
    return h.reshape(shape), g.reshape(shape)
