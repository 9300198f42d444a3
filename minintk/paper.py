"""The paper's experiments (Sun & Raskutti, section 7) end to end, for one model and a list of tasks.

1. kernels     the empirical NTK Gram (minintk.engine) of the task model on 100 training inputs per task (several
               draws), its eigen-decay beta (spectrum.fit_power_law): the paper's section 7.1 and appendix A.3.
   planted     targets planted in the task model's own eNTK RKHS (planted_check): the stopping rule against the
               oracle, the error's rate against n^(-beta/(beta+1)), the network against its linearization.
2. curves      fine-tuning with hold-out early stopping (finetune) at training sizes n and seeds: test error
               against n (Figure 2; F1 in Figure 10), for full fine-tuning and a linear probe.
3. efficiency  sample efficiency per task: AULC, the mean over the sizes of nerr (test error relative to the
               trivial predictor); the theory predicts that a larger beta gives a smaller AULC, i.e. a negative
               Spearman correlation between beta and AULC (section 6.1). The learning-curve slope of log nerr on
               log n is reported beside the predicted rate exponent -beta / (beta + 1).
4. vectors     task vectors of the full fine-tuning runs at one size (seed 0): cosine similarities (Figure 3),
               addition with lambda chosen on validation, negation, and the weight-disentanglement error xi for
               full and linearized (tangent) fine-tuning.
Everything is seeded; results.json is rewritten after every unit of work, so a run cut short keeps its results.
Offline the model is a small GPT-Neo-architecture decoder pretrained on the King James Bible (data.py), cached
under ~/.cache/minintk (or $MININTK_CACHE) so that repeat runs skip it; --model takes a GPT-Neo folder instead.

This file runs the phases in order; the settings are in paper_config.py, the model and its cache in
paper_model.py, phases 1-3 in paper_phases.py, phase 4 in paper_vectors.py, results.json in paper_results.py, and
the report drawn from it in paper_report.py.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from .paper_config import PaperConfig, PaperError
from .paper_model import build_model
from .paper_phases import phase_curves, phase_efficiency, phase_kernels, setup_tasks
from .paper_planted import phase_planted
from .paper_results import Run
from .paper_vectors import phase_vectors


def _threads(requested: int) -> int:
    """CPU threads for torch: `requested`, or if 0 the idle cores (at least 1)."""
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    # OpenMP threads that share busy cores stall each other (2 threads on a loaded 2-core machine ran 3-8x slower
    # than 1 in our measurements): use the cores that are idle.
    return max(1, min(cores, int(cores - load + 0.5)))


def run(cfg: PaperConfig, out: str | os.PathLike, render: bool = True) -> dict:
    """Run every phase, writing out/results.json as it goes and the report (report.md, figures) at the end."""
    out = Path(out)
    try:
        import scipy  # noqa: F401  (the power-law fit and the rank correlations)
    except ImportError as e:
        raise PaperError("minintk paper needs scipy (pip install scipy)") from e
    r = Run(cfg, out)
    threads = _threads(cfg.threads)
    torch.set_num_threads(threads)
    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    r.results["environment"] = {
        "torch": torch.__version__, "python": platform.python_version(), "device": cfg.device,
        "device_name": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else platform.processor() or
        platform.machine(), "cpu_count": os.cpu_count(), "threads": threads,
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    print(f"minintk paper: preset {cfg.preset}, {len(cfg.tasks)} tasks, device {cfg.device}, {threads} threads, "
          f"writing {out}")

    t = time.perf_counter()
    base, tok, mrec = build_model(r)
    mrec["describe"] = base.describe()
    r.results["model"] = mrec
    tasks = setup_tasks(r, base, tok)
    r.phase("setup", t)

    print("NTK Gram and eigen-decay per task")
    t = time.perf_counter()
    phase_kernels(r, tasks, tok)
    r.phase("kernels", t)

    if cfg.planted:
        print("planted tasks: the stopping rule and the rates where the answer is known")
        t = time.perf_counter()
        phase_planted(r, tasks)
        r.phase("planted", t)

    print("learning curves with hold-out early stopping")
    t = time.perf_counter()
    keep = phase_curves(r, tasks)
    phase_efficiency(r)
    r.phase("curves", t)

    print("task vectors")
    t = time.perf_counter()
    phase_vectors(r, tasks, keep)
    r.phase("vectors", t)
    r.results["finished"] = True
    r.save()
    if render:
        from .paper_report import render as render_report

        render_report(out)
    return r.results
