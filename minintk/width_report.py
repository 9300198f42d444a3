"""The width scan's report (minintk.width): markdown tables of the fitted slopes, log-log PNGs, loss curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .width_metrics import METRICS


def _cell(entry: dict | None) -> str:
    if entry is None or entry["fit"] is None:
        return "undefined (needs >= 3 widths with values)"
    f = entry["fit"]
    return f"{f['slope']:+.2f} [{f['ci'][0]:+.2f}, {f['ci'][1]:+.2f}] {entry['verdict']}"


def slope_table(summary: dict) -> str:
    """Markdown table of the fitted slopes [interval] and verdicts: one row per variant, one column per metric."""
    names = [m for m in METRICS if any(m in v["metrics"] for v in summary["variants"].values())]
    lines = ["| variant | " + " | ".join(METRICS[m][0] for m in names) + " |", "|---" * (len(names) + 1) + "|",
             "| theory | " + " | ".join("-1/2" if METRICS[m][2] is not None else "-> 0" for m in names) + " |"]
    for key, v in summary["variants"].items():
        lines.append(f"| {key.replace('|', ', ')} | " + " | ".join(_cell(v["metrics"].get(m)) for m in names) + " |")
    return "\n".join(lines)


def summary_markdown(summary: dict) -> str:
    """The summary as markdown: slopes with intervals per variant and metric, then values per width."""
    cfg = summary["config"]
    names = [m for m in METRICS if any(m in v["metrics"] for v in summary["variants"].values())]
    task = (f"`{cfg['data']}`" if cfg["data"] else
            f"a random teacher decoder (width {cfg['teacher_width']}, targets standardized, noise {cfg['noise']:g})")
    lines = [
        "# Width scan: does the NTK theory hold for the decoder? (docs/theory.md section 6)", "",
        f"Widths d = {', '.join(map(str, cfg['widths']))} (n_head = {cfg['n_head']}, d_mlp = {cfg['mlp_ratio']:g} d, "
        f"{cfg['n_layer']} block(s)), {cfg['seeds']} seeds; task: {task}, {cfg['n_train']} train / {cfg['n_test']} "
        f"test sequences of {cfg['seq_len']} tokens. Full-batch gradient descent with eta = {cfg['lr']:g} per step "
        f"(standard parameterization: eta / d, its kernel normalized by width); metrics at eta t = "
        f"{cfg['times'][-1]:g}; pretrained starts: gradient descent on a different teacher for eta t = "
        f"{cfg['pretrain_time']:g}. Device {cfg['device']}; exact empirical NTK in fp32; {summary['runs']} runs, "
        f"{summary['run_seconds']:.0f} s.", "",
        f"Slope of log(metric) against log(d), least squares over all width x seed points, {cfg['level']:.0%} "
        f"interval (t); verdict against the theory's -1/2: 'matches' (inside the interval), 'steeper', "
        f"'shallower', 'no significant decay' (interval holds 0).", "",
        slope_table(summary),
    ]
    lines += [""] + [f"- {METRICS[m][0]}: `{METRICS[m][1]}`" for m in names]
    groups = sorted({g for v in summary["variants"].values() for g in v.get("movement_by_group", {})})
    if groups:
        lines += ["", f"Weight movement by parameter group at eta t = {cfg['times'][-1]:g}, slope [interval] against "
                  "log d: tables and vectors whose fan-in does not grow with d (embeddings, LayerNorm, head) beside "
                  "the d x d and d x 4d matrices (attention, mlp):", "",
                  "| variant | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
        for key, v in summary["variants"].items():
            fits = [v.get("movement_by_group", {}).get(g) for g in groups]
            cells = [f"{f['slope']:+.2f} [{f['ci'][0]:+.2f}, {f['ci'][1]:+.2f}]" if f else "n/a" for f in fits]
            lines.append(f"| {key.replace('|', ', ')} | " + " | ".join(cells) + " |")
    lines += ["", "Mean over seeds per width:", ""]
    for m in names:
        lines += [f"**{METRICS[m][0]}**", "", "| variant | " + " | ".join(f"d={w}" for w in cfg["widths"]) + " |",
                  "|---" * (len(cfg["widths"]) + 1) + "|"]
        for key, v in summary["variants"].items():
            pw = v["metrics"].get(m, {}).get("per_width", {})
            if pw:
                cells = [f"{pw[str(w)]['mean']:.3g}" if str(w) in pw else "" for w in cfg["widths"]]
                lines.append(f"| {key.replace('|', ', ')} | " + " | ".join(cells) + " |")
        lines.append("")
    if summary["failed"]:
        lines += ["Failed runs:", ""] + [f"- {k}: {e}" for k, e in summary["failed"].items()] + [""]
    if summary["stopped"]:
        lines += [f"Stopped early: {summary['stopped']}", ""]
    return "\n".join(lines)


def plot_metric(summary: dict, metric: str, path: str | Path) -> Path:
    """Log-log PNG of `metric` against width, one line per variant (mean over seeds, min-max bars) with its fit."""
    from matplotlib.figure import Figure

    short, formula, pred = METRICS[metric]
    fig = Figure(figsize=(7.0, 4.6), layout="constrained")
    ax = fig.subplots()
    anchor = None
    for i, (key, v) in enumerate(summary["variants"].items()):
        entry = v["metrics"].get(metric)
        if entry is None or not entry["per_width"]:
            continue
        w = np.array([int(k) for k in entry["per_width"]])
        mean = np.array([p["mean"] for p in entry["per_width"].values()])
        lo = mean - np.array([p["min"] for p in entry["per_width"].values()])
        hi = np.array([p["max"] for p in entry["per_width"].values()]) - mean
        label = key.replace("|", ", ")
        if entry["fit"]:
            f = entry["fit"]
            label += f": slope {f['slope']:+.2f} [{f['ci'][0]:+.2f}, {f['ci'][1]:+.2f}]"
            ax.plot(w, np.exp(f["intercept"]) * w ** f["slope"], "--", color=f"C{i}", lw=1)
        ax.errorbar(w, mean, yerr=[lo, hi], fmt="o-", color=f"C{i}", ms=4, capsize=2, label=label)
        anchor = anchor or (w[0], mean[0])
    if anchor is not None and pred is not None:
        ww = np.array([anchor[0], max(summary["config"]["widths"])])
        ax.plot(ww, anchor[1] * (ww / anchor[0]) ** pred, ":", color="gray", label=f"theory: slope {pred:g}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("embedding width d (heads fixed)")
    ax.set_ylabel(f"{short} (dimensionless)" if metric != "loss_gap" else f"{short} (units of y^2)")
    eta = summary["config"]["times"][-1]
    when = "" if metric in ("spread", "pretrain_move") else f", at eta t = {eta:g}"
    ax.set_title(f"{short}: {formula}{when}", fontsize=9)
    ax.legend(fontsize=7)
    return _save_png(fig, path, dpi=80)


def plot_losses(summary: dict, runs: dict, path: str | Path, seed: int = 0) -> Path:
    """Train (top) and test (bottom) loss against eta t for every width (colours), network solid, linearized
    dashed, one column per variant, for one seed."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    cfg = summary["config"]
    keys = list(summary["variants"])
    fig = Figure(figsize=(3.2 * len(keys) + 0.5, 5.6), layout="constrained")
    axes = fig.subplots(2, len(keys), squeeze=False, sharex=True)
    cmap = colormaps["viridis"]
    for j, key in enumerate(keys):
        for i, w in enumerate(cfg["widths"]):
            r = runs.get(f"{key}|d={w}|seed={seed}")
            if r is None or "error" in r:
                continue
            c = cmap(i / max(1, len(cfg["widths"]) - 1))
            eta = np.array(r["curves"]["step"]) * cfg["lr"]
            for row, part in enumerate(("train", "test")):
                axes[row, j].plot(eta, r["curves"][f"net_{part}"], "-", color=c, lw=1.2, label=f"d={w}")
                axes[row, j].plot(eta, r["curves"][f"lin_{part}"], "--", color=c, lw=1)
        axes[0, j].set_title(key.replace("|", ", "), fontsize=9)
        axes[1, j].set_xlabel("eta t")
        for row in range(2):
            axes[row, j].set_yscale("log")
    axes[0, 0].set_ylabel("train loss (1/2n)||f - y||^2")
    axes[1, 0].set_ylabel("test loss")
    axes[0, 0].legend(fontsize=7, title="solid net, dashed lin", title_fontsize=7)
    return _save_png(fig, path, dpi=72)


def _save_png(fig, path: str | Path, dpi: int) -> Path:
    """Save a figure as a 64-colour PNG (a quarter of the bytes of full colour, same look for line plots)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    path = Path(path)
    Image.open(buf).convert("RGB").quantize(colors=64).save(path, optimize=True)
    return path


