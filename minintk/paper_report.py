"""The report of a paper run (minintk.paper): report.md and PNG figures, rendered from results.json alone.

The figures are drawn by paper_figures.py; this file writes the markdown, the headline and the files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import planted_report
from .paper_figures import FIGURES
from .paper_results import curve_stats, floats, fmt, metric


def _load(out: Path) -> dict:
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the pipeline first (it writes results.json)")
    return json.loads(path.read_text())



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
    a = floats(list(vals))
    return None if not np.isfinite(a).any() else float(np.nanmean(a))


def markdown(res: dict, figures: list[str]) -> str:
    """report.md: the setup, then one section per phase that ran, notes and the headline."""
    cfg = res["config"]
    L = [f"# Sun & Raskutti, section 7, reproduced with minintk (preset `{cfg['preset']}`)", ""]
    if not res.get("finished"):
        L += ["**This run did not finish: the numbers below are partial.**", ""]
    L += _setup(res)
    for section in (_kernels, _planted, _curves, _efficiency, _vectors):
        L += section(res, figures)
    if "training_curves.png" in figures:
        L += ["## Fine-tuning curves", "", "![training curves](training_curves.png)", ""]
    if res.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    L += ["## Headline (JSON)", "", "```json", json.dumps(headline(res), indent=1), "```", ""]
    return "\n".join(x for x in L if x is not None)


def _setup(res: dict) -> list:
    cfg, env, model = res["config"], res.get("environment", {}), res.get("model", {})
    tasks = res.get("tasks", {})
    pre = model.get("pretrain") or {}
    desc = model.get("describe", {})
    L = ["## Setup", "",
         f"- Model: {model.get('source')}; {desc.get('total_parameters', 0):,} parameters (d_model "
         f"{desc.get('d_model')}, {desc.get('n_layer')} layers, {desc.get('n_head')} heads, GPT-Neo attention "
         f"without scaling), tokenizer: {model.get('tokenizer', 'fallback byte-level BPE')}."]
    if pre:
        how = " (cached checkpoint)" if pre.get("cached") else f" ({pre.get('seconds')} s)"
        L.append(f"- Pretraining: {model.get('corpus')}; {pre.get('config', {}).get('steps')} steps, "
                 f"{pre.get('tokens_seen', 0):,} tokens; held-out next-token loss "
                 f"{fmt(pre.get('heldout_loss_before'))} -> {fmt(pre.get('heldout_loss_after'))} nats" + how)
    L.append(f"- Device: {env.get('device')} ({env.get('device_name')}), torch {env.get('torch')}, "
             f"{env.get('threads')} threads (load average at start {fmt(env.get('load_average_at_start'), 1)}). "
             f"Wall time {res.get('elapsed_s')} s; phases (s): {res.get('phases')}.")
    L += ["", _table(["task", "kind", "examples", "train pool / val / test", "source", "label noise sigma"],
                     [[t, v["kind"], v["examples"], f"{v['train_pool']} / {v['n_val']} / {v['n_test']}", v["source"],
                       fmt(v.get("label_noise_sigma"))] for t, v in tasks.items()]), ""]
    L += ["Fine-tuning: Adam, batch {b}, squared loss on standardized targets (+-1 for classes, read from the "
          "label-word logit difference), validation every {e} steps, patience {p}, best checkpoint kept; "
          "learning rates {lr}.".format(b=cfg["batch_size"], e=cfg["eval_every"], p=cfg["patience"], lr=cfg["lr"]),
          "nerr = test error / error of the trivial predictor (training mean; majority class).", ""]
    return L


def _kernels(res: dict, figures: list[str]) -> list:
    kern, cfg = res.get("kernels", {}), res["config"]
    if not kern:
        return []
    return ["## 1. Eigen-decay of the NTK (section 7.1)", "",
            f"Gram of the task model (head included) on {cfg['kernel_samples']} training inputs, "
            f"{cfg['kernel_draws']} draw(s); beta from least squares of log mu_i on log i, dropping the top 3 and "
            "the numerical floor.", "",
            _table(["task", "beta (mean ± sd over draws)", "95% CI (draw 0)", "fit range", "r^2", "seconds"],
                   [[t, fmt(k["beta_mean"]) + (f" ± {k['beta_sd']:.3f}" if k.get("beta_sd") else ""),
                     "[" + ", ".join(fmt(x) for x in (k["draws"][0].get("beta_ci") or [None, None])) + "]",
                     "..".join(str(x) for x in (k["draws"][0].get("range") or [])),
                     fmt(k["draws"][0].get("r2"), 4), k["draws"][0].get("seconds")] for t, k in kern.items()]),
            "", "![decay](decay.png)" if "decay.png" in figures else "", ""]


def _planted(res: dict, figures: list[str]) -> list:
    pl = res.get("planted")
    if not pl:
        return []
    return [planted_report.markdown(planted_report.summarize(pl), pl["config"]),
            f"Task model and inputs: {pl['task']} (training pool), {pl['seconds']} s.", "",
            "![planted](planted.png)" if "planted.png" in figures else "", ""]


def _curves(res: dict, figures: list[str]) -> list:
    if not res.get("curves"):
        return []
    L = ["## 2. Learning curves (Figure 2)", ""]
    sizes = sorted({r["n"] for r in res["curves"]})
    for method in res["config"]["methods"]:
        rows = []
        for t, v in res.get("tasks", {}).items():
            key = metric(v["kind"])[0]
            ns, m, s = curve_stats(res, t, method, key)
            runs = {n: sum(1 for r in res["curves"] if (r["task"], r["method"], r["n"]) == (t, method, n))
                    for n in ns}
            cells = {n: f"{mm:.3f}" + (f" ± {ss:.3f}" if runs[n] > 1 else "") for n, mm, ss in zip(ns, m, s)}
            rows.append([t, key] + [cells.get(n, "—") for n in sizes])
        ran = sorted({r["seed"] for r in res["curves"] if r["method"] == method})
        L += [f"**{method}** fine-tuning (mean ± sd over seeds {ran}; no ± where one seed ran):", "",
              _table(["task", "metric"] + [f"n={n}" for n in sizes], rows), ""]
    L += [_learning_note(res), "![learning curves](learning_curves.png)" if "learning_curves.png" in figures
          else "", "", "![f1](f1_curves.png)" if "f1_curves.png" in figures else "", ""]
    return L


def _efficiency(res: dict, figures: list[str]) -> list:
    eff, kern = res.get("efficiency", {}), res.get("kernels", {})
    if not eff:
        return []
    L = ["## 3. Does beta predict sample efficiency? (section 6.1)", "",
         "AULC = mean over training sizes of test nerr; slope = least-squares slope of log nerr on log n; "
         "the theory's rate exponent is -beta/(beta+1).", ""]
    rows = []
    for t in res.get("tasks", {}):
        e = eff.get("per_task", {}).get(t, {})
        f, p = e.get("full", {}), e.get("probe", {})
        rows.append([t, fmt(kern.get(t, {}).get("beta_mean")), fmt(f.get("aulc")), fmt(f.get("slope")),
                     fmt(f.get("predicted_slope")), fmt(p.get("aulc"))])
    L += [_table(["task", "beta", "AULC (full)", "slope (full)", "-beta/(beta+1)", "AULC (probe)"], rows), ""]
    for method, groups in eff.get("correlation", {}).items():
        for g, c in groups.items():
            a, s = c.get("beta_vs_aulc"), c.get("beta_vs_slope")
            if a:
                L.append(f"- {method}, {g} tasks ({', '.join(c['tasks'])}): Spearman(beta, AULC) = {a['rho']:.2f} "
                         f"(p = {a['p']:.2f}); Spearman(beta, slope) = {fmt(s and s['rho'], 2)}. "
                         f"The theory predicts negative values.")
    L += ["", "![decay vs efficiency](decay_vs_efficiency.png)" if "decay_vs_efficiency.png" in figures else "",
          ""]
    return L


def _vectors(res: dict, figures: list[str]) -> list:
    vec, cfg = res.get("vectors", {}), res["config"]
    if not vec:
        return []
    L = ["## 4. Task vectors (section 7.2, Figure 3)", "",
         f"tau_k = theta_k - theta_pre from fine-tuning at n = {cfg['tv_size']} (seed {cfg['seeds'][0]}): "
         "label-word tasks reuse their learning-curve run; tasks with a scalar head are fine-tuned again with "
         "the head frozen at its initialisation (as Ilharco et al. freeze zero-shot heads), so tau holds all "
         "of a task's adaptation. Score = 1 - nerr on test (1 perfect, 0 trivial predictor); normalized = "
         "score / score of the task's own fine-tuned model (— when that is below 0.05).", ""]
    for k, v in vec.items():
        L += _vector_set(k, v)
    for k, runs in res.get("vector_runs", {}).items():
        L += [f"Fine-tuning runs made for the {k} task vectors: " + "; ".join(
            f"{t} (n={r['n']}{', head frozen' if r['frozen_head'] else ''}): "
            + ", ".join(f"{m} {fmt(x)}" for m, x in r["test"].items()) for t, r in runs.items()) + ".", ""]
    for name in ("task_vectors.png", "disentanglement.png"):
        if name in figures:
            L += [f"![{name[:-4]}]({name})", ""]
    return L


def _vector_set(k: str, v: dict) -> list:
    """One fine-tuning variant's task vectors: cosines, single tasks, addition, negation, xi."""
    names = v["tasks"]
    L = [f"### {k} fine-tuning", "", "Cosine similarity of task vectors:", "",
         _table([""] + names, [[a] + [fmt(x, 2) for x in row] for a, row in zip(names, v["cosine"])]), ""]
    L += [_table(["task", "theta_pre (test)", "theta_k (test)"],
                 [[t, ", ".join(f"{m} {fmt(x)}" for m, x in sv["pretrained"].items()),
                   ", ".join(f"{m} {fmt(x)}" for m, x in sv["finetuned"].items())]
                  for t, sv in v["single"].items()]), ""]
    aa = v["addition_all"]
    L += [f"Addition of all {len(names)} vectors: lambda = {aa['lambda']} (validation); normalized test "
          "scores: " + ", ".join(f"{t} {fmt(x)}" for t, x in aa["normalized_test"].items()) + ".", ""]
    L += [_table(["pair", "lambda", "normalized test score (first, second)"],
                 [[" + ".join(p["tasks"]), p["lambda"],
                   ", ".join(fmt(p["normalized_test"][t]) for t in p["tasks"])] for p in v["addition_pairs"]]),
          ""]
    L += ["Negation theta_pre - lambda tau_k (lambda: largest keeping the other tasks within 5% on "
          "validation):", "",
          _table(["negated task", "lambda", "target score (pre -> negated)", "control score (pre -> negated)",
                  "target / control at lambda = 1"],
                 [[t, n["lambda"], f"{fmt(n['target_score_pre'])} -> {fmt(n['target_score'])}",
                   f"{fmt(n['control_score_pre'])} -> {fmt(n['control_score'])}",
                   f"{fmt(n.get('target_score_at_1'))} / {fmt(n.get('control_score_at_1'))}"]
                  for t, n in v["negation"].items()]), ""]
    xi = v["xi"]["pairs_at_1_1"]
    L += ["Weight disentanglement error xi(1, 1) per pair (squared distance of standardized outputs for "
          "regression, disagreement rate for classification; summed over the two tasks): "
          + ", ".join(f"{p} {fmt(x)}" for p, x in xi.items()) + f"; mean {fmt(_nanmean(xi.values()))}.", ""]
    return L


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
