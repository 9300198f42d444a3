"""The `minintk` command line: parse, call the library, write the report. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minintk", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="architecture, parameter counts per group, attention scaling")
    info.add_argument("source", help="GPT-Neo folder / .safetensors / hub id, or a built-in: tiny, gpt-neo-125M, ...")
    info.add_argument("--attn-scale", default="native", help="native | 1/d | 1/sqrt(d)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=_cmd_info)
    # <subcommands: each adds its parser here and sets `func`>
    return p


BUILTIN = {"tiny": "tiny", "gpt-neo-125M": "125M", "gpt-neo-1.3B": "1.3B", "gpt-neo-2.7B": "2.7B"}


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .config import gpt_neo_config
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of `minintk` and `python -m minintk`."""
    args = _build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
