"""The `minintk` command line: parse, call the library, write the report. Nothing else lives here."""

# This file builds the parser, runs `info` and prints errors; the other subcommands live by group, each with its
# options beside its body: cli_theory (spectrum, stop), cli_ntk (ntk), cli_experiments (width-scan, paper), and
# cli_reports lays out their report folders.

from __future__ import annotations

import argparse
import json
import sys

from . import cli_experiments, cli_ntk, cli_theory


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, unless it is None/False or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _build_parser() -> argparse.ArgumentParser:
    """The parser of `minintk` and of every subcommand (each with --debug, and its defaults in --help)."""
    p = argparse.ArgumentParser(prog="minintk", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], formatter_class=_Help, **kw)

    info = add("info", help="architecture, parameter counts per group, attention scaling")
    info.add_argument("source", help="GPT-Neo folder / .safetensors / hub id, or a built-in: tiny, gpt-neo-125M, ...")
    info.add_argument("--attn-scale", default="native", help="native | 1/d | 1/sqrt(d)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=_cmd_info)
    for group in (cli_theory, cli_ntk, cli_experiments):  # in this order in --help
        group.add_parsers(add)
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


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors that mean a bad input or setting (printed as one line), not a bug (a traceback)."""
    from .agreement import AgreementError
    from .cli_reports import ReportExistsError
    from .cli_theory import GramFileError
    from .config import ConfigError
    from .data import DataError
    from .dynamics import DynamicsError
    from .engine import NTKError
    from .finetune import FinetuneError
    from .gptneo import CheckpointError
    from .kernel_classifiers import ClassifierError
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
            StoppingError, TaskVectorError, WidthScanError, ClassifierError, AgreementError, FileNotFoundError,
            NotADirectoryError, IsADirectoryError, PermissionError)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _close_bars() -> None:
    """Clear progress bars still on the terminal, so that an error starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


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
