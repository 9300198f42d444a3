"""The figures of a paper run's report (paper_report.py), drawn from results.json alone: eigen-decay per task
(the paper's Figures 4-9), test error against training size (Figure 2; F1 in Figure 10), task-vector cosines and
task addition (Figure 3); beta against sample efficiency, the weight-disentanglement error over (a1, a2),
train/validation/test curves of fine-tuning, and the planted tasks (planted_report.plot)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import planted_report
from .paper_results import curve_stats, floats, fmt, metric

DPI = 90


def _figure(*args, **kw):
    from matplotlib.figure import Figure

    return Figure(*args, layout="constrained", **kw)


def fig_decay(res: dict, path: Path) -> None:
    kern, tasks = res.get("kernels", {}), list(res.get("kernels", {}))
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig = _figure(figsize=(4.0 * cols, 3.2 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    for ax, t in zip(axes, tasks):
        d0 = kern[t]["draws"][0]
        mu = np.asarray(d0["mu"], dtype=float)
        i = np.arange(1, mu.size + 1)
        pos = mu > 0
        ax.loglog(i[pos], mu[pos], ".", ms=4, color="C0", label="eigenvalues of K/n")
        if d0.get("floor"):
            ax.axhline(d0["floor"], color="gray", ls=":", lw=1)
        if d0.get("beta") is not None:
            lo, hi = d0["range"]
            seg = np.geomspace(lo, hi, 50)
            ax.loglog(seg, d0["C"] * seg ** (-d0["beta"]), "-", color="C1", lw=2,
                      label=f"fit on {lo}..{hi}: beta {d0['beta']:.2f}")
        mean, sd = kern[t].get("beta_mean"), kern[t].get("beta_sd")
        ax.set_title(f"{t} ({res['tasks'][t]['kind']}): beta = {fmt(mean, 2)}" + (f" ± {sd:.2f}" if sd else ""),
                     fontsize=9)
        ax.set_xlabel("index i")
        ax.set_ylabel("eigenvalue of K/n")
        ax.legend(fontsize=7)
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    fig.suptitle(f"Eigen-decay of the empirical NTK on {res['config']['kernel_samples']} inputs per task", fontsize=10)
    fig.savefig(path, dpi=DPI)


def fig_curves(res: dict, path: Path, f1: bool = False) -> None:
    tasks = res.get("tasks", {})
    kinds = ["classification"] if f1 else [k for k in ("regression", "classification")
                                             if any(v["kind"] == k for v in tasks.values())]
    fig = _figure(figsize=(5.2 * len(kinds), 3.8))
    axes = np.atleast_1d(fig.subplots(1, len(kinds)))
    for ax, kind in zip(axes, kinds):
        key, label = ("f1", "test F1 (class 1)") if f1 else metric(kind)
        for c, t in enumerate(t for t, v in tasks.items() if v["kind"] == kind):
            for method, ls in (("full", "-"), ("probe", "--")):
                ns, m, s = curve_stats(res, t, method, key)
                if ns:
                    ax.errorbar(ns, m, yerr=s, fmt="o" + ls, ms=3, color=f"C{c}", capsize=2, lw=1.2,
                                label=f"{t} ({method})")
        ax.set_xscale("log")
        sizes = sorted({r["n"] for r in res.get("curves", [])})
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training samples n")
        ax.set_ylabel(label)
        ax.set_title(f"{kind}: {'full fine-tuning (solid), linear probe (dashed)'}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Test performance against training size, hold-out early stopping (mean ± sd over seeds)",
                 fontsize=10)
    fig.savefig(path, dpi=DPI)


def fig_efficiency(res: dict, path: Path) -> None:
    eff, kern = res.get("efficiency", {}), res.get("kernels", {})
    fig = _figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for t, info in res.get("tasks", {}).items():
        e = eff.get("per_task", {}).get(t, {}).get("full")
        k = kern.get(t, {})
        if not e or e.get("aulc") is None or k.get("beta_mean") is None:
            continue
        color = "C0" if info["kind"] == "regression" else "C3"
        ax.errorbar(k["beta_mean"], e["aulc"], xerr=k.get("beta_sd") or 0, fmt="o", color=color, capsize=3)
        ax.annotate(t, (k["beta_mean"], e["aulc"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    corr = eff.get("correlation", {}).get("full", {}).get("all", {}).get("beta_vs_aulc")
    title = "Eigen-decay vs sample efficiency (full fine-tuning)"
    if corr:
        title += f"\nSpearman rho = {corr['rho']:.2f} (p = {corr['p']:.2f}, {corr['n_tasks']} tasks)"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("eigen-decay beta of the NTK (blue: regression, red: classification)")
    ax.set_ylabel("AULC = mean test nerr over sizes n\n(lower = more sample-efficient)")
    fig.savefig(path, dpi=DPI)


def fig_vectors(res: dict, path: Path) -> None:
    v = res.get("vectors", {}).get("full")
    names, cos = v["tasks"], np.array(v["cosine"], dtype=float)
    fig = _figure(figsize=(11, 4.2))
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 1.4])
    im = ax1.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1)
    ax1.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax1.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax1.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax1, shrink=0.8, label="cosine similarity")
    ax1.set_title("cos(tau_i, tau_j)", fontsize=9)
    pairs = v["addition_pairs"]
    labels, a, b = [], [], []
    for p in pairs:
        t1, t2 = p["tasks"]
        labels.append(f"{t1} + {t2}")
        a.append(p["normalized_test"][t1])
        b.append(p["normalized_test"][t2])
    x = np.arange(len(pairs))
    a, b = floats(a), floats(b)
    ax2.bar(x - 0.2, a, 0.4, label="first task of the pair")
    ax2.bar(x + 0.2, b, 0.4, label="second task of the pair")
    ax2.axhline(1.0, color="gray", ls=":", lw=1)
    both = np.concatenate([a, b])
    low = float(np.nanmin(both)) if np.isfinite(both).any() else 0.0
    if low < -1.5:  # a task that barely learned has a tiny reference score: keep the axis readable
        ax2.set_ylim(bottom=-1.5)
        ax2.text(0.01, 0.02, "bars below -1.5 are cut", transform=ax2.transAxes, fontsize=7)
    ax2.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    ax2.set_ylabel("normalized test score\n(1 = the task's own fine-tuned model)")
    ax2.set_title("Task addition theta_pre + lambda (tau_1 + tau_2), lambda chosen on validation", fontsize=9)
    ax2.legend(fontsize=7)
    fig.savefig(path, dpi=DPI)


def fig_xi(res: dict, path: Path) -> None:
    vec = res.get("vectors", {})
    variants = [k for k in ("full", "tangent") if vec.get(k, {}).get("xi", {}).get("grid")]
    fig = _figure(figsize=(4.6 * len(variants), 3.8))
    axes = np.atleast_1d(fig.subplots(1, len(variants)))
    vmax = max(float(np.max(vec[k]["xi"]["grid"]["xi"])) for k in variants) or 1.0
    for ax, k in zip(axes, variants):
        g = vec[k]["xi"]["grid"]
        al, xi = g["alphas"], np.array(g["xi"], dtype=float)
        im = ax.imshow(xi, origin="lower", cmap="magma_r", vmin=0, vmax=vmax,
                       extent=(al[0] - 0.25, al[-1] + 0.25, al[0] - 0.25, al[-1] + 0.25))
        ax.set_xlabel(f"a2 ({g['pair'][1]})")
        ax.set_ylabel(f"a1 ({g['pair'][0]})")
        ax.set_title(f"xi(a1, a2), {k} fine-tuning", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("Weight disentanglement error (0 = the two task vectors do not interfere)", fontsize=10)
    fig.savefig(path, dpi=DPI)


def fig_training(res: dict, path: Path) -> None:
    cfg = res["config"]
    runs = [r for r in res.get("curves", []) if r["method"] == "full" and r["n"] == cfg["tv_size"]
            and r["seed"] == cfg["seeds"][0]]
    if not runs:
        return
    cols = min(3, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig = _figure(figsize=(4.0 * cols, 3.0 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    for ax, r in zip(axes, runs):
        c = r["curve"]
        for k, color in (("train_loss", "C0"), ("val_loss", "C1"), ("test_loss", "C2")):
            ax.plot(c["step"], c[k], color=color, label=k.replace("_", " "))
        ax.axvline(r["best_step"], color="gray", ls=":", label=f"best step {r['best_step']}")
        ax.set_title(f"{r['task']}, n = {r['n']}", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (1/2) mean (f - y)^2, standardized y")
        ax.legend(fontsize=7)
    for ax in axes[len(runs):]:
        ax.set_visible(False)
    fig.suptitle("Fine-tuning curves with hold-out early stopping", fontsize=10)
    fig.savefig(path, dpi=DPI)


FIGURES = {
    "decay.png": (fig_decay, "kernels"),
    "learning_curves.png": (fig_curves, "curves"),
    "f1_curves.png": (lambda r, p: fig_curves(r, p, f1=True), "curves"),
    "decay_vs_efficiency.png": (fig_efficiency, "efficiency"),
    "task_vectors.png": (fig_vectors, "vectors"),
    "disentanglement.png": (fig_xi, "vectors"),
    "training_curves.png": (fig_training, "curves"),
    "planted.png": (lambda r, p: planted_report.plot(planted_report.summarize(r["planted"]), p), "planted"),
}
