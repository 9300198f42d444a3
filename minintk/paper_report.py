"""The report of a paper run (minintk.paper): report.md and PNG figures, rendered from results.json alone.

Figures follow the paper's: eigen-decay per task (its Figures 4-9), test error against training size (Figure 2;
F1 in Figure 10), task-vector cosines and task addition (Figure 3); and three of ours: beta against sample
efficiency, the weight-disentanglement error over (a1, a2), and train/validation/test curves of fine-tuning.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from . import planted_report

DPI = 90


def _load(out: Path) -> dict:
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the pipeline first (it writes results.json)")
    return json.loads(path.read_text())


def _fmt(x, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, (int, np.integer)):
        return str(x)
    return f"{x:.{nd}f}"


def _floats(vals) -> np.ndarray:
    """JSON numbers (None for NaN) as a float array."""
    return np.array([np.nan if v is None else v for v in vals], dtype=float)


def _metric(kind: str) -> tuple[str, str]:
    return ("mse", "test MSE (label units)") if kind == "regression" else ("accuracy", "test accuracy")


def _curve_stats(res: dict, task: str, method: str, key: str) -> tuple[list, list, list]:
    by_n: dict = {}
    for r in res.get("curves", []):
        if r["task"] == task and r["method"] == method and r["test"] is not None:
            by_n.setdefault(r["n"], []).append(r["test"][key])
    ns = sorted(by_n)
    return ns, [float(np.mean(by_n[n])) for n in ns], [float(np.std(by_n[n])) for n in ns]


def _learning_note(res: dict) -> str | None:
    """Why the fine-tuned models stay at the trivial predictor, when they do (median nerr >= 0.9 at the largest
    size over the offline lexicon tasks), with the numbers that show it."""
    at = {}
    for m in ("full", "probe"):
        runs = [r for r in res.get("curves", []) if r["method"] == m and r["test"] is not None]
        if runs:
            top = max(r["n"] for r in runs)
            at[m] = (top, float(np.median([r["test"]["nerr"] for r in runs if r["n"] == top])))
    if "full" not in at or at["full"][1] < 0.9 or res["config"].get("model") is not None:
        return None
    probe = f" and the linear probe on the frozen features reaches {at['probe'][1]:.2f}" if "probe" in at else ""
    return (f"**Why these models stay at the trivial predictor** (median nerr {at['full'][1]:.2f} at n = "
            f"{at['full'][0]}{probe}): every example of a lexicon task is one distinct entry (a word or a short "
            "phrase), so no test entry is seen in training, and its valence can only come from what pretraining "
            "put into its representation. A decoder of this size pretrained on the King James Bible puts little "
            "there. It would take a model pretrained on broad text (`--model` with a GPT-Neo checkpoint) or tasks "
            "whose test inputs reuse words seen in training. The planted tasks above need no such knowledge.\n")


# ---------------------------------------------------------------------------------------------------------- figures


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
        ax.set_title(f"{t} ({res['tasks'][t]['kind']}): beta = {_fmt(mean, 2)}" + (f" ± {sd:.2f}" if sd else ""),
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
        key, label = ("f1", "test F1 (class 1)") if f1 else _metric(kind)
        for c, t in enumerate(t for t, v in tasks.items() if v["kind"] == kind):
            for method, ls in (("full", "-"), ("probe", "--")):
                ns, m, s = _curve_stats(res, t, method, key)
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
    a, b = _floats(a), _floats(b)
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


# --------------------------------------------------------------------------------------------------------- markdown


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def headline(res: dict) -> dict:
    """The numbers a reader wants first: betas, the rank correlation, task addition and xi."""
    h: dict = {"beta": {t: k.get("beta_mean") for t, k in res.get("kernels", {}).items()}}
    corr = res.get("efficiency", {}).get("correlation", {}).get("full", {})
    h["spearman_beta_vs_aulc"] = {g: (c.get("beta_vs_aulc") or {}).get("rho") for g, c in corr.items()}
    if res.get("planted"):
        verdicts = planted_report.summarize(res["planted"])["verdicts"]
        h["planted_claims_held"] = f"{sum(ok is True for _, ok, _ in verdicts)} of {len(verdicts)}"
    vec = res.get("vectors", {})
    for k, v in vec.items():
        h[f"{k}_addition_all"] = {"lambda": v["addition_all"]["lambda"],
                                  "mean_normalized_test": _nanmean(v["addition_all"]["normalized_test"].values())}
        h[f"{k}_xi_mean_at_1_1"] = _nanmean(v["xi"]["pairs_at_1_1"].values())
    return h


def _nanmean(vals) -> float | None:
    a = _floats(list(vals))
    return None if not np.isfinite(a).any() else float(np.nanmean(a))


def markdown(res: dict, figures: list[str]) -> str:
    cfg, env, model = res["config"], res.get("environment", {}), res.get("model", {})
    tasks = res.get("tasks", {})
    L = [f"# Sun & Raskutti, section 7, reproduced with minintk (preset `{cfg['preset']}`)", ""]
    if not res.get("finished"):
        L += ["**This run did not finish: the numbers below are partial.**", ""]
    pre = model.get("pretrain") or {}
    desc = model.get("describe", {})
    L += ["## Setup", "",
          f"- Model: {model.get('source')}; {desc.get('total_parameters', 0):,} parameters (d_model "
          f"{desc.get('d_model')}, {desc.get('n_layer')} layers, {desc.get('n_head')} heads, GPT-Neo attention "
          f"without scaling), tokenizer: {model.get('tokenizer', 'fallback byte-level BPE')}."]
    if pre:
        how = " (cached checkpoint)" if pre.get("cached") else f" ({pre.get('seconds')} s)"
        L.append(f"- Pretraining: {model.get('corpus')}; {pre.get('config', {}).get('steps')} steps, "
                 f"{pre.get('tokens_seen', 0):,} tokens; held-out next-token loss "
                 f"{_fmt(pre.get('heldout_loss_before'))} -> {_fmt(pre.get('heldout_loss_after'))} nats" + how)
    L.append(f"- Device: {env.get('device')} ({env.get('device_name')}), torch {env.get('torch')}, "
             f"{env.get('threads')} threads (load average at start {_fmt(env.get('load_average_at_start'), 1)}). "
             f"Wall time {res.get('elapsed_s')} s; phases (s): {res.get('phases')}.")
    L += ["", _table(["task", "kind", "examples", "train pool / val / test", "source", "label noise sigma"],
                     [[t, v["kind"], v["examples"], f"{v['train_pool']} / {v['n_val']} / {v['n_test']}", v["source"],
                       _fmt(v.get("label_noise_sigma"))] for t, v in tasks.items()]), ""]
    L += ["Fine-tuning: Adam, batch {b}, squared loss on standardized targets (+-1 for classes, read from the "
          "label-word logit difference), validation every {e} steps, patience {p}, best checkpoint kept; "
          "learning rates {lr}.".format(b=cfg["batch_size"], e=cfg["eval_every"], p=cfg["patience"], lr=cfg["lr"]),
          "nerr = test error / error of the trivial predictor (training mean; majority class).", ""]

    kern = res.get("kernels", {})
    if kern:
        L += ["## 1. Eigen-decay of the NTK (section 7.1)", "",
              f"Gram of the task model (head included) on {cfg['kernel_samples']} training inputs, "
              f"{cfg['kernel_draws']} draw(s); beta from least squares of log mu_i on log i, dropping the top 3 and "
              "the numerical floor.", "",
              _table(["task", "beta (mean ± sd over draws)", "95% CI (draw 0)", "fit range", "r^2", "seconds"],
                     [[t, _fmt(k["beta_mean"]) + (f" ± {k['beta_sd']:.3f}" if k.get("beta_sd") else ""),
                       "[" + ", ".join(_fmt(x) for x in (k["draws"][0].get("beta_ci") or [None, None])) + "]",
                       "..".join(str(x) for x in (k["draws"][0].get("range") or [])),
                       _fmt(k["draws"][0].get("r2"), 4), k["draws"][0].get("seconds")] for t, k in kern.items()]),
              "", "![decay](decay.png)" if "decay.png" in figures else "", ""]
    if res.get("planted"):
        pl = res["planted"]
        L += [planted_report.markdown(planted_report.summarize(pl), pl["config"]),
              f"Task model and inputs: {pl['task']} (training pool), {pl['seconds']} s.", "",
              "![planted](planted.png)" if "planted.png" in figures else "", ""]

    eff = res.get("efficiency", {})
    if res.get("curves"):
        L += ["## 2. Learning curves (Figure 2)", ""]
        sizes = sorted({r["n"] for r in res["curves"]})
        for method in cfg["methods"]:
            rows = []
            for t, v in tasks.items():
                key = _metric(v["kind"])[0]
                ns, m, s = _curve_stats(res, t, method, key)
                runs = {n: sum(1 for r in res["curves"] if (r["task"], r["method"], r["n"]) == (t, method, n))
                        for n in ns}
                cells = {n: f"{mm:.3f}" + (f" ± {ss:.3f}" if runs[n] > 1 else "") for n, mm, ss in zip(ns, m, s)}
                rows.append([t, key] + [cells.get(n, "—") for n in sizes])
            ran = sorted({r["seed"] for r in res["curves"] if r["method"] == method})
            L += [f"**{method}** fine-tuning (mean ± sd over seeds {ran}; no ± where one seed ran):", "",
                  _table(["task", "metric"] + [f"n={n}" for n in sizes], rows), ""]
        L += [_learning_note(res), "![learning curves](learning_curves.png)" if "learning_curves.png" in figures
              else "", "", "![f1](f1_curves.png)" if "f1_curves.png" in figures else "", ""]
    if eff:
        L += ["## 3. Does beta predict sample efficiency? (section 6.1)", "",
              "AULC = mean over training sizes of test nerr; slope = least-squares slope of log nerr on log n; "
              "the theory's rate exponent is -beta/(beta+1).", ""]
        rows = []
        for t in tasks:
            e = eff.get("per_task", {}).get(t, {})
            f, p = e.get("full", {}), e.get("probe", {})
            rows.append([t, _fmt(kern.get(t, {}).get("beta_mean")), _fmt(f.get("aulc")), _fmt(f.get("slope")),
                         _fmt(f.get("predicted_slope")), _fmt(p.get("aulc"))])
        L += [_table(["task", "beta", "AULC (full)", "slope (full)", "-beta/(beta+1)", "AULC (probe)"], rows), ""]
        for method, groups in eff.get("correlation", {}).items():
            for g, c in groups.items():
                a, s = c.get("beta_vs_aulc"), c.get("beta_vs_slope")
                if a:
                    L.append(f"- {method}, {g} tasks ({', '.join(c['tasks'])}): Spearman(beta, AULC) = {a['rho']:.2f} "
                             f"(p = {a['p']:.2f}); Spearman(beta, slope) = {_fmt(s and s['rho'], 2)}. "
                             f"The theory predicts negative values.")
        L += ["", "![decay vs efficiency](decay_vs_efficiency.png)" if "decay_vs_efficiency.png" in figures else "",
              ""]
    vec = res.get("vectors", {})
    if vec:
        L += ["## 4. Task vectors (section 7.2, Figure 3)", "",
              f"tau_k = theta_k - theta_pre from fine-tuning at n = {cfg['tv_size']} (seed {cfg['seeds'][0]}): "
              "label-word tasks reuse their learning-curve run; tasks with a scalar head are fine-tuned again with "
              "the head frozen at its initialisation (as Ilharco et al. freeze zero-shot heads), so tau holds all "
              "of a task's adaptation. Score = 1 - nerr on test (1 perfect, 0 trivial predictor); normalized = "
              "score / score of the task's own fine-tuned model (— when that is below 0.05).", ""]
        for k, v in vec.items():
            names = v["tasks"]
            L += [f"### {k} fine-tuning", "", "Cosine similarity of task vectors:", "",
                  _table([""] + names, [[a] + [_fmt(x, 2) for x in row] for a, row in zip(names, v["cosine"])]), ""]
            L += [_table(["task", "theta_pre (test)", "theta_k (test)"],
                         [[t, ", ".join(f"{m} {_fmt(x)}" for m, x in sv["pretrained"].items()),
                           ", ".join(f"{m} {_fmt(x)}" for m, x in sv["finetuned"].items())]
                          for t, sv in v["single"].items()]), ""]
            aa = v["addition_all"]
            L += [f"Addition of all {len(names)} vectors: lambda = {aa['lambda']} (validation); normalized test "
                  "scores: " + ", ".join(f"{t} {_fmt(x)}" for t, x in aa["normalized_test"].items()) + ".", ""]
            L += [_table(["pair", "lambda", "normalized test score (first, second)"],
                         [[" + ".join(p["tasks"]), p["lambda"],
                           ", ".join(_fmt(p["normalized_test"][t]) for t in p["tasks"])] for p in v["addition_pairs"]]),
                  ""]
            L += ["Negation theta_pre - lambda tau_k (lambda: largest keeping the other tasks within 5% on "
                  "validation):", "",
                  _table(["negated task", "lambda", "target score (pre -> negated)", "control score (pre -> negated)",
                          "target / control at lambda = 1"],
                         [[t, n["lambda"], f"{_fmt(n['target_score_pre'])} -> {_fmt(n['target_score'])}",
                           f"{_fmt(n['control_score_pre'])} -> {_fmt(n['control_score'])}",
                           f"{_fmt(n.get('target_score_at_1'))} / {_fmt(n.get('control_score_at_1'))}"]
                          for t, n in v["negation"].items()]), ""]
            xi = v["xi"]["pairs_at_1_1"]
            L += ["Weight disentanglement error xi(1, 1) per pair (squared distance of standardized outputs for "
                  "regression, disagreement rate for classification; summed over the two tasks): "
                  + ", ".join(f"{p} {_fmt(x)}" for p, x in xi.items()) + f"; mean {_fmt(_nanmean(xi.values()))}.", ""]
        for k, runs in res.get("vector_runs", {}).items():
            L += [f"Fine-tuning runs made for the {k} task vectors: " + "; ".join(
                f"{t} (n={r['n']}{', head frozen' if r['frozen_head'] else ''}): "
                + ", ".join(f"{m} {_fmt(x)}" for m, x in r["test"].items()) for t, r in runs.items()) + ".", ""]
        for name in ("task_vectors.png", "disentanglement.png"):
            if name in figures:
                L += [f"![{name[:-4]}]({name})", ""]
    if "training_curves.png" in figures:
        L += ["## Fine-tuning curves", "", "![training curves](training_curves.png)", ""]
    if res.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    L += ["## Headline (JSON)", "", "```json", json.dumps(headline(res), indent=1), "```", ""]
    return "\n".join(x for x in L if x is not None)


def render(out: str | Path) -> Path:
    """Write out/report.md and the figures from out/results.json; figures need matplotlib (skipped without it)."""
    out = Path(out)
    res = _load(out)
    made: list[str] = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        res.setdefault("notes", []).append("matplotlib is not installed: no figures (re-render with --render)")
    else:
        for name, (fn, needs) in FIGURES.items():
            if res.get(needs):
                try:
                    fn(res, out / name)
                except Exception as e:  # a figure that cannot be drawn must not lose the report: say why instead
                    res.setdefault("notes", []).append(f"figure {name} not drawn: {type(e).__name__}: {e}")
                if (out / name).exists():
                    made.append(name)
    (out / "report.md").write_text(markdown(res, made))
    return out / "report.md"
