"""Figures of the theory tools: the eigen-decay of a spectrum with its fit, and the stopping rule's radius and
bounds. PNG files with labelled axes and units (docs/theory.md sections 4-5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .dynamics import as_f64, step_sums
from .spectrum import PowerLawFit
from .stopping import (
    E,
    as_spectrum,
    bound_curve,
    critical_radius,
    default_step,
    local_rademacher,
    positive_number,
    stopping_time,
)


def plot_spectrum(
    mu: Any,
    fit: PowerLawFit | None,
    path: str | Path,
    *,
    floor: float | None = None,
    title: str | None = None,
) -> Path:
    """Log-log plot of mu_i against i (PNG): the eigenvalues, the floor, the fitted line and its range."""
    from matplotlib.figure import Figure

    m = as_spectrum(mu)
    i = np.arange(1, m.size + 1)
    pos = m > 0
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.loglog(i[pos], m[pos], ".", ms=4, color="C0", label="eigenvalues of K/n")
    if floor is not None and floor > 0:
        ax.axhline(floor, color="gray", ls=":", label=f"numerical floor {floor:.2g}")
    if fit is not None:
        ax.axvspan(fit.first, fit.last, color="C1", alpha=0.12, label=f"fit range {fit.first}..{fit.last}")
        ii = np.geomspace(1, m.size, 200)
        lo, hi = fit.beta_ci
        ax.loglog(ii, fit.C * ii ** (-fit.beta), "--", color="C1", lw=1)
        seg = np.geomspace(fit.first, fit.last, 100)
        ax.loglog(seg, fit.C * seg ** (-fit.beta), "-", color="C1", lw=2,
                  label=f"C i^-beta, beta = {fit.beta:.3f} [{lo:.3f}, {hi:.3f}]")
    ax.set_xlabel("index i (descending order)")
    ax.set_ylabel("eigenvalue mu_i of K/n")
    ax.set_title(title or f"Spectrum of K/n, n = {m.size}")
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_stopping(
    mu: Any,
    sigma: float,
    alpha: Any,
    path: str | Path,
    *,
    B: float = 1.0,
    delta: Any = None,
    horizon: int = 0,
) -> Path:
    """Two panels to PNG: R(eps) against eps^2/(2 e sigma') with eps_n marked; the bounds b, v (, Delta) and
    their total over t with T_hat marked. horizon: last t drawn (0: 4 T_hat, or the schedule/delta length)."""
    from matplotlib.figure import Figure

    m = as_spectrum(mu)
    s = positive_number(sigma, "sigma") / positive_number(B, "B")
    a = as_f64(default_step(m) if alpha is None else alpha, "alpha")
    eps_n = critical_radius(m, s)
    if delta is not None:
        T = as_f64(delta, "delta").size - 1
    elif a.ndim == 1:
        T = a.size
    else:
        T = horizon or max(10, 4 * stopping_time(m, s, a))
    a_used = a if a.ndim == 0 else a[:T]
    t = np.arange(T + 1)
    curve = bound_curve(m, sigma, step_sums(a_used, t), B=B, delta=delta)
    t_hat = stopping_time(m, s, a_used)

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    eps = np.geomspace(eps_n / 30, min(2 * E * s, eps_n * 30), 300)
    ax1.loglog(eps, local_rademacher(m, eps), label="R(eps)")
    ax1.loglog(eps, eps**2 / (2 * E * s), label="eps^2 / (2 e sigma)")
    ax1.axvline(eps_n, color="k", ls=":", label=f"eps_n = {eps_n:.3g}")
    ax1.set_xlabel("radius eps (units of y / B)")
    ax1.set_ylabel("local Rademacher complexity R(eps)")
    ax1.legend()
    tt = t[1:]
    ax2.loglog(tt, curve.bias[1:], label="bias bound B^2/(e eta_t)")
    ax2.loglog(tt, np.maximum(curve.variance[1:], 1e-300), label="variance bound 4e sigma^2 eta_t R^2")
    if delta is not None:
        ax2.loglog(tt, np.maximum(curve.drift[1:], 1e-300), label="drift Delta(t)")
    ax2.loglog(tt, curve.total[1:], "k", lw=2, label="total")
    ax2.axvline(max(t_hat, 1), color="r", ls="--", label=f"T_hat = {t_hat}")
    ax2.set_ylim(max(float(curve.total[1:].min()) / 100, 1e-300), float(curve.total[1:].max()) * 2)
    ax2.set_xlabel("gradient-descent step t")
    ax2.set_ylabel("bound on ||f_t - f*||_n^2 (units of y^2)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"Stopping rule: n = {m.size}, sigma = {sigma:g}, B = {B:g}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
