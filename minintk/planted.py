"""Planted regression tasks on a model's own empirical NTK, where the theory's answer is known (docs/theory.md
section 8).

Eigen-target. Given the Gram K of the model's eNTK over all N inputs and a sample S of m of them, with
K_SS = sum_i lambda_i u_i u_i^T (descending, u_i unit vectors of R^m), the empirical eigenfunctions

    psi_i(x) = sqrt(m) / lambda_i * K(x, S) u_i        (so that psi_i(s_j) = sqrt(m) u_i[j] on S)

are orthonormal in L2 of the sample's empirical measure and lie in the RKHS H of the eNTK. The planted target

    f*(x) = sum_{i <= k} c_i psi_i(x) = K(x, S) a,    a = sqrt(m) sum_i (c_i / lambda_i) u_i,
    c_i = scale * s_i * i^(-smoothness),  s_i = +-1 at random,

is exactly in H with ||f*||_H^2 = a^T K_SS a = m sum_i c_i^2 / lambda_i, and its coefficients decay as asked.
y = f*(X) + sigma * w with w standard normal.

Lazy teacher. f*(x) = f(x; theta_0 + delta) - f(x; theta_0), delta a random direction of norm
scale * ||theta_0||: to first order the linearized model's own target J(x) delta (Lee et al. 2019), hence
(almost) in the eNTK's RKHS for small scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .dynamics import check_kernel

# Eigenvalues of K_SS below this fraction of the largest cannot carry a planted coefficient (psi_i would be
# mostly rounding error).
RELATIVE_FLOOR = 1e-10


class PlantedError(ValueError):
    """A planted-task setting that cannot be used; the message names it and what is accepted."""


class Planted(NamedTuple):
    """A planted task over N inputs. f_star, y: (N,) float64 (y = f_star + sigma w); coef: (k,) the c_i;
    weights: (m,) a, with f*(x) = K(x, S) a; sample: (m,) indices of S; rkhs_norm: ||f*||_H; eigvals: (k,)
    lambda_1..lambda_k of K_SS; sigma: the noise level."""

    f_star: np.ndarray
    y: np.ndarray
    coef: np.ndarray
    weights: np.ndarray
    sample: np.ndarray
    rkhs_norm: float
    eigvals: np.ndarray
    sigma: float


def eigen_target(K, sample, k: int, smoothness: float, sigma: float, *, scale: float = 1.0,
                 seed: int = 0) -> Planted:
    """The eigen-target above. K: (N, N) eNTK Gram over all inputs (scalar output); sample: (m,) distinct
    indices into it; k: eigenfunctions used (1 <= k <= m); smoothness: the decay exponent of c_i (> 0);
    sigma: noise level (>= 0); scale: c_1's size; seed: signs and noise. Raises PlantedError for bad
    settings, or when lambda_k of K_SS is below RELATIVE_FLOOR times lambda_1."""
    Kf = check_kernel(K)
    S = np.asarray(sample, dtype=np.int64).reshape(-1)
    N, m = Kf.shape[0], S.size
    if m == 0 or len(set(S.tolist())) != m or S.min() < 0 or S.max() >= N:
        raise PlantedError(f"sample must be distinct indices in [0, {N}), got {m} indices")
    if not 1 <= k <= m:
        raise PlantedError(f"k={k}: expected 1 <= k <= m = {m} (the sample's size)")
    for name, v, low in (("smoothness", smoothness, 0.0), ("scale", scale, 0.0)):
        if not (math.isfinite(v) and v > low):
            raise PlantedError(f"{name}={v}: expected a finite number > {low:g}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise PlantedError(f"sigma={sigma}: expected a finite number >= 0")
    lam, U = np.linalg.eigh(Kf[np.ix_(S, S)])
    lam, U = lam[::-1][:k], U[:, ::-1][:, :k]
    if lam[-1] <= RELATIVE_FLOOR * lam[0]:
        raise PlantedError(f"lambda_{k} of the sample's Gram is {lam[-1]:.3g}, below {RELATIVE_FLOOR:g} x lambda_1 = "
                           f"{lam[0]:.3g}: take k below the numerical rank")
    rng = np.random.default_rng(seed)
    coef = scale * rng.choice([-1.0, 1.0], size=k) * np.arange(1, k + 1, dtype=np.float64) ** -smoothness
    a = math.sqrt(m) * U @ (coef / lam)
    f_star = Kf[:, S] @ a
    y = f_star + sigma * rng.standard_normal(N)
    return Planted(f_star, y, coef, a, S, float(math.sqrt(m * np.sum(coef**2 / lam))), lam, float(sigma))


def lazy_teacher(model: nn.Module, X: torch.Tensor, scale: float, *, seed: int = 0,
                 output: Callable | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(f*(X), delta): f*(x) = f(x; theta_0 + delta) - f(x; theta_0) on X (n, ...) -> (n,) or (n, C), in the
    model's dtype; delta over the trainable parameters (requires_grad), Gaussian, rescaled to norm
    scale * ||theta_0||. The model is not modified. Raises PlantedError for scale <= 0 or no trainable
    parameter."""
    from .linearize import LinearizeError, functional

    if not (math.isfinite(scale) and scale > 0):
        raise PlantedError(f"scale={scale}: expected a finite number > 0")
    try:
        fn, theta0 = functional(model, output)
    except LinearizeError as e:
        raise PlantedError(str(e)) from None
    g = torch.Generator().manual_seed(seed)
    raw = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in theta0.items()}
    size = math.sqrt(sum(float((r**2).sum()) for r in raw.values()))
    norm0 = math.sqrt(sum(float((v.double() ** 2).sum()) for v in theta0.values()))
    delta = {k: (r * (scale * norm0 / size)).to(theta0[k]) for k, r in raw.items()}
    with torch.no_grad():
        moved = fn({k: v + delta[k] for k, v in theta0.items()}, X)
        f_star = moved - fn(theta0, X)
    return f_star, delta
