"""The last phase of a paper run (paper.py): task vectors of full and of linearized (tangent) fine-tuning, their
cosines, addition and negation, and the weight-disentanglement error xi (Ilharco et al.; Ortiz-Jimenez et al.)."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from .finetune import Targets, metrics, predict, reset_head
from .linearize import functional, linearize
from .paper_config import PaperConfig
from .paper_phases import TaskSetup, finetune_config, finetune_task
from .paper_results import Run
from .task_vectors import (
    add,
    choose_coef,
    combine,
    cosine_matrix,
    disagreement,
    disentanglement_error,
    negate,
    norm,
    squared,
    task_vector,
)


class _TaskFns:
    """For the task vectors: how to evaluate body parameters on one task (its own head, its data)."""

    def __init__(self, ts: TaskSetup, theta_ft: dict, fn, theta_pre: dict, targets, cfg: PaperConfig):
        self.ts, self.fn, self.targets, self.cfg = ts, fn, targets, cfg
        self.body_pre = theta_pre
        self.tau = task_vector(theta_ft, theta_pre)
        self.body_ft = combine(self.body_pre, [self.tau], [1.0])
        self._ft_score: dict = {}

    def outputs(self, body: dict, X: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(predict(self.fn, body, X))

    def score(self, body: dict, split: str) -> float:
        """1 - nerr on the validation or test set (1: perfect, 0: the trivial predictor)."""
        t, sp = self.ts.task, self.ts.split
        f = self.outputs(body, self.ts.X[split]).numpy()
        y = t.y[getattr(sp, split)]
        return 1.0 - metrics(self.targets.label_units(f, t.kind), y, t.kind, self.targets.trivial)["nerr"]

    def metrics(self, body: dict, split: str = "test") -> dict:
        t, sp = self.ts.task, self.ts.split
        f = self.outputs(body, self.ts.X[split]).numpy()
        return metrics(self.targets.label_units(f, t.kind), t.y[getattr(sp, split)], t.kind, self.targets.trivial)

    def normalized(self, body: dict, split: str) -> float:
        """score / the fine-tuned model's score (NaN unless fine-tuning beat the trivial predictor by 5%)."""
        if split not in self._ft_score:
            self._ft_score[split] = self.score(self.body_ft, split)
        ft = self._ft_score[split]
        return self.score(body, split) / ft if ft > 0.05 else float("nan")


def _vector_models(run: Run, tasks: dict[str, TaskSetup], keep: dict, variant: str) -> dict[str, _TaskFns]:
    """Per task: its fine-tuned parameters and an evaluator of body parameters on it.

    Label-word tasks have no task-specific parameter: full reuses the learning-curve run at tv_size, seed 0.
    Tasks with a scalar head are fine-tuned again with the head frozen at its seed-0 initialisation (as Ilharco et
    al. freeze zero-shot heads), so that tau holds their whole adaptation. tangent: linearized fine-tuning on the
    same training set, heads frozen likewise; theta_pre is then the linearization point."""
    cfg, out = run.cfg, {}
    seed = cfg.seeds[0]
    for name, (theta_full, pool_pos) in keep.items():
        ts = tasks[name]
        if variant == "tangent" and run.left() < 0:
            run.note(f"time budget: no tangent fine-tuning for {name}")
            continue
        has_head = ts.model.model.head is not None
        if variant == "full" and not has_head:
            theta_ft, targets = theta_full, Targets.of(ts.task.y[ts.split.train[pool_pos]], ts.task.kind)
        else:
            n = cfg.tv_size
            pos = ts.split.train_positions(n, seed)
            fc = replace(finetune_config(cfg, variant, seed), freeze_head=True)
            res = finetune_task(ts, pos, ts.task.y[ts.split.train[pos]], fc)
            theta_ft, targets = res.theta, res.targets
            run.results.setdefault("vector_runs", {}).setdefault(variant, {})[name] = {
                "n": int(n), "frozen_head": has_head, "test": res.test, "best_step": res.best_step,
                "stop_step": res.stop_step, "seconds": round(res.seconds, 2)}
        if has_head:  # the frozen head of those runs; finetune re-draws it per seed
            reset_head(ts.model.model, seed)
            ts.model.model.head.requires_grad_(False)
        try:
            fn, theta_pre = (functional if variant == "full" else linearize)(ts.model)
        finally:
            if has_head:
                ts.model.model.head.requires_grad_(True)
        out[name] = _TaskFns(ts, theta_ft, fn, theta_pre, targets, cfg)
    return out


def _addition(fns: dict[str, _TaskFns], pre: dict, members: list[str], grid) -> dict:
    """theta_pre + lambda sum tau over `members`, lambda maximising their mean validation score (1 - nerr)."""
    taus = [fns[m].tau for m in members]

    def val_score(lam: float) -> float:
        body = add(pre, taus, lam)
        return float(np.mean([fns[m].score(body, "val") for m in members]))

    lam, scores = choose_coef(val_score, grid)
    body = add(pre, taus, lam)
    return {"tasks": members, "lambda": lam, "val_scores": scores,
            "normalized_test": {m: fns[m].normalized(body, "test") for m in members},
            "test": {m: fns[m].metrics(body) for m in members}}


def _negation(fns: dict[str, _TaskFns], pre: dict, target: str) -> dict:
    """theta_pre - lambda tau_target: the largest lambda in (0.25 .. 1) keeping the other tasks' mean validation
    score within 5% of theta_pre's (Ilharco et al.'s criterion); scores 1 - nerr of target and controls on test."""
    others = [m for m in fns if m != target]

    def control(lam: float, split: str = "val") -> float:
        body = negate(pre, fns[target].tau, lam)
        return float(np.mean([fns[m].score(body, split) for m in others]))

    base = control(0.0)
    ok = [lam for lam in (0.25, 0.5, 0.75, 1.0) if control(lam) >= base - 0.05 * abs(base)]
    lam = max(ok) if ok else 0.0
    body = negate(pre, fns[target].tau, lam)
    full = negate(pre, fns[target].tau, 1.0)
    return {"lambda": lam, "target_test": fns[target].metrics(body), "target_score": fns[target].score(body, "test"),
            "target_score_pre": fns[target].score(pre, "test"), "control_score": control(lam, "test"),
            "control_score_pre": control(0.0, "test"), "target_score_at_1": fns[target].score(full, "test"),
            "control_score_at_1": control(1.0, "test")}


def phase_vectors(run: Run, tasks: dict[str, TaskSetup], keep: dict) -> None:
    """Task vectors of full fine-tuning (and of tangent fine-tuning): cosines, addition, negation, xi."""
    cfg = run.cfg
    rec: dict = {}
    for variant in ["full"] + (["tangent"] if cfg.tangent else []):
        if variant == "tangent" and run.left() < 0.1 * (cfg.budget_min or 0) * 60:
            run.note("time budget: tangent fine-tuning for the task vectors skipped")
            continue
        t = time.perf_counter()
        fns = _vector_models(run, tasks, keep, variant)
        names = list(fns)
        if len(names) < 2:
            run.note(f"task vectors need two tasks with a fine-tuned model; have {names}")
            break
        pre = fns[names[0]].body_pre
        v: dict = {"tasks": names, "norms": {n: norm(fns[n].tau) for n in names},
                   "cosine": cosine_matrix([fns[n].tau for n in names]),
                   "single": {n: {"finetuned": fns[n].metrics(fns[n].body_ft), "pretrained": fns[n].metrics(pre)}
                              for n in names}}
        v["addition_all"] = _addition(fns, pre, names, cfg.tv_grid)
        v["addition_pairs"] = [_addition(fns, pre, [a, b], cfg.tv_grid) for i, a in enumerate(names)
                               for b in names[i + 1:]]
        v["negation"] = {n: _negation(fns, pre, n) for n in names}
        v["xi"] = _xi(fns, names, pre, cfg)
        v["seconds"] = round(time.perf_counter() - t, 1)
        rec[variant] = v
        run.results["vectors"] = rec
        run.save()


def _xi(fns: dict[str, _TaskFns], names: list[str], pre: dict, cfg: PaperConfig) -> dict:
    """Weight disentanglement error per pair at (1, 1), and over the xi_alphas grid for the first pair.
    dist: squared difference of standardized outputs (regression), sign disagreement (classification)."""

    def parts(n):
        ts = fns[n].ts
        X = ts.X["test"][: cfg.xi_samples]
        dist = squared if ts.task.kind == "regression" else disagreement
        return (lambda body, X_: fns[n].outputs(body, X_)), X, dist

    pairs, grid = {}, None
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (fa, Xa, da), (fb, Xb, db) = parts(a), parts(b)
            args = ((fa, fb), pre, (fns[a].tau, fns[b].tau))
            pairs[f"{a}|{b}"] = disentanglement_error(*args, (1.0, 1.0), (Xa, Xb), (da, db))
            if grid is None:
                grid = {"pair": [a, b], "alphas": list(cfg.xi_alphas),
                        "xi": [[disentanglement_error(*args, (a1, a2), (Xa, Xb), (da, db)) for a2 in cfg.xi_alphas]
                               for a1 in cfg.xi_alphas]}
    return {"pairs_at_1_1": pairs, "grid": grid}
