"""`minintk agree`: the agreement report (agreement.py) on the paper's offline classification tasks, over the
paper pipeline's pretrained decoder and its task models (paper_model, paper_phases), into a report folder."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .agreement import AgreeConfig, AgreementError, markdown, plot, run_one, summarize
from .paper_results import jsonable


def run(out: Path, cfg: AgreeConfig, *, preset: str = "quick", tasks=("vader-sign", "afinn-sign"),
        device: str = "cpu", data_dir: str | None = None, cache_dir: str | None = None, model: str | None = None,
        pretrain_steps: int | None = None) -> dict:
    """Every (task, seed) row into out/results.json, report.md and agreement.png; returns the summary."""
    from .data import DataError, task_kind
    from .paper_config import config
    from .paper_model import build_model
    from .paper_phases import setup_tasks
    from .paper_results import Run

    t0 = time.perf_counter()
    regression = [t for t in tasks if task_kind(t) != "classification"]
    if regression:
        raise DataError(f"minintk agree compares classifiers: {regression} are regression tasks; use classification "
                        "tasks such as vader-sign, vader-agreed-sign, afinn-sign")
    pc = config(preset, tasks=tuple(tasks), device=device, data_dir=data_dir, cache_dir=cache_dir, planted=False,
                model=model, pretrain_steps=pretrain_steps)
    r = Run(pc, out)
    base, tok, rec = build_model(r)
    rows = [row for name, ts in setup_tasks(r, base, tok).items() for row in _task_rows(name, ts, cfg, device)]
    summary = summarize(rows)
    setup = (f"Model: the paper pipeline's `{preset}` decoder ({rec.get('source', 'pretrained here')}; "
             f"{sum(p.numel() for p in base.parameters()):,} parameters), fp64, on the offline tasks {list(tasks)} "
             f"(label words, +-1 targets, squared loss); {time.perf_counter() - t0:.0f} s on {device}.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(jsonable({"config": asdict(cfg), "preset": preset,
                                                           "rows": rows, "summary": summary}), indent=1))
    plot(summary, out / "agreement.png")
    (out / "report.md").write_text(markdown(rows, summary, cfg, setup))
    return summary


def _task_rows(name: str, ts, cfg: AgreeConfig, device: str) -> list[dict]:
    """run_one for each seed on one classification task (paper_phases.TaskSetup): fp64 copy of its task model,
    training sets drawn from its pool, the first n_test test inputs, classes as +-1."""
    from .engine import ntk
    from .finetune import unpack

    model = copy.deepcopy(ts.model).double().eval()

    def gram(A, B, kernel):
        K = ntk(model.model, unpack(A), None if B is None else unpack(B), precision="fp64", kernel=kernel,
                progress=False)
        return K.cpu().numpy()

    pool, test = ts.X["pool"].to(device), ts.X["test"][: cfg.n_test].to(device)
    if pool.shape[0] < cfg.n_train:
        raise AgreementError(f"n_train={cfg.n_train}: {name}'s training pool holds {pool.shape[0]} inputs")
    y_pool = 2.0 * ts.task.y[ts.split.train] - 1.0
    y_test = 2.0 * ts.task.y[ts.split.test][: cfg.n_test] - 1.0
    rows = []
    for seed in range(cfg.seeds):
        idx = np.random.default_rng(seed).choice(pool.shape[0], cfg.n_train, replace=False)
        row = run_one(model, gram, pool[idx], y_pool[idx], test, y_test, cfg, seed)
        rows.append(dict(task=name, **row))
        print(f"  {name} seed {seed}: accuracy GD net {row['acc']['sgd_net']:.2f} / its kernel "
              f"{row['acc']['sgd_kernel']:.2f}, Adam net {row['acc']['adam_net']:.2f} / SignGD kernel "
              f"{row['acc']['signgd_ridge']:.2f}", flush=True)
    return rows


def add_parser(add) -> None:
    ag = add("agree", help="does fine-tuning behave like its kernel? GD and Adam fine-tuning against eNTK and "
             "SignGD-kernel predictors on the offline classification tasks (markdown + JSON + PNG)")
    ag.add_argument("--preset", default="quick", help="the paper preset whose pretrained decoder is used: quick (a "
                    "235k-parameter decoder, seconds), default (1.3M parameters, the committed CPU report), gpu "
                    "(with --model random:125M --device cuda)")
    ag.add_argument("--tasks", nargs="+", default=["vader-sign", "afinn-sign"], help="classification tasks")
    for name, kind, default, what in (
            ("n-train", int, 64, "training inputs per seed (>= 4)"), ("n-test", int, 100, "test inputs"),
            ("steps", int, 200, "optimizer steps of both fine-tunings"), ("seeds", int, 3, "training-set draws"),
            ("adam-lr", float, 1e-4, "Adam's learning rate"), ("ridge", float, 1e-3, "lam of the kernel regressions")):
        ag.add_argument(f"--{name}", type=kind, default=default, help=f"{what} (default {default})")
    ag.add_argument("--force", action="store_true", help="replace the report already in --out")
    ag.add_argument("--device", default="cpu")
    ag.add_argument("--model", default=None, help="as minintk paper --model (e.g. random:125M, a checkpoint)")
    ag.add_argument("--pretrain-steps", type=int, default=None, help="as minintk paper --pretrain-steps")
    ag.add_argument("--data-dir", default=None)
    ag.add_argument("--cache-dir", default=None)
    ag.add_argument("--out", default=None, help="report folder (default reports/agreement-<preset>)")
    ag.set_defaults(func=_cmd)


def _cmd(args) -> int:
    from .cli_reports import report_dir

    cfg = AgreeConfig(n_train=args.n_train, n_test=args.n_test, steps=args.steps, seeds=args.seeds,
                      adam_lr=args.adam_lr, ridge=args.ridge)
    out = report_dir(args.out, Path("reports") / f"agreement-{args.preset}", "results.json", args.force)
    torch.manual_seed(0)
    summary = run(out, cfg, preset=args.preset, tasks=args.tasks, device=args.device, data_dir=args.data_dir,
                  cache_dir=args.cache_dir, model=args.model, pretrain_steps=args.pretrain_steps)
    for t, s in summary.items():
        print(f"minintk agree: {t}: corr(GD net, its eNTK predictor) {s['corr.sgd_net_vs_kernel'][0]:.2f}, "
              f"corr(Adam net, SignGD-kernel regression) {s['corr.adam_net_vs_signgd_ridge'][0]:.2f}")
    print(f"minintk agree: wrote {out / 'report.md'}")
    return 0
