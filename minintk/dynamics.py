"""Function-space dynamics of kernel regression under the square loss (docs/theory.md section 3).

Loss L(f) = (1/2n) ||f(X) - y||^2 on n training points, kernel K = Theta(X, X) (n, n), cross kernel
Theta(x, X) (m, n). Gradient descent with steps alpha_0, alpha_1, ... moves the outputs as

    u_{t+1} = u_t - (alpha_t / n) K (u_t - y),     f_{t+1}(x) = f_t(x) - (alpha_t / n) Theta(x, X) (u_t - y),

which is exact for the linearized network (Lee et al. 2019) and for kernel regression. With one
eigendecomposition K = V diag(l) V^T both are closed forms in the eigenbasis (docs/theory.md section 3):

    u_t  = u_0 + V diag(h_t(l)) V^T (y - u_0),          h_t(l) = 1 - prod_{tau<t} (1 - alpha_tau l / n)
    f_t  = f_0 + Theta(x, X) V diag(g_t(l)) V^T (y - u_0),   g_t(l) = h_t(l) / l,

g_t being the eigenvalue form of K^{-1} (I - (I - alpha K/n)^t). K^{-1} is never formed: for l -> 0,
g_t(l) -> eta_t / n with eta_t = sum_{tau<t} alpha_tau, which is exactly what iterating the update gives in
the null space of K. h_t is evaluated as -expm1(sum log1p(-alpha_tau l / n)) so that tiny eigenvalues keep
full relative precision. Gradient flow du/ds = -(eta/n) K (u - y) replaces the product by exp(-eta s l / n).

The eigenvalues are used as they are (no clipping): the closed forms reproduce iterating the given matrix.
K must be symmetric and PSD up to rounding: an eigenvalue below -max(1e-9, 10 n eps) * max|l| (eps of K's
own dtype, so fp32 Grams get a looser tolerance) is an error; the small negative ones rounding leaves are
kept, and grow (slowly) under gradient descent exactly as they do in the iteration. Arrays may be numpy or
torch; everything is computed and returned as float64 numpy. y is (n,) or (n, C): every output column shares
K (the trace-over-outputs kernel of docs/theory.md section 2).
"""

from __future__ import annotations

from collections.abc import Callable
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


def check_kernel(K: Any, name: str = "K") -> np.ndarray:
    """Validate a square, (nearly) symmetric Gram and return its symmetric part. K: (n, n) -> (n, n) fp64."""
    K = as_f64(K, name)
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise DynamicsError(f"{name} must be a non-empty square (n, n) matrix, got shape {K.shape}")
    scale = float(np.max(np.abs(K))) if K.size else 0.0
    asym = float(np.max(np.abs(K - K.T))) if K.size else 0.0
    if asym > 1e-5 * max(scale, np.finfo(np.float64).tiny):
        raise DynamicsError(f"{name} must be symmetric: max |K - K^T| = {asym:.3g} vs max |K| = {scale:.3g}")
    return 0.5 * (K + K.T)


def input_eps(x: Any) -> float:
    """Machine epsilon of an array's own floating dtype (torch or numpy); fp64's for anything else."""
    dt = getattr(x, "dtype", None)
    if dt is not None and hasattr(dt, "is_floating_point"):  # torch dtype
        import torch

        return float(torch.finfo(dt).eps) if dt.is_floating_point else float(np.finfo(np.float64).eps)
    if dt is not None and np.issubdtype(dt, np.floating):
        return float(np.finfo(dt).eps)
    return float(np.finfo(np.float64).eps)


def psd_tolerance(n: int, eps: float) -> float:
    """Relative tolerance for negative eigenvalues of a PSD n x n Gram stored with machine epsilon eps."""
    return max(1e-9, 10.0 * n * eps)


def kernel_eigh(K: Any, name: str = "K") -> tuple[np.ndarray, np.ndarray]:
    """Validated eigendecomposition of a Gram. K: (n, n) symmetric PSD (up to rounding) -> l (n,) ascending,
    V (n, n), fp64. Raises DynamicsError naming the problem (shape, NaN, asymmetry, a negative eigenvalue)."""
    eps = input_eps(K)
    Ks = check_kernel(K, name)
    l, V = np.linalg.eigh(Ks)
    top = max(float(np.max(np.abs(l))), np.finfo(np.float64).tiny)
    tol = psd_tolerance(Ks.shape[0], eps)
    if l[0] < -tol * top:
        raise DynamicsError(
            f"{name} is not positive semi-definite: eigenvalue {l[0]:.3g} against the largest {top:.3g} (only "
            f"rounding, |negative| <= {tol:.1g} x largest, is accepted); a Gram J J^T is PSD, check how it was built"
        )
    return l, V


def _targets(y: Any, n: int, name: str = "y") -> np.ndarray:
    y = as_f64(y, name)
    if y.ndim not in (1, 2) or y.shape[0] != n:
        raise DynamicsError(f"{name} must have shape (n,) or (n, C) with n = {n}, got {y.shape}")
    return y


def _broadcast_init(v: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    v = as_f64(v, name)
    try:
        return np.broadcast_to(v, shape).astype(np.float64)
    except ValueError:
        raise DynamicsError(f"{name} must be a scalar or broadcast to {shape}, got shape {v.shape}") from None


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
    t = as_f64(t, "t")
    if np.any(t < 0):
        raise DynamicsError(f"times must be >= 0, got min {t.min()}")
    if integer and np.any(t != np.round(t)):
        raise DynamicsError("gradient-descent times are step counts: give integers (flow takes real times)")
    if horizon is not None and t.size and t.max() > horizon:
        raise DynamicsError(f"time {int(t.max())} is past the end of the step schedule (length {horizon})")
    return t


def step_sums(alpha: Any, t: Any) -> np.ndarray:
    """eta_t = sum_{tau<t} alpha_tau (docs/theory.md section 4). alpha: scalar or (T,); t: ints -> t.shape fp64."""
    a = _steps(alpha)
    t = _times(t, integer=True, horizon=None if a.ndim == 0 else a.size)
    if a.ndim == 0:
        return float(a) * t
    return np.concatenate([[0.0], np.cumsum(a)])[t.astype(np.int64)]


def gd_filters(l: Any, n: int, alpha: Any, t: Any) -> tuple[np.ndarray, np.ndarray]:
    """Spectral filters of t gradient-descent steps (docs/theory.md section 3).

    l: (p,) eigenvalues of K (not K/n); n: number of training points; alpha: step (scalar) or schedule (T,);
    t: step counts, any shape. Returns h, g of shape t.shape + (p,):
    h = 1 - prod_{tau<t}(1 - alpha_tau l/n) (filter of the train outputs), g = h / l with its limit
    eta_t / n at l = 0.
    """
    l = as_f64(l, "l").reshape(-1)
    a = _steps(alpha)
    tt = _times(t, integer=True, horizon=None if a.ndim == 0 else a.size)
    flat = tt.reshape(-1)
    if a.ndim == 0:
        x = float(a) * l / n  # alpha l / n per eigenvalue
        pos = x < 1.0  # every factor 1 - x > 0: stable log-form
        logq = np.where(pos, np.log1p(-np.where(pos, x, 0.0)), 0.0)
        with np.errstate(over="ignore", invalid="ignore"):
            h_stable = -np.expm1(flat[:, None] * logq[None, :])
            h_direct = 1.0 - np.power((1.0 - x)[None, :], flat[:, None])
        h = np.where(pos[None, :], h_stable, h_direct)
    else:
        h = _schedule_filter(l / n, a, flat)
    eta = step_sums(a, flat)
    tiny = np.abs(l) < np.finfo(np.float64).tiny
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(tiny[None, :], eta[:, None] / n, h / np.where(tiny, 1.0, l)[None, :])
    shape = tt.shape + (l.size,)
    return h.reshape(shape), g.reshape(shape)


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


def flow_filters(l: Any, n: int, eta: float, s: Any) -> tuple[np.ndarray, np.ndarray]:
    """Spectral filters of gradient flow du/ds = -(eta/n) K (u - y) at times s (any shape, real >= 0).

    l: (p,) eigenvalues of K. Returns h = 1 - exp(-eta s l / n) and g = h / l (limit eta s / n at l = 0),
    each s.shape + (p,).
    """
    l = as_f64(l, "l").reshape(-1)
    eta = _rate(eta)
    ss = _times(s, integer=False, horizon=None)
    flat = ss.reshape(-1)
    with np.errstate(over="ignore"):
        h = -np.expm1(-eta * flat[:, None] * l[None, :] / n)
    tiny = np.abs(l) < np.finfo(np.float64).tiny
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(tiny[None, :], eta * flat[:, None] / n, h / np.where(tiny, 1.0, l)[None, :])
    shape = ss.shape + (l.size,)
    return h.reshape(shape), g.reshape(shape)


Predictor = Callable[..., "np.ndarray | tuple[np.ndarray, np.ndarray]"]


_Filters = Callable[[np.ndarray, int, Any], tuple[np.ndarray, np.ndarray]]


def _filtered(
    V: np.ndarray, y: np.ndarray, h: np.ndarray, g: np.ndarray, u0: Any, K_test: Any, f0_test: Any
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Apply spectral filters to the initial residual: u = u_0 + V h V^T (y - u_0), and on test inputs
    f = f_0 + Theta(x, X) V g V^T (y - u_0). V (n, n) eigenvectors of K; h, g lead + (n,), one filter per
    leading index (times or ridge parameters). Returns u (lead + y.shape), or (u, f) if K_test is given."""
    n = V.shape[0]
    lead = h.shape[:-1]
    u_init = _broadcast_init(u0, y.shape, "u0")
    rr = (V.T @ (y - u_init)).reshape(n, -1)  # (n, C'): residual in the eigenbasis
    u = u_init + np.matmul(V, h.reshape(-1, n)[:, :, None] * rr[None]).reshape(lead + y.shape)
    if K_test is None:
        return u
    Kx = as_f64(K_test, "K_test")
    if Kx.ndim != 2 or Kx.shape[1] != n:
        raise DynamicsError(f"K_test must be Theta(x, X) of shape (m, {n}), got {Kx.shape}")
    out_shape = (Kx.shape[0],) + y.shape[1:]
    f_init = _broadcast_init(f0_test, out_shape, "f0_test")
    f = f_init + np.matmul(Kx @ V, g.reshape(-1, n)[:, :, None] * rr[None]).reshape(lead + out_shape)
    return u, f


def _predictor(K: Any, y: Any, filters: _Filters) -> Predictor:
    l, V = kernel_eigh(K)
    n = l.size
    y = _targets(y, n)

    def predict(t: Any, u0: Any = 0.0, K_test: Any = None, f0_test: Any = 0.0):
        """Outputs at times t (scalar or array). u0: initial train outputs, scalar or y's shape.
        K_test: Theta(x, X) (m, n) and f0_test its initial outputs (scalar or (m,) / (m, C)).
        Returns u_t (t.shape + y.shape), or (u_t, f_t) with f_t (t.shape + (m,) [+ (C,)]) if K_test is given.
        """
        h, g = filters(l, n, t)
        return _filtered(V, y, h, g, u0, K_test, f0_test)

    return predict


def gradient_descent_mse(K: Any, y: Any, alpha: Any = 1.0) -> Predictor:
    """Closed-form gradient descent on L = (1/2n)||f - y||^2 (docs/theory.md section 3), like neural-tangents'
    predict.gradient_descent_mse but in discrete steps.

    K: (n, n) train Gram; y: (n,) or (n, C); alpha: constant step or schedule (T,) (then t <= T).
    Returns predict(t, u0=0., K_test=None, f0_test=0.) -> u_t or (u_t, f_t); t counts steps (integers).
    One eigendecomposition of K is done here; each call costs O(n^2 per time).
    """
    a = _steps(alpha)
    return _predictor(K, y, lambda l, n, t: gd_filters(l, n, a, t))


def gradient_flow_mse(K: Any, y: Any, eta: float = 1.0) -> Predictor:
    """Closed-form gradient flow du/ds = -(eta/n) K (u - y): the alpha -> 0 limit of gradient descent with
    s = t alpha / eta (docs/theory.md section 3). Same predictor as gradient_descent_mse, real times s >= 0."""
    eta = _rate(eta)
    return _predictor(K, y, lambda l, n, s: flow_filters(l, n, eta, s))


def gradient_descent_reference(
    K: Any, y: Any, alpha: Any, steps: int, *, u0: Any = 0.0, K_test: Any = None, f0_test: Any = 0.0
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Iterate u_{t+1} = u_t - (alpha_t/n) K (u_t - y), f_{t+1} = f_t - (alpha_t/n) Theta(x,X)(u_t - y), fp64.

    The reference the closed forms are tested against. Returns the trajectory u (steps+1, *y.shape), and
    f (steps+1, m, ...) when K_test (m, n) is given; row t holds the outputs after t steps.
    """
    K = as_f64(K, "K")
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise DynamicsError(f"K must be square (n, n), got {K.shape}")
    n = K.shape[0]
    y = _targets(y, n)
    a = _steps(alpha)
    if a.ndim == 1 and steps > a.size:
        raise DynamicsError(f"steps = {steps} is past the end of the schedule (length {a.size})")
    u = _broadcast_init(u0, y.shape, "u0").copy()
    us = [u.copy()]
    Kx = None if K_test is None else as_f64(K_test, "K_test")
    if Kx is not None:
        f = _broadcast_init(f0_test, (Kx.shape[0],) + y.shape[1:], "f0_test").copy()
        fs = [f.copy()]
    for tau in range(steps):
        step = float(a) if a.ndim == 0 else float(a[tau])
        resid = u - y
        if Kx is not None:
            f = f - (step / n) * (Kx @ resid)
            fs.append(f.copy())
        u = u - (step / n) * (K @ resid)
        us.append(u.copy())
    if Kx is None:
        return np.stack(us)
    return np.stack(us), np.stack(fs)


def kernel_ridge(
    K: Any, y: Any, lam: Any, *, u0: Any = 0.0, K_test: Any = None, f0_test: Any = 0.0
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Kernel ridge regression: argmin_f (1/2n)||f(X) - y||^2 + (lam/2)||f - f_0||_H^2.

    With this normalisation lam multiplies n in the matrix form: u = u_0 + K (K + n lam I)^{-1} (y - u_0),
    f(x) = f_0(x) + Theta(x, X) (K + n lam I)^{-1} (y - u_0); its filter on an eigenvalue mu of K/n is
    mu / (mu + lam), and early stopping after eta_t = sum alpha_tau matches lam = 1 / eta_t (docs/theory.md
    section 3; Raskutti et al. 2014): the GD filter 1 - (1 - alpha mu)^t lies between mu/(mu + lam) and
    2 mu/(mu + lam) when alpha mu <= 1.
    lam: scalar or (k,) of values >= 0 (leading axis of the outputs); lam = 0 is min-norm interpolation
    (K^+, eigenvalues below n eps max(l) treated as 0). Shapes as gradient_descent_mse with t -> lam.
    """
    l, V = kernel_eigh(K)
    n = l.size
    y = _targets(y, n)
    lam_a = as_f64(lam, "lam")
    if lam_a.ndim > 1 or np.any(lam_a < 0):
        raise DynamicsError(f"lam must be a scalar or 1-D array of values >= 0, got {lam_a!r}")
    cutoff = n * np.finfo(np.float64).eps * max(float(np.max(np.abs(l))), np.finfo(np.float64).tiny)
    lams = lam_a.reshape(-1)
    d = l[None, :] + n * lams[:, None]  # (k, n)
    keep = (lams[:, None] > 0) | (np.abs(l)[None, :] > cutoff)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(keep, 1.0 / np.where(keep, d, 1.0), 0.0)
    h = g * l[None, :]
    return _filtered(V, y, h.reshape(lam_a.shape + (n,)), g.reshape(lam_a.shape + (n,)), u0, K_test, f0_test)
