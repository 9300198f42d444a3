"""The `minintk` command line: parse, call the library, write the report. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, unless it is None/False or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minintk", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser

    def parser(name: str, **kw) -> argparse.ArgumentParser:  # every subcommand: --debug, defaults in --help
        return add(name, parents=[common], formatter_class=_Help, **kw)

    sub.add_parser = parser
    info = sub.add_parser("info", help="architecture, parameter counts per group, attention scaling")
    info.add_argument("source", help="GPT-Neo folder / .safetensors / hub id, or a built-in: tiny, gpt-neo-125M, ...")
    info.add_argument("--attn-scale", default="native", help="native | 1/d | 1/sqrt(d)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=_cmd_info)
    # <subcommands: each adds its parser here and sets `func`>
    gram_help = (
        "saved Gram: .safetensors or .npz holding key 'K' (or a single array), or .npy; (n, n), or the (n, n, C, C) "
        "of minintk.ntk, read as (nC, nC) in (sample, output) order"
    )
    spec = sub.add_parser("spectrum", help="eigenvalues of K/n, power-law decay fit with CI, implied rate (JSON + PNG)")
    spec.add_argument("gram", help=gram_help)
    spec.add_argument("--range", dest="index_range", default=None, metavar="FIRST:LAST",
                      help="1-based inclusive fit range (default: after the top --drop-top, up to the numerical floor)")
    spec.add_argument("--drop-top", type=int, default=3, help="eigenvalues left out at the top of the default range")
    spec.add_argument("--level", type=float, default=0.95, help="confidence level of the beta interval")
    spec.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for a second interval (0: off)")
    spec.add_argument("--sigma", type=float, default=None, help="noise level: print (sigma^2/n)^(beta/(beta+1))")
    spec.add_argument("--out", default=None, help="report folder (default reports/<gram folder>-<gram name>-spectrum, "
                      "numbered -2, -3, ... if that holds a report)")
    spec.add_argument("--force", action="store_true", help="replace the report already in --out")
    spec.set_defaults(func=_cmd_spectrum)
    stop = sub.add_parser("stop", help="Raskutti-Wainwright-Yu stopping time, critical radius and bound (JSON + PNG)")
    stop.add_argument("gram", help=gram_help)
    stop.add_argument("--y", required=True, help="targets: .npy, .npz / .safetensors (key 'y' or a single array), .txt")
    stop.add_argument("--sigma", required=True,
                      help="noise level of y, or 'auto' to estimate it (GCV kernel ridge, stopping.estimate_sigma)")
    stop.add_argument("--alpha", type=float, default=None,
                      help="constant gradient-descent step on (1/2n)||f - y||^2 (eta_t = alpha t); default "
                      "min(1, 1/mu_1), mu_1 the top eigenvalue of K/n, which is stable (alpha < 2/mu_1)")
    stop.add_argument("--B", type=float, default=1.0, help="bound on ||f*||_H in y's units (the rule runs on y / B)")
    stop.add_argument("--out", default=None, help="report folder (default reports/<gram folder>-<gram name>-stop, "
                      "numbered -2, -3, ... if that holds a report)")
    stop.add_argument("--force", action="store_true", help="replace the report already in --out")
    stop.set_defaults(func=_cmd_stop)
    tiles = sub.add_parser("ntk", help="NTK Gram into a folder of tiles: resumable, one GPU, CPU or under torchrun")
    tiles.add_argument("model", nargs="?", help="GPT-Neo folder / .safetensors / hub id, or a built-in with random "
                       "weights: tiny, gpt-neo-125M, gpt-neo-1.3B, gpt-neo-2.7B")
    tiles.add_argument("data", nargs="?", help="token ids (n, T): .npy, .pt or .safetensors ('input_ids' [+ "
                       "'attention_mask']), or random:N:T[:vocab][:seed]; or give --text")
    tiles.add_argument("--text", help="text examples instead of DATA: one per line, or .jsonl with a 'text' field, "
                       "tokenized by the model folder's tokenizer and padded with an attention mask")
    tiles.add_argument("--tokenizer", help="tokenizer folder for --text and word labels (default: the model "
                       "folder's); 'fallback' trains a byte-level BPE on the texts (random-weight models)")
    tiles.add_argument("--out", help="result folder: manifest.json, tiles/, gram.safetensors when complete")
    tiles.add_argument("--labels", help="output f: logits of these label words or token ids at each sample's last "
                       "token, e.g. ' negative, positive' (one token each) or 352,2089")
    tiles.add_argument("--diff", action="store_true", help="f = logit[labels[1]] - logit[labels[0]] (n,)")
    tiles.add_argument("--tile", type=int, default=256, help="samples per tile side")
    tiles.add_argument("--precision", default="fp32", help="fp64 | fp32 | tf32 | bf16")
    tiles.add_argument("--device", default=None, help="cuda (one GPU per rank under torchrun) or cpu; default cuda "
                       "if available")
    tiles.add_argument("--max-memory", default=None, help="bytes for one tile's working set, e.g. 40GiB")
    tiles.add_argument("--params", default=None, help="comma-separated glob patterns of the parameters (default all)")
    tiles.add_argument("--seed", type=int, default=0, help="seed of a built-in model's random weights")
    tiles.add_argument("--overwrite", action="store_true", help="delete the folder's tiles of another run first")
    tiles.add_argument("--status", metavar="OUT", help="report the progress of the folder OUT and exit")
    tiles.set_defaults(func=_cmd_ntk)
    ws = sub.add_parser("width-scan", help="NTK theory vs width: kernel spread and drift, weight movement, "
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
    pp = sub.add_parser("paper", help="the paper's section 7 end to end: NTK eigen-decay per task, learning curves "
                        "with early stopping, beta vs sample efficiency, task vectors (markdown + JSON + PNG)")
    pp.add_argument("--preset", default=None, help="quick (CPU, ~3 min) | default (CPU, < 30 min) | gpu "
                    "(default: gpu with --device cuda, else default)")
    pp.add_argument("--quick", action="store_const", const="quick", dest="preset", help="same as --preset quick")
    pp.add_argument("--model", default=None, help="GPT-Neo folder / .safetensors, or random:125M (GPT-Neo's init); "
                    "default: a small decoder pretrained here on the packaged King James Bible (cached)")
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
    return p


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .config import BUILTIN, gpt_neo_config
    from .gptneo import load_gpt_neo
    from .model import Decoder

    if args.source in BUILTIN:
        scale = {} if args.attn_scale == "native" else {"attn_scale": args.attn_scale}
        with torch.device("meta"):  # architecture only: no memory, no init cost
            model = Decoder(gpt_neo_config(BUILTIN[args.source], **scale))
    else:
        model = load_gpt_neo(args.source, attn_scale=args.attn_scale)
    d = model.describe()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    rows = [(k, v) for k, v in d.items() if k not in ("parameters", "attention_windows", "total_parameters")]
    wins = d["attention_windows"]
    rows.append(("attention", ", ".join("global" if w is None else f"local({w})" for w in wins)))
    for g, c in d["parameters"].items():
        rows.append((f"params[{g}]", f"{c:,}"))
    rows.append(("total_parameters", f"{d['total_parameters']:,}"))
    width = max(len(k) for k, _ in rows)
    print(f"minintk info: {args.source}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0


class GramFileError(ValueError):
    """A Gram or target file that cannot be read: missing, unknown format, no such key."""


def _load_array(path: str, key: str):
    """An array from .safetensors / .npz (`key`, or the only array), .npy or text; torch or numpy, dtype kept."""
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise GramFileError(f"{path}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        arrays = load_file(p)
    elif suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    elif suffix == ".npy":
        return np.load(p, allow_pickle=False)
    elif suffix in (".txt", ".csv", ".tsv"):
        return np.loadtxt(p, delimiter="," if suffix == ".csv" else None, ndmin=1)
    else:
        raise GramFileError(f"{path}: unknown format {suffix!r}; give .safetensors, .npz, .npy (or .txt/.csv for y)")
    if key in arrays:
        return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    raise GramFileError(f"{path}: no array named {key!r}; it holds {sorted(arrays)}")


def _load_gram(path: str):
    """The Gram of a file as a 2-D array: (n, n), or (n, n, C, C) flattened to (nC, nC) in (sample, output) order."""
    K = _load_array(path, "K")
    if K.ndim == 4 and K.shape[0] == K.shape[1] and K.shape[2] == K.shape[3]:
        n, _, C, _ = K.shape
        K = K.permute(0, 2, 1, 3) if hasattr(K, "permute") else K.transpose(0, 2, 1, 3)  # torch or numpy
        K = K.reshape(n * C, n * C)
    if K.ndim != 2:
        raise GramFileError(f"{path}: the Gram must be (n, n) or (n, n, C, C), got shape {tuple(K.shape)}")
    return K


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _report(out: Path, name: str, title: str, rows: list[tuple[str, str]], record: dict) -> None:
    """Print the table, and write it (markdown) with the JSON of every number to out/."""
    text = _table(rows)
    print(title)
    print(text)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))
    (out / f"{name}.md").write_text(f"# {title}\n\n```\n{text}\n```\n")
    print(f"  wrote {out / (name + '.json')}, {out / (name + '.md')}, {out / (name + '.png')}")


class ReportExistsError(ValueError):
    """A report folder already holds another run's report."""


def _report_dir(out: str | None, default: Path, marker: str, force: bool) -> Path:
    """Where a report goes, never over another run's: --out (refused if it holds `marker` unless --force), or
    `default`, numbered -2, -3, ... past folders that already hold a report."""
    if out is not None:
        path = Path(out)
        if (path / marker).exists() and not force:
            raise ReportExistsError(f"{path} already holds a report ({marker}); pass --force to replace it, or "
                                    f"another --out")
    else:
        path, k = default, 1
        while (path / marker).exists() and not force:
            k += 1
            path = default.with_name(f"{default.name}-{k}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _out_dir(args: argparse.Namespace, suffix: str) -> Path:
    """The report folder of spectrum/stop: --out, or reports/<gram's folder>-<gram name>-<suffix>[-k]."""
    gram = Path(args.gram)
    stem = gram.stem if gram.parent.name in ("", ".") else f"{gram.parent.name}-{gram.stem}"
    return _report_dir(args.out, Path("reports") / f"{stem}-{suffix}", f"{suffix}.json", args.force)


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors that mean a bad input or setting (printed as one line), not a bug (a traceback)."""
    from .config import ConfigError
    from .data import DataError
    from .dynamics import DynamicsError
    from .engine import NTKError
    from .finetune import FinetuneError
    from .gptneo import CheckpointError
    from .linearize import LinearizeError
    from .model import ModelInputError
    from .paper_config import PaperError
    from .sources import SourceError
    from .spectrum import SpectrumError
    from .stopping import StoppingError
    from .task_vectors import TaskVectorError
    from .tilefolder import TileRunError
    from .width_config import WidthScanError

    return (GramFileError, ReportExistsError, ConfigError, DataError, TileRunError, DynamicsError, NTKError,
            FinetuneError, CheckpointError, LinearizeError, ModelInputError, PaperError, SourceError, SpectrumError,
            StoppingError, TaskVectorError, WidthScanError, FileNotFoundError, NotADirectoryError,
            IsADirectoryError, PermissionError)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _close_bars() -> None:
    """Clear progress bars still on the terminal, so that an error starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _cmd_spectrum(args: argparse.Namespace) -> int:
    from .spectrum import SpectrumError, eigenvalues, fit_power_law, implied_rate, plot_spectrum

    K = _load_gram(args.gram)
    spec = eigenvalues(K)
    index_range = None
    if args.index_range:
        try:
            first, last = (int(v) for v in args.index_range.split(":"))
        except ValueError:
            raise SpectrumError(f"--range must be FIRST:LAST, 1-based integers; got {args.index_range!r}") from None
        index_range = (first, last)
    if args.sigma is not None and not args.sigma > 0:
        raise SpectrumError(f"--sigma must be positive, got {args.sigma}")
    try:
        fit = fit_power_law(spec.mu, index_range=index_range, floor=spec.floor, drop_top=args.drop_top,
                            level=args.level, bootstrap=args.bootstrap)
        fit_error = None
    except SpectrumError as e:
        if index_range is not None:
            raise
        fit, fit_error = None, str(e)
    n = spec.mu.size
    out = _out_dir(args, "spectrum")
    rows = [("n", str(n)), ("dtype", str(K.dtype)), ("mu_1 (largest of K/n)", f"{spec.mu[0]:.6g}"),
            ("numerical floor", f"{spec.floor:.3g}"), ("eigenvalues above floor", str(spec.n_above_floor))]
    if spec.min_raw < 0:
        rows.append(("most negative (clipped to 0)", f"{spec.min_raw:.3g}"))
    record: dict = {"gram": str(args.gram), "n": n, "dtype": str(K.dtype), "floor": spec.floor,
                    "min_raw": spec.min_raw, "n_above_floor": spec.n_above_floor, "mu": spec.mu.tolist()}
    if fit is None:
        rows.append(("power-law fit", f"not possible: {fit_error}"))
        record["fit"] = None
    else:
        lo, hi = fit.beta_ci
        rows += [("fit range (1-based)", f"{fit.first}..{fit.last}"),
                 ("beta", f"{fit.beta:.4f}  [{lo:.4f}, {hi:.4f}] ({fit.level:.0%} regression CI)"),
                 ("C", f"{fit.C:.4g}"), ("r^2 (log-log)", f"{fit.r2:.5f}")]
        if fit.bootstrap_ci is not None:
            rows.append(("beta bootstrap CI", f"[{fit.bootstrap_ci[0]:.4f}, {fit.bootstrap_ci[1]:.4f}]"))
        record["fit"] = fit._asdict()
        if args.sigma is not None:
            rate = implied_rate(fit.beta, args.sigma, n)
            rows.append(("implied rate", f"(sigma^2/n)^(beta/(beta+1)) = {rate:.4g}  (sigma = {args.sigma:g})"))
            record["implied_rate"] = {"sigma": args.sigma, "rate": rate}
    top = ", ".join(f"{v:.3g}" for v in spec.mu[:8])
    rows.append(("top eigenvalues", top + (", ..." if n > 8 else "")))
    title = f"Spectrum of K/n: {Path(args.gram).name}"
    plot_spectrum(spec.mu, fit, out / "spectrum.png", floor=spec.floor, title=title)
    _report(out, "spectrum", f"minintk spectrum: {args.gram}", rows, record)
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    import numpy as np

    from .dynamics import gradient_descent_mse, step_sums
    from .spectrum import eigenvalues
    from .stopping import (
        StoppingError,
        bound_curve,
        critical_radius,
        default_step,
        error_bound,
        estimate_sigma,
        plot_stopping,
        stopping_time,
    )

    K = _load_gram(args.gram)
    y = _load_array(args.y, "y")
    y = np.asarray(y.double().numpy() if hasattr(y, "double") else y, dtype=np.float64).reshape(-1)
    n = K.shape[0]
    if y.size != n:
        raise StoppingError(f"--y has {y.size} values but the Gram is {n} x {n}; give one target per row of K")
    spec = eigenvalues(K)
    if args.sigma == "auto":
        est = estimate_sigma(K, y)
        sigma, sigma_note = est.sigma, f"estimated (GCV kernel ridge, lam = {est.lam:.3g}, dof = {est.dof:.1f})"
        sigma_record = {"source": "estimated", "lam": est.lam, "dof": est.dof}
    else:
        try:
            sigma = float(args.sigma)
        except ValueError:
            raise StoppingError(f"--sigma must be a positive number or 'auto', got {args.sigma!r}") from None
        sigma_note, sigma_record = "given", {"source": "given"}
    alpha = default_step(spec.mu) if args.alpha is None else args.alpha
    eps_n = critical_radius(spec.mu, sigma, B=args.B)
    bound = error_bound(spec.mu, sigma, B=args.B)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t_hat = stopping_time(spec.mu, sigma, alpha, B=args.B)
    curve = bound_curve(spec.mu, sigma, step_sums(alpha, np.array([t_hat])), B=args.B)
    u = gradient_descent_mse(K, y, alpha)(t_hat)
    train_mse, start_mse = float(np.mean((u - y) ** 2)), float(np.mean(y**2))
    notes = list(dict.fromkeys(str(w.message) for w in caught))
    if train_mse > start_mse:
        notes.append(f"the training loss grows: train MSE {train_mse:.4g} at T_hat against {start_mse:.4g} at t = 0")
    eta = float(alpha * t_hat)
    out = _out_dir(args, "stop")
    rows = [
        ("n", str(n)),
        ("kernel", f"eigenvalues mu of K/n (the Gram divided by n); mu_1 = {spec.mu[0]:.4g}"),
        ("sigma", f"{sigma:.4g}  ({sigma_note})"),
        ("B (||f*||_H bound)", f"{args.B:g}"),
        ("step alpha", f"{alpha:.4g}  (" + ("given" if args.alpha is not None else "default min(1, 1/mu_1)")
         + f"; alpha mu_1 = {alpha * spec.mu[0]:.3g}, stable below 2)"),
        ("critical radius eps_n", f"{eps_n:.4g}"),
        ("bound 12 B^2 eps_n^2", f"{bound:.4g}  (on ||f_T - f*||_n^2, units of y^2)"),
        ("stopping time T_hat", f"{t_hat}  (eta_T = {eta:.4g})"),
        ("bias / variance bound at T", f"{curve.bias[0]:.4g} / {curve.variance[0]:.4g}"),
        ("train MSE at T (from f_0 = 0)", f"{train_mse:.4g}  (at t = 0: {start_mse:.4g})"),
    ] + [("warning", note) for note in notes]
    record = {"gram": str(args.gram), "y": str(args.y), "n": n, "sigma": sigma, "sigma_estimate": sigma_record,
              "B": args.B, "alpha": alpha, "alpha_source": "given" if args.alpha is not None else "default",
              "mu_1": float(spec.mu[0]), "warnings": notes, "eps_n": eps_n, "error_bound": bound, "T_hat": t_hat,
              "eta_T_hat": eta, "bias_bound": float(curve.bias[0]), "variance_bound": float(curve.variance[0]),
              "train_mse_at_T_hat": train_mse, "floor": spec.floor, "n_above_floor": spec.n_above_floor}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said above
        plot_stopping(spec.mu, sigma, alpha, out / "stop.png", B=args.B)
    _report(out, "stop", f"minintk stop: {args.gram}", rows, record)
    return 0


def _cmd_ntk(args: argparse.Namespace) -> int:
    import torch

    from . import sources
    from .distributed import is_rank0, process_group, tiled_ntk
    from .tilefolder import TileRunError, format_status, status

    if args.status:
        print(f"minintk ntk --status\n{format_status(status(args.status))}")
        return 0
    if not (args.model and (args.data or args.text) and args.out) or (args.data and args.text):
        raise TileRunError("give MODEL DATA --out FOLDER or MODEL --text FILE --out FOLDER to compute a Gram, or "
                           "--status FOLDER to report one")
    texts = sources.read_texts(args.text) if args.text else None
    words = [w for w in (args.labels or "").split(",") if w.strip()]
    tok = None
    if texts is not None or (args.tokenizer and words):
        vocab = sources.model_vocab(args.model)
        tok = sources.tokenizer_for(args.model, args.tokenizer, texts or [], words, vocab)
    labels = sources.resolve_labels(args.labels, tok)
    with process_group(args.device) as dev:
        dtype = torch.float64 if args.precision == "fp64" else torch.float32
        model = sources.load_model(args.model, labels, args.diff, args.seed, dev, dtype)
        if texts is not None:
            X = sources.encode_texts(texts, tok, model.cfg.n_positions)
        else:
            X = sources.load_tokens(args.data, model.cfg.vocab_size)
        pats = [p for p in args.params.split(",") if p] if args.params else None
        tiled_ntk(model, X, args.out, tile=args.tile, precision=args.precision, params=pats,
                  max_memory=sources.parse_bytes(args.max_memory), overwrite=args.overwrite)
        if is_rank0():
            print(f"minintk ntk: {args.model} on {args.text or args.data}\n{format_status(status(args.out))}")
    return 0


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
    cfg = config(preset, model=args.model, device=args.device, tasks=args.tasks and tuple(args.tasks),
                 sizes=args.sizes and tuple(args.sizes), seeds=args.seeds and tuple(args.seeds),
                 tv_size=args.tv_size, pretrain_steps=pretrain, kernel_samples=args.kernel_samples,
                 kernel_draws=args.kernel_draws, tangent=False if args.no_tangent else None,
                 threads=args.threads, data_dir=args.data_dir, cache_dir=args.cache_dir)
    if args.budget_min is not None:
        cfg.budget_min = budget
    out = _report_dir(args.out, Path("reports") / f"paper-{preset}", "results.json", args.force)
    results = run(cfg, out)
    h = headline(results)
    print(f"minintk paper ({preset}): finished in {results['elapsed_s']:.0f} s; report: {out / 'report.md'}")
    print("  eigen-decay beta: " + ", ".join(f"{t} {b:.3f}" for t, b in h["beta"].items() if b is not None))
    rho = h["spearman_beta_vs_aulc"]
    print("  Spearman(beta, AULC), full fine-tuning (theory: negative): "
          + ", ".join(f"{g} {r:+.2f}" for g, r in rho.items() if r is not None))
    for k in ("full", "tangent"):
        if f"{k}_addition_all" in h:
            a = h[f"{k}_addition_all"]
            score, xi = a["mean_normalized_test"], h[f"{k}_xi_mean_at_1_1"]
            print(f"  task addition ({k}): lambda {a['lambda']}, mean normalized test score "
                  f"{'n/a' if score is None else f'{score:.3f}'}; mean xi(1,1) {'n/a' if xi is None else f'{xi:.3f}'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `minintk` and `python -m minintk`. A user error prints one line on stderr and returns 2
    (--debug: the traceback)."""
    args = _build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        if args.debug:
            raise
        _close_bars()
        print(f"minintk {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
