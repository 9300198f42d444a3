"""`minintk width-scan` and `minintk paper`: the experiments, each run into a report folder that a rerun resumes
(width scan) or that is never written over (paper)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from .cli_reports import report_dir


def add_parsers(add: Callable[..., argparse.ArgumentParser]) -> None:
    """`minintk width-scan` and `minintk paper`; add(name, help=...) makes a subcommand's parser."""
    from .agreement_run import add_parser as add_agree

    _add_width_scan(add)
    _add_paper(add)
    add_agree(add)


def _add_width_scan(add: Callable[..., argparse.ArgumentParser]) -> None:
    ws = add("width-scan", help="NTK theory vs width: kernel spread and drift, weight movement, "
             "linearization error, fitted log-log slopes (JSON + PNG + markdown, resumable)")
    ws.add_argument("--preset", default="cpu", help="cpu (widths 32..512, a few minutes) | gpu (CUDA, widths "
                    "256..4096 within a time budget)")
    ws.add_argument("--widths", type=int, nargs="+", default=None, help="embedding widths d (multiples of n_head)")
    ws.add_argument("--seeds", type=int, default=None, help="seeds per width (>= 2)")
    ws.add_argument("--parameterization", nargs="+", default=["ntk", "standard"], help="ntk | standard")
    ws.add_argument("--attn-scale", nargs="+", default=["1/d", "1/sqrt(d)"], help="1/d | 1/sqrt(d)")
    ws.add_argument("--start", nargs="+", default=["random", "pretrained", "linear_head"],
                    help="random | pretrained (on a different teacher) | linear_head (pretrained, fresh head)")
    ws.add_argument("--product", action="store_true", help="every combination of the variant lists (default: "
                    "one factor at a time around the first value of each)")
    ws.add_argument("--data", default=None, help="task file instead of the teacher: .npz / .safetensors with X (n, T) "
                    "token ids, y (n,) targets [, X_test, y_test]")
    ws.add_argument("--lr", type=float, default=None, help="step eta per gradient-descent step (standard: eta / d)")
    ws.add_argument("--times", type=float, nargs="+", default=None, help="checkpoints in eta t (multiples of lr)")
    ws.add_argument("--pretrain-time", type=float, default=None, help="eta t of pretraining on the source task")
    ws.add_argument("--n-layer", type=int, default=None, help="decoder blocks")
    ws.add_argument("--n-train", type=int, default=None, help="training sequences of the teacher task")
    ws.add_argument("--n-test", type=int, default=None, help="held-out sequences of the teacher task")
    ws.add_argument("--device", default=None, help="cpu | cuda (default: the preset's)")
    ws.add_argument("--budget", type=float, default=None, help="seconds: start no width that would end past it")
    ws.add_argument("--out", default=None, help="report folder (default reports/width-scan-<preset>); rerunning "
                    "into it resumes")
    ws.add_argument("--no-progress", action="store_true", help="no progress bar")
    ws.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared machine, "
                    "threads waiting on each other cost ~10x on these small matrices; raise it on a free multicore)")
    ws.set_defaults(func=_cmd_width_scan)


def _add_paper(add: Callable[..., argparse.ArgumentParser]) -> None:
    pp = add("paper", help="the paper's section 7 end to end: NTK eigen-decay per task, learning curves "
             "with early stopping, beta vs sample efficiency, task vectors (markdown + JSON + PNG)")
    pp.add_argument("--preset", default=None, help="quick (CPU, ~3 min) | default (CPU, < 30 min) | gpu "
                    "(default: gpu with --device cuda, else default)")
    pp.add_argument("--quick", action="store_const", const="quick", dest="preset", help="same as --preset quick")
    pp.add_argument("--model", default=None, help="GPT-Neo checkpoint (folder, weight file, cache snapshot or hub "
                    "id), or random:125M (GPT-Neo's init); default: a small decoder pretrained here on the packaged "
                    "King James Bible (cached)")
    pp.add_argument("--tokenizer", default="model", choices=("model", "fallback"),
                    help="model: the checkpoint's own tokenizer (an error if it has none); fallback: a BPE trained "
                    "on the corpus (for checkpoints without one; random: models always use it)")
    pp.add_argument("--device", default="cpu", help="cpu | cuda")
    pp.add_argument("--tasks", nargs="+", default=None, help="offline: vader vader-agreed afinn vader-sign "
                    "vader-agreed-sign afinn-sign; online (datasets): stsb sts12 semrel rte mrpc cr amazon")
    pp.add_argument("--sizes", type=int, nargs="+", default=None, help="training sizes of the learning curves")
    pp.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the learning curves")
    pp.add_argument("--tv-size", type=int, default=None, help="training size of the task-vector models (one of "
                    "--sizes)")
    pp.add_argument("--pretrain-steps", type=int, default=None, help="LM pretraining steps on the packaged text "
                    "(default: the preset's for the small decoder, 0 for --model)")
    pp.add_argument("--kernel-samples", type=int, default=None, help="inputs per task in the NTK Gram (paper: 100)")
    pp.add_argument("--kernel-draws", type=int, default=None, help="independent draws of those inputs")
    pp.add_argument("--no-tangent", action="store_true", help="skip linearized fine-tuning in the task vectors")
    pp.add_argument("--no-planted", action="store_true", help="skip the planted tasks (the theory's predictions "
                    "on targets planted in the task model's eNTK RKHS)")
    pp.add_argument("--budget-min", type=float, default=None, help="minutes: skip remaining learning-curve runs "
                    "when past 3/4 of it (0: no budget)")
    pp.add_argument("--threads", type=int, default=None, help="CPU threads (default: the idle cores)")
    pp.add_argument("--data-dir", default=None, help="folder with vader_lexicon.txt, AFINN-en-165.txt, kjv.jsonl "
                    "(default: $MININTK_DATA, else the installed packages)")
    pp.add_argument("--cache-dir", default=None, help="cache of pretrained models (default ~/.cache/minintk)")
    pp.add_argument("--out", default=None, help="report folder (default reports/paper-<preset>, numbered -2, -3, ... "
                    "if that holds a report)")
    pp.add_argument("--force", action="store_true", help="replace the report already in --out")
    pp.add_argument("--export-data", default=None, metavar="DIR", help="copy the offline data files into DIR "
                    "(for --data-dir on a machine without the packages) and exit")
    pp.add_argument("--render", default=None, metavar="DIR", help="re-render report.md and figures of DIR from its "
                    "results.json and exit")
    pp.set_defaults(func=_cmd_paper)


def _cmd_width_scan(args: argparse.Namespace) -> int:
    import torch

    from .width import run_scan
    from .width_config import WidthScanError, preset, star
    from .width_report import slope_table

    if args.threads < 1:
        raise WidthScanError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    variants = star(args.parameterization, args.attn_scale, args.start, product=args.product)
    cfg = preset(args.preset, widths=args.widths and tuple(args.widths), seeds=args.seeds, variants=variants,
                 data=args.data, lr=args.lr, times=args.times and tuple(args.times),
                 pretrain_time=args.pretrain_time, n_layer=args.n_layer, n_train=args.n_train,
                 n_test=args.n_test, device=args.device, budget_s=args.budget)
    out = Path(args.out) if args.out else Path("reports") / f"width-scan-{args.preset}"
    summary = run_scan(cfg, out, progress=not args.no_progress)
    print(f"minintk width-scan ({args.preset}): slopes of log(metric) vs log(width), {cfg.level:.0%} intervals")
    print(slope_table(summary))
    if summary["failed"]:
        print(f"  {len(summary['failed'])} failed runs: see summary.md")
    if summary["stopped"]:
        print(f"  stopped early: {summary['stopped']}")
    print(f"  wrote {out / 'summary.md'}, summary.json, runs.json and PNGs")
    return 0


def _cmd_paper(args: argparse.Namespace) -> int:
    from .data import export_offline_data
    from .paper import run
    from .paper_config import config
    from .paper_report import headline, render

    if args.export_data:
        print(f"minintk paper: offline data copied to {export_offline_data(args.export_data)}")
        return 0
    if args.render:
        print(f"minintk paper: wrote {render(args.render)}")
        return 0
    preset = args.preset or ("gpu" if args.device.startswith("cuda") else "default")
    pretrain = args.pretrain_steps
    if pretrain is None and args.model is not None:
        pretrain = 0
    budget = None if args.budget_min is None else (None if args.budget_min <= 0 else args.budget_min)
    cfg = config(preset, model=args.model, tokenizer=args.tokenizer, device=args.device,
                 tasks=args.tasks and tuple(args.tasks), sizes=args.sizes and tuple(args.sizes),
                 seeds=args.seeds and tuple(args.seeds),
                 tv_size=args.tv_size, pretrain_steps=pretrain, kernel_samples=args.kernel_samples,
                 kernel_draws=args.kernel_draws, tangent=False if args.no_tangent else None,
                 planted=False if args.no_planted else None,
                 threads=args.threads, data_dir=args.data_dir, cache_dir=args.cache_dir)
    if args.budget_min is not None:
        cfg.budget_min = budget
    out = report_dir(args.out, Path("reports") / f"paper-{preset}", "results.json", args.force)
    results = run(cfg, out)
    h = headline(results)
    print(f"minintk paper ({preset}): finished in {results['elapsed_s']:.0f} s; report: {out / 'report.md'}")
    print("  eigen-decay beta: " + ", ".join(f"{t} {b:.3f}" for t, b in h["beta"].items() if b is not None))
    rho = h["spearman_beta_vs_aulc"]
    print("  Spearman(beta, AULC), full fine-tuning (theory: negative): "
          + ", ".join(f"{g} {r:+.2f}" for g, r in rho.items() if r is not None))
    if "planted_claims_held" in h:
        print(f"  planted tasks: {h['planted_claims_held']} claims of the theory held (report: Planted tasks)")
    for k in ("full", "tangent"):
        if f"{k}_addition_all" in h:
            a = h[f"{k}_addition_all"]
            score, xi = a["mean_normalized_test"], h[f"{k}_xi_mean_at_1_1"]
            print(f"  task addition ({k}): lambda {a['lambda']}, mean normalized test score "
                  f"{'n/a' if score is None else f'{score:.3f}'}; mean xi(1,1) {'n/a' if xi is None else f'{xi:.3f}'}")
    return 0
