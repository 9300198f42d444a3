"""Function-space dynamics of kernel regression under the square loss (docs/theory.md section 3).

Loss L(f) = (1/2n) sum_i ||f(x_i) - y_i||^2 (+ (lam/2) ||f - f_0||_H^2) on n training points, kernel
K = Theta(X, X), cross kernel Theta(x, X). Gradient descent with steps alpha_0, alpha_1, ... moves the outputs as

    u_{t+1} = u_t - alpha_t ((1/n) K (u_t - y) + lam (u_t - u_0)),
    f_{t+1}(x) = f_t(x) - alpha_t ((1/n) Theta(x, X) (u_t - y) + lam (f_t(x) - f_0(x))),

which is exact for the linearized network (Lee et al. 2019; the ridge is weight decay towards theta_0) and for
kernel regression. One eigendecomposition of K gives every time in closed form (filters.py); t = inf is the
kernel-ridge limit. K is never inverted.

Several outputs (docs/theory.md section 2.2): y (n, C) with K (n, n) moves every output column with K (exact
when the outputs' kernel is Theta_cc' = delta_cc' k, as for a linear head; ntk(..., trace=True) gives the
mean over outputs, the kernel that convention needs), or y (n, C) with the full K (n, n, C, C) of ntk: exact
for any network, the flattened outputs moving with K and n (not n C) in the loss's normalization.

The eigenvalues are used as they are (no clipping): the closed forms reproduce iterating the given matrix.
K must be symmetric and PSD up to rounding: an eigenvalue below -max(1e-9, 10 n eps) * max|l| (eps of K's
own dtype, so fp32 Grams get a looser tolerance) is an error. Arrays may be numpy or torch; everything is
computed and returned as float64 numpy.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .filters import DynamicsError, _steps, as_f64, flow_filters, gd_filters, step_sums  # noqa: F401 (re-exported)


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


def kernel_eigh(K: Any, name: str = "K", eps: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validated eigendecomposition of a Gram. K: (n, n) symmetric PSD (up to rounding) -> l (n,) ascending,
    V (n, n), fp64; eps: the machine epsilon of the dtype K was computed in (default: K's own). Raises
    DynamicsError naming the problem (shape, NaN, asymmetry, a negative eigenvalue)."""
    eps = input_eps(K) if eps is None else eps
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


Predictor = Callable[..., "np.ndarray | tuple[np.ndarray, np.ndarray]"]


_Filters = Callable[[np.ndarray, int, Any], tuple[np.ndarray, np.ndarray]]


class _Problem:
    """A kernel and targets in the flattened form the closed forms work on: K (N, N) with N = n (one kernel for
    every output column) or n C (the full multi-output kernel (n, n, C, C), rows in (sample, output) order), the
    targets (N,) or (n, C), and n, the number of samples in the loss's 1/n."""

    def __init__(self, K: Any, y: Any):
        self.eps = input_eps(K)  # of K's own dtype: an fp32 Gram's rounding tolerance stays fp32's
        K = as_f64(K, "K")
        y = as_f64(y, "y")
        if K.ndim == 4:
            n, n2, C, C2 = K.shape
            if n != n2 or C != C2:
                raise DynamicsError(f"a multi-output K must be (n, n, C, C), got {K.shape}")
            if y.shape != (n, C):
                raise DynamicsError(f"with K (n, n, C, C) = {K.shape}, y must be (n, C) = {(n, C)}, got {y.shape}")
            self.K, self.y, self.n, self.C = K.transpose(0, 2, 1, 3).reshape(n * C, n * C), y.reshape(-1), n, C
        elif K.ndim == 2:
            self.K, self.n, self.C = K, K.shape[0], 0
            self.y = _targets(y, self.n)
        else:
            raise DynamicsError(f"K must be (n, n), or (n, n, C, C) for several outputs, got shape {K.shape}")

    def test_kernel(self, K_test: Any) -> Any:
        """Theta(x, X) as the closed forms take it: (m, n), or (m, n, C, C) flattened to (m C, n C)."""
        if K_test is None or not self.C:
            return K_test
        Kx = as_f64(K_test, "K_test")
        if Kx.ndim != 4 or Kx.shape[1:] != (self.n, self.C, self.C):
            raise DynamicsError(f"K_test must be (m, {self.n}, {self.C}, {self.C}) like K, got {Kx.shape}")
        return Kx.transpose(0, 2, 1, 3).reshape(Kx.shape[0] * self.C, self.n * self.C)

    def unflatten(self, out, lead: tuple) -> Any:
        """Outputs (lead + (N,)) back to (lead + (n, C)) for a multi-output K; (u, f) pairs too."""
        if not self.C:
            return out
        if isinstance(out, tuple):
            return tuple(self.unflatten(o, lead) for o in out)
        return out.reshape(lead + (-1, self.C))


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
    prob = _Problem(K, y)
    l, V = kernel_eigh(prob.K, eps=prob.eps)

    def predict(t: Any, u0: Any = 0.0, K_test: Any = None, f0_test: Any = 0.0):
        """Outputs at times t (scalar or array; np.inf: the limit). u0: initial train outputs, scalar or y's
        shape. K_test: Theta(x, X) (m, n) (or (m, n, C, C) with a full K) and f0_test its initial outputs.
        Returns u_t (t.shape + y.shape), or (u_t, f_t) with f_t (t.shape + (m,) [+ (C,)]) if K_test is given.
        """
        h, g = filters(l, prob.n, t)
        u0f = u0 if not prob.C else np.broadcast_to(as_f64(u0, "u0"), (prob.n, prob.C)).reshape(-1)
        f0f = f0_test if not prob.C or K_test is None else np.broadcast_to(
            as_f64(f0_test, "f0_test"), (as_f64(K_test, "K_test").shape[0], prob.C)).reshape(-1)
        out = _filtered(V, prob.y, h, g, u0f, prob.test_kernel(K_test), f0f)
        return prob.unflatten(out, h.shape[:-1])

    return predict


def max_stable_step(K: Any, lam: float = 0.0) -> float:
    """2 / (mu_1 + lam), mu_1 the largest eigenvalue of K/n (n samples; K (n, n) or (n, n, C, C)): gradient
    descent on (1/2n)||f - y||^2 + (lam/2)||f - f_0||_H^2 converges for constant steps below it and diverges
    above (docs/theory.md section 3.2). Raises DynamicsError for a kernel without a positive eigenvalue."""
    K = as_f64(K, "K")
    prob = _Problem(K, np.zeros(K.shape[:1] + K.shape[2:3]))
    top = float(np.linalg.eigvalsh(check_kernel(prob.K))[-1]) / prob.n + float(lam)
    if not top > 0:
        raise DynamicsError("K/n + lam has no positive eigenvalue: every step is stable, none is the largest")
    return 2.0 / top


def gradient_descent_mse(K: Any, y: Any, alpha: Any = 1.0, lam: float = 0.0) -> Predictor:
    """Closed-form gradient descent on L = (1/2n)||f - y||^2 + (lam/2)||f - f_0||_H^2 (docs/theory.md section
    3), like neural-tangents' predict.gradient_descent_mse (diag_reg ~ lam) but in discrete steps.

    K: (n, n) train Gram (y (n,) or (n, C): every column moves with K; ntk(trace=True) for several outputs), or
    the full (n, n, C, C) with y (n, C); alpha: constant step or schedule (T,) (then t <= T); lam >= 0: ridge.
    Returns predict(t, u0=0., K_test=None, f0_test=0.) -> u_t or (u_t, f_t); t counts steps (integers, or
    np.inf for the kernel-ridge limit). Warns when a constant step diverges (alpha >= max_stable_step).
    One eigendecomposition of K is done here; each call costs O(n^2 per time).
    """
    a = _steps(alpha)
    if a.ndim == 0 and float(a) >= max_stable_step(K, lam):
        warnings.warn(f"alpha = {float(a):.4g} >= max_stable_step(K) = {max_stable_step(K, lam):.4g}: gradient "
                      f"descent diverges on this kernel", stacklevel=2)
    return _predictor(K, y, lambda l, n, t: gd_filters(l, n, a, t, lam))


def gradient_flow_mse(K: Any, y: Any, eta: float = 1.0, lam: float = 0.0) -> Predictor:
    """Closed-form gradient flow du/ds = -eta ((1/n) K (u - y) + lam (u - u_0)): the alpha -> 0 limit of
    gradient descent with s = t alpha / eta (docs/theory.md section 3). Shapes as gradient_descent_mse; real
    times s >= 0, np.inf the kernel-ridge limit."""
    return _predictor(K, y, lambda l, n, s: flow_filters(l, n, eta, s, lam))


def gradient_descent_reference(
    K: Any, y: Any, alpha: Any, steps: int, *, u0: Any = 0.0, K_test: Any = None, f0_test: Any = 0.0,
    lam: float = 0.0,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Iterate u_{t+1} = u_t - alpha_t ((1/n) K (u_t - y) + lam (u_t - u_0)) and the same on Theta(x, X), fp64.

    The reference the closed forms are tested against; K (n, n) or (n, n, C, C) as gradient_descent_mse.
    Returns the trajectory u (steps+1, *y.shape), and f (steps+1, m, ...) when K_test is given; row t holds the
    outputs after t steps.
    """
    prob = _Problem(K, y)
    n, Kf, yf = prob.n, prob.K, prob.y
    a = _steps(alpha)
    if a.ndim == 1 and steps > a.size:
        raise DynamicsError(f"steps = {steps} is past the end of the schedule (length {a.size})")
    u = u_start = _broadcast_init(u0, y.shape if not prob.C else (n, prob.C), "u0").reshape(yf.shape).copy()
    us = [u.copy()]
    Kx = prob.test_kernel(K_test)
    Kx = None if Kx is None else as_f64(Kx, "K_test")
    if Kx is not None:
        f = f_start = _broadcast_init(f0_test, (Kx.shape[0],) + yf.shape[1:], "f0_test").copy()
        fs = [f.copy()]
    for tau in range(steps):
        step = float(a) if a.ndim == 0 else float(a[tau])
        resid = u - yf
        if Kx is not None:
            f = f - step * ((Kx @ resid) / n + lam * (f - f_start))
            fs.append(f.copy())
        u = u - step * ((Kf @ resid) / n + lam * (u - u_start))
        us.append(u.copy())
    out = np.stack(us) if Kx is None else (np.stack(us), np.stack(fs))
    return prob.unflatten(out, (steps + 1,))


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
    prob = _Problem(K, y)
    l, V = kernel_eigh(prob.K, eps=prob.eps)
    n = prob.n
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
    N = l.size
    u0f = u0 if not prob.C else np.broadcast_to(as_f64(u0, "u0"), (n, prob.C)).reshape(-1)
    f0f = f0_test if not prob.C or K_test is None else np.broadcast_to(
        as_f64(f0_test, "f0_test"), (as_f64(K_test, "K_test").shape[0], prob.C)).reshape(-1)
    out = _filtered(V, prob.y, h.reshape(lam_a.shape + (N,)), g.reshape(lam_a.shape + (N,)), u0f,
                    prob.test_kernel(K_test), f0f)
    return prob.unflatten(out, lam_a.shape)
