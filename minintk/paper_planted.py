"""The planted-task phase of a paper run (paper.py): the theory checked where its answer is known, on the first
task's training inputs and its task model at theta_0 (planted_check; docs/theory.md section 8)."""

from __future__ import annotations

import copy
import time

from .engine import ntk
from .finetune import unpack
from .paper_phases import TaskSetup
from .paper_results import Run
from .planted_check import CheckConfig, run_check


def phase_planted(run: Run, tasks: dict[str, TaskSetup]) -> None:
    """results["planted"]: run_check's rows on the first task whose training pool is large enough (noted and
    skipped when none is), with the task name and the seconds it took."""
    cfg = CheckConfig(**run.cfg.planted_check)
    name = next((t for t, ts in tasks.items() if ts.X["pool"].shape[0] >= cfg.pool), None)
    if name is None:
        run.note(f"planted tasks skipped: no task has {cfg.pool} training inputs")
        return
    t = time.perf_counter()
    ts = tasks[name]
    body = copy.deepcopy(ts.model.model).double()  # the Gram reads ids and mask apart, not packed
    pool = ts.X["pool"][: cfg.pool].to(next(body.parameters()).device)
    K = ntk(body, unpack(pool), precision="fp64", progress=False)
    res = run_check(ts.model, pool, cfg, K=K, progress=False)
    res.update(task=name, seconds=round(time.perf_counter() - t, 1))
    run.results["planted"] = res
    run.save()
