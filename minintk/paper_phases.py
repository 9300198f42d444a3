"""The first three phases of a paper run (paper.py): each task's data and model, the NTK Gram and its eigen-decay
beta per task, learning curves with hold-out early stopping, and sample efficiency against beta."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import KINDS, Split, Task, kernel_sample, load_task, split
from .finetune import Data, FinetuneConfig, Packed, features, finetune, task_model
from .model import Decoder
from .paper_config import PaperConfig
from .paper_results import Run
from .spectrum import SpectrumError, eigenvalues, fit_power_law
from .tokenization import encode, label_ids


@dataclass
class TaskSetup:
    """One task of a run: its examples and split, its task model over the pretrained body, the token ids of its
    label words (classification), its packed inputs, and the label-noise sd sigma when the data give it."""

    task: Task
    split: Split
    model: Packed
    label_ids: tuple[int, int] | None
    X: dict  # encoded packed inputs by split name ("val", "test") and the train pool ("pool")
    sigma: float | None


def setup_tasks(run: Run, base: Decoder, tok) -> dict[str, TaskSetup]:
    """Every task of the run on the base model, by name; each task's description goes into the results."""
    cfg, out = run.cfg, {}
    for name in cfg.tasks:
        task = load_task(name, cfg.data_dir)
        sp = split(task, cfg.n_val, cfg.n_test)
        lid = label_ids(tok, task.label_words) if task.kind == "classification" else None
        X = {s: encode(task, getattr(sp, s), tok, cfg.max_len).packed() for s in ("val", "test")}
        X["pool"] = encode(task, sp.train, tok, cfg.max_len).packed()
        sigma = None if task.noise_sd is None else float(np.sqrt(np.mean(task.noise_sd**2)))
        out[name] = TaskSetup(task, sp, task_model(base, task.kind, lid), lid, X, sigma)
        run.results.setdefault("tasks", {})[name] = {
            "kind": task.kind, "examples": len(task), "source": task.source, "template": task.template,
            "label_words": task.label_words, "label_ids": lid, "train_pool": int(sp.train.size),
            "n_val": int(sp.val.size), "n_test": int(sp.test.size), "label_noise_sigma": sigma,
            "y_mean": float(task.y.mean()), "y_sd": float(task.y.std())}
    return out


def phase_kernels(run: Run, tasks: dict[str, TaskSetup], tok) -> None:
    """NTK Gram of each task model on kernel_samples training inputs, kernel_draws times; beta of each."""
    from .engine import ntk

    cfg, rec = run.cfg, {}
    for name, ts in tasks.items():
        draws = []
        for d in range(cfg.kernel_draws):
            idx = kernel_sample(ts.task, ts.split, cfg.kernel_samples, draw=d)
            enc = encode(ts.task, idx, tok, cfg.max_len)
            dev = next(ts.model.parameters()).device
            t = time.perf_counter()
            K = ntk(ts.model.model, {"idx": enc.ids.to(dev), "attention_mask": enc.mask.to(dev)},
                    precision=cfg.kernel_precision, progress=False)
            spec = eigenvalues(K)
            entry = {"seconds": round(time.perf_counter() - t, 2), "floor": spec.floor,
                     "n_above_floor": spec.n_above_floor, "trace_over_n": float(spec.mu.sum())}
            try:
                fit = fit_power_law(spec.mu, floor=spec.floor)
                entry.update(beta=fit.beta, beta_ci=fit.beta_ci, r2=fit.r2, range=(fit.first, fit.last), C=fit.C)
            except SpectrumError as e:
                entry.update(beta=None, fit_error=str(e))
            if d == 0:
                entry["mu"] = spec.mu
            draws.append(entry)
        betas = [e["beta"] for e in draws if e["beta"] is not None]
        rec[name] = {"draws": draws, "beta_mean": float(np.mean(betas)) if betas else None,
                     "beta_sd": float(np.std(betas, ddof=1)) if len(betas) > 1 else None}
        print(f"  {name}: beta = {rec[name]['beta_mean']:.3f}" + (f" +- {rec[name]['beta_sd']:.3f}"
                                                                   if rec[name]["beta_sd"] else ""))
        run.results["kernels"] = rec
        run.save()


def finetune_config(cfg: PaperConfig, method: str, seed: int) -> FinetuneConfig:
    """The fine-tuning settings of `method` ("full", "tangent" or "probe") and seed, from the run's."""
    return FinetuneConfig(method=method, lr=cfg.lr[method], batch_size=cfg.batch_size, max_steps=cfg.max_steps,
                          eval_every=cfg.eval_every, patience=cfg.patience, seed=seed)


def finetune_task(ts: TaskSetup, idx_pool: np.ndarray, y: np.ndarray, fc: FinetuneConfig):
    """Fine-tune the task model on the train-pool positions idx_pool (targets y), stopping on validation; the
    linear probe trains on the body's features. Returns finetune.finetune's result (with its test metrics)."""
    sp, X = ts.split, ts.X
    Xtr = X["pool"][torch.as_tensor(idx_pool)]
    Xv, Xt = X["val"], X["test"]
    if fc.method == "probe":
        Xtr, Xv, Xt = features(ts.model, Xtr), features(ts.model, Xv), features(ts.model, Xt)
    y_of = ts.task.y
    return finetune(ts.model, Data(Xtr, y), Data(Xv, y_of[sp.val]), Data(Xt, y_of[sp.test]), ts.task.kind, fc)


def _compact(history: list[dict]) -> dict:
    keys = ("train_loss", "val_loss", "test_loss")
    out = {"step": [h["step"] for h in history]}
    for k in keys:
        out[k] = [h.get(k) for h in history]
    out["test_nerr"] = [h.get("test", {}).get("nerr") for h in history]
    return out


def phase_curves(run: Run, tasks: dict[str, TaskSetup]) -> dict:
    """Learning curves: every (seed, task, size, method), seed-major so that a cut run loses seeds, not sizes.
    Returns the fine-tuned parameters of (first seed, tv_size, full) per task, for the task vectors."""
    cfg = run.cfg
    cells = [(s, name, n, m) for s in cfg.seeds for name in tasks for n in cfg.sizes for m in cfg.methods]
    keep, rows, skipped = {}, [], 0
    reserve = 0.25 * cfg.budget_min * 60 if cfg.budget_min else 0.0  # for the task vectors and the report
    bar = tqdm(cells, desc="fine-tuning", mininterval=5.0)
    for seed, name, n, method in bar:
        ts = tasks[name]
        if n > ts.split.train.size:
            continue
        if run.left() < reserve and not (seed == cfg.seeds[0] and n == cfg.tv_size and method == "full"):
            skipped += 1
            continue
        pool_pos = ts.split.train_positions(n, seed)
        y = ts.task.y[ts.split.train[pool_pos]]
        res = finetune_task(ts, pool_pos, y, finetune_config(cfg, method, seed))
        rows.append({"task": name, "seed": seed, "n": n, "method": method, "test": res.test, "val": res.val,
                     "train": res.train, "best_step": res.best_step, "stop_step": res.stop_step,
                     "stopped": res.stopped, "seconds": round(res.seconds, 2)})
        if seed == cfg.seeds[0]:  # the curves of one seed are enough to look at, and keep results.json small
            rows[-1]["curve"] = _compact(res.history)
        bar.set_postfix_str(f"{name} n={n} {method}: test nerr {res.test['nerr']:.3f}")
        if seed == cfg.seeds[0] and n == cfg.tv_size and method == "full":
            keep[name] = (res.theta, pool_pos)
        run.results["curves"] = rows
        run.save()
    if skipped:
        run.note(f"time budget: {skipped} learning-curve runs skipped (of {len(cells)}); see config.budget_min")
    return keep


def _spearman(a, b) -> dict | None:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return None
    r = spearmanr(a[ok], b[ok])
    return {"rho": float(r.statistic), "p": float(r.pvalue), "n_tasks": int(ok.sum())}


def phase_efficiency(run: Run) -> None:
    """AULC and learning-curve slopes per task and method; rank correlation of beta with them."""
    cfg, rows = run.cfg, run.results.get("curves", [])
    kern = run.results.get("kernels", {})
    rec: dict = {"per_task": {}, "correlation": {}}
    for method in cfg.methods:
        per = {}
        for name in cfg.tasks:
            by_n = {}
            for r in rows:
                if r["task"] == name and r["method"] == method:
                    by_n.setdefault(r["n"], []).append(r["test"]["nerr"])
            if by_n:
                per[name] = {n: float(np.mean(v)) for n, v in sorted(by_n.items())}
        common = sorted(set.intersection(*(set(v) for v in per.values()))) if per else []
        for name, curve in per.items():
            e = rec["per_task"].setdefault(name, {})
            vals = np.array([curve[n] for n in common])
            slope = None
            if len(common) >= 2 and np.all(vals > 0):
                slope = float(np.polyfit(np.log(common), np.log(vals), 1)[0])
            beta = (kern.get(name) or {}).get("beta_mean")
            e[method] = {"nerr_by_n": curve, "aulc": float(vals.mean()) if len(common) else None, "slope": slope,
                         "sizes": common, "predicted_slope": -beta / (beta + 1) if beta else None}
        names = [t for t in cfg.tasks if t in per and (kern.get(t) or {}).get("beta_mean") is not None]
        betas = [kern[t]["beta_mean"] for t in names]
        groups = {"all": names}
        for kind in KINDS:
            groups[kind] = [t for t in names if run.results["tasks"][t]["kind"] == kind]
        corr = {}
        for g, members in groups.items():
            sel = [names.index(t) for t in members]
            corr[g] = {
                "tasks": members,
                "beta_vs_aulc": _spearman([betas[i] for i in sel],
                                          [rec["per_task"][names[i]][method]["aulc"] for i in sel]),
                "beta_vs_slope": _spearman([betas[i] for i in sel],
                                           [rec["per_task"][names[i]][method]["slope"] for i in sel]),
            }
        rec["correlation"][method] = corr
    run.results["efficiency"] = rec
    run.save()
