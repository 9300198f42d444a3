"""Width-scaling checks of the NTK theory on the decoder (docs/theory.md section 6; paper Lemma 1, Theorem 1,
eq. 17-18).

For each embedding width d (heads and MLP ratio fixed), seed and variant, one run trains a student by full-batch
gradient descent on a regression task and measures, at fixed times eta t:
  spread     ||K_0^s - mean_s K_0||_F / ||mean_s K_0||_F over seeds s  (the NTK at the start concentrates)
  drift      ||K_t - K_0||_F / ||K_0||_F                              (the NTK stays put)
  movement   ||theta_t - theta_0|| / ||theta_0||                       (the weights move little)
  lin_error  RMS_test(f_t - f_lin,t) / RMS(y_test)                     (the network follows its linearization)
  loss_gap   |L_test(f_t) - L_test(f_lin,t)|, and both models' loss curves
and fits log(metric) = a + slope log(d) with a confidence interval, beside the theory's -1/2.
K is the exact empirical NTK (engine.ntk) on the training inputs. f_lin,t is the closed form of gradient descent on
the linearized model (dynamics.gradient_descent_mse on K_0 and Theta_0(X_test, X)), which is what training
linearize.linearize's f_lin by the same steps gives (tests/test_width_run.py checks it against linearize.train).
Time eta t = lr t is in units where the kernel is O(1): the NTK parameterization steps by alpha = lr, the
standard one by alpha = lr / d (the paper normalizes its kernel by width, Theta / m; docs/theory.md section 1).
Starts: "random" (Gaussian init), "pretrained" (the same network trained by gradient descent on a source task, a
different teacher, for pretrain_time), "linear_head" (that pretrained backbone with a fresh random head, paper
section 5.1). Runs are recorded one by one, so an interrupted scan resumes where it stopped.

This file runs the scan and summarizes it; the settings are in width_config.py, the tasks in width_tasks.py, one
run in width_run.py, the metric table and the slope fits in width_metrics.py, the tables and PNGs in
width_report.py.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .files import write_json
from .width_config import ScanConfig, WidthScanError
from .width_metrics import METRICS, fit_slope, spread, verdict
from .width_report import plot_losses, plot_metric, summary_markdown
from .width_run import run_key, run_one
from .width_tasks import tasks

# ----------------------------------------------------------------------------------------------- the scan


def scan(cfg: ScanConfig, runs: dict | None = None, on_run: Callable[[dict], None] | None = None,
         progress: bool = True) -> dict:
    """Every (width, seed, variant) run not already in `runs` (keyed by run_key), widths ascending so that a
    budget or an interruption cuts the widest. on_run(runs) is called after each run (to save). Returns runs,
    with "_stopped" set to a message if the budget stopped the scan early."""
    from tqdm.auto import tqdm

    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise WidthScanError(f"device {cfg.device!r} asked for, but torch sees no CUDA GPU; give --device cpu (and a "
                             f"smaller --widths list) or run on a GPU machine")
    runs = dict(runs or {})
    runs.pop("_stopped", None)
    target, source, vocab = tasks(cfg)
    keys = [(w, s, v) for w in cfg.widths for s in range(cfg.seeds) for v in cfg.variants]
    todo = [k for k in keys if run_key(k[2], k[0], k[1]) not in runs]
    bar = tqdm(total=len(keys), initial=len(keys) - len(todo), desc="width scan", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    start, cache, block = time.perf_counter(), {}, {}  # block: seconds spent per width in this call
    for w, s, v in todo:
        spent = time.perf_counter() - start
        if cfg.budget_s is not None and spent > cfg.budget_s:
            runs["_stopped"] = f"budget {cfg.budget_s:.0f} s spent: stopped before {run_key(v, w, s)}"
            break
        if cfg.budget_s is not None and block and w not in block:  # a new width: would it fit the budget?
            pw, sec = list(block.items())[-1]
            per_run = sec / sum(1 for k in todo if k[0] == pw)
            estimate = per_run * sum(1 for k in todo if k[0] == w) * (w / pw) ** 2  # cost ~ d^2 per run
            if spent + estimate > cfg.budget_s:
                runs["_stopped"] = (f"budget {cfg.budget_s:.0f} s: width {w} not started (estimated {estimate:.0f} s "
                                    f"after {spent:.0f} s)")
                break
        bar.set_postfix_str(f"d={w} seed={s} {v.key}")
        t0 = time.perf_counter()
        try:
            rec = run_one(cfg, v, w, s, target, source, vocab, cache)
        except WidthScanError as e:
            rec = {"variant": v.key, "width": w, "seed": s, "error": str(e)}
        except torch.cuda.OutOfMemoryError:  # not recorded: a resume on a larger GPU retries it
            cache.clear()
            torch.cuda.empty_cache()
            runs["_stopped"] = f"out of GPU memory at {run_key(v, w, s)}; wider widths not run"
            break
        block[w] = block.get(w, 0.0) + time.perf_counter() - t0
        runs[run_key(v, w, s)] = rec
        if on_run is not None:
            on_run(runs)
        bar.update(1)
    bar.close()
    return runs


def summarize(cfg: ScanConfig, runs: dict) -> dict:
    """Per variant and metric: values per width (over seeds), the fitted slope with its CI, the prediction and
    a verdict. Metrics at the last time; drift, movement and lin_error also at every time (by_time)."""
    mine = [runs[run_key(v, w, s)] for v in cfg.variants for w in cfg.widths for s in range(cfg.seeds)
            if run_key(v, w, s) in runs]
    out = {"config": cfg.to_dict(), "variants": {}, "failed": {}, "stopped": runs.get("_stopped"),
           "run_seconds": sum(r.get("seconds", 0.0) for r in mine), "runs": len(mine)}
    for v in cfg.variants:
        recs = [runs.get(run_key(v, w, s)) for w in cfg.widths for s in range(cfg.seeds)]
        recs = [r for r in recs if r is not None]
        out["failed"] |= {run_key(v, r["width"], r["seed"]): r["error"] for r in recs if "error" in r}
        good = [r for r in recs if "error" not in r]
        points: dict[str, list] = {m: [] for m in METRICS}
        by_time: dict[str, list] = {m: [[] for _ in cfg.times] for m in ("drift", "movement", "lin_error")}
        for r in good:
            for m in ("drift", "movement", "lin_error", "loss_gap"):
                points[m].append((r["width"], r[m][-1]))
            for m, rows in by_time.items():
                for i, val in enumerate(r[m]):
                    rows[i].append((r["width"], val))
            if r.get("pretrain_move") is not None:
                points["pretrain_move"].append((r["width"], r["pretrain_move"]))
        for w in cfg.widths:
            same = [r for r in good if r["width"] == w]
            if len(same) >= 2:
                points["spread"] += [(w, val) for val in spread([r["K0"] for r in same])]
        metrics = {}
        for m, pts in points.items():
            if not pts:
                continue
            label, _, pred = METRICS[m]
            fit = fit_slope([p[0] for p in pts], [p[1] for p in pts], cfg.level)
            per_width = {}
            for w in cfg.widths:
                vals = [p[1] for p in pts if p[0] == w]
                if vals:
                    per_width[str(w)] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)),
                                         "max": float(np.max(vals)), "values": vals}
            entry = {"label": label, "prediction": pred, "per_width": per_width,
                     "fit": fit._asdict() if fit else None, "verdict": verdict(fit, pred)}
            if m in by_time:
                fits = [fit_slope([p[0] for p in rows], [p[1] for p in rows], cfg.level) for rows in by_time[m]]
                entry["by_time"] = [{"eta_t": t, "fit": f._asdict() if f else None} for t, f in zip(cfg.times, fits)]
            metrics[m] = entry
        groups = sorted({g for r in good for g in r["movement_by_group"][-1]})
        by_group = {g: fit_slope([r["width"] for r in good], [r["movement_by_group"][-1][g] for r in good], cfg.level)
                    for g in groups}
        out["variants"][v.key] = {"parameterization": v.parameterization, "attn_scale": v.attn_scale,
                                  "start": v.start, "runs": len(good), "metrics": metrics,
                                  "movement_by_group": {g: f._asdict() if f else None for g, f in by_group.items()}}
    return out


# ----------------------------------------------------------------------------------------------- files


def load_runs(cfg: ScanConfig, out: Path) -> dict:
    """The runs already measured in out/runs.json, if its settings are cfg's; {} if there is none."""
    p = out / "runs.json"
    if not p.is_file():
        return {}
    saved = json.loads(p.read_text())
    if saved.get("fingerprint") != cfg.fingerprint():
        diff = sorted(k for k in set(saved.get("fingerprint", {})) | set(cfg.fingerprint())
                      if saved.get("fingerprint", {}).get(k) != cfg.fingerprint().get(k))
        raise WidthScanError(f"{p} was measured with other settings ({', '.join(diff)} differ); give another --out "
                             f"or the same settings to resume")
    return saved["runs"]


def run_scan(cfg: ScanConfig, out: str | Path, progress: bool = True) -> dict:
    """Scan, resuming from out/runs.json, saving it after every run, then write summary.json, summary.md and the
    PNGs to out/. Returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fp = cfg.fingerprint()

    def save(runs: dict) -> None:
        write_json(out / "runs.json", {"fingerprint": fp, "runs": runs}, indent=None)

    runs = scan(cfg, load_runs(cfg, out), save, progress)
    save(runs)
    summary = summarize(cfg, runs)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(summary_markdown(summary))
    try:
        for m in METRICS:
            if any(m in v["metrics"] for v in summary["variants"].values()):
                plot_metric(summary, m, out / f"{m}.png")
        plot_losses(summary, runs, out / "losses.png")
    except ImportError as e:
        print(f"minintk width-scan: no plots ({e}); rerun the same command where matplotlib is installed: it "
              f"draws them from runs.json without recomputing", file=sys.stderr)
    return summary
