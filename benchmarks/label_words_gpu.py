"""Many label words on one GPU: the scalar Gram (the difference of two label words) beside the trace and the
diagonal over C label-word outputs, and the full (n C)^2 kernel where it is small enough. Check first (fp64 on
a tiny decoder: trace and diagonal against the full kernel's blocks), then time, in one run.

An exact C-output kernel needs the output-gradients of every output: C backward passes' worth of work in the
capture, however the Gram is contracted. The capture/contraction split below shows where the time goes.

    python benchmarks/label_words_gpu.py --out benchmarks/results/label_words_gpu
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from minintk import Decoder
from minintk.config import gpt_neo_config
from minintk.engine import Stats, ntk


def build(size: str, C: int, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    ids = tuple(range(100, 100 + 5 * C, 5)) if C > 1 else (352, 489)
    cfg = gpt_neo_config(size, head="label_words", label_ids=ids, label_diff=C == 1)
    with torch.device("cuda"):
        return Decoder(cfg).eval()


def timed(model, X, precision: str, mode: str, repeats: int) -> dict:
    kw = {"trace": mode == "trace", "diagonal": mode == "diagonal"}
    ntk(model, X[:4], precision=precision, progress=False, **kw)  # discovery and the allocator's first mallocs
    best = None
    for _ in range(repeats):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        s = Stats()
        t = time.perf_counter()
        K = ntk(model, X, precision=precision, progress=False, stats=s, **kw)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if best is None or dt < best["seconds"]:
            best = {"seconds": dt, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "phases": {k: round(v, 3) for k, v in s.seconds.items()}, "shape": list(K.shape)}
    return best


def check() -> list[dict]:
    """fp64 on the GPU: trace = the mean of the full kernel's output-diagonal, diagonal = its blocks' diagonals."""
    cfg = gpt_neo_config("tiny", head="label_words", label_ids=(3, 7, 11, 19), label_diff=False)
    torch.manual_seed(0)
    m = Decoder(cfg).cuda().double()
    X = torch.randint(0, cfg.vocab_size, (6, 10), device="cuda")
    full = ntk(m, X, precision="fp64", progress=False)  # (6, 6, 4, 4)
    diag = full.diagonal(dim1=2, dim2=3)
    rows = []
    for mode, want in (("trace", diag.mean(-1)), ("diagonal", diag)):
        got = ntk(m, X, precision="fp64", progress=False, trace=mode == "trace", diagonal=mode == "diagonal")
        err = ((got - want).norm() / want.norm()).item()
        rows.append({"mode": mode, "rel_error_vs_full": err, "ok": err <= 1e-10})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="125M")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--C", type=int, default=64)
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--full-max-n", type=int, default=64, help="time the full kernel on this many samples only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/label_words_gpu")
    args = ap.parse_args()
    checks = check()
    print(json.dumps(checks))
    one, many = build(args.size, 1), build(args.size, args.C)
    X = torch.randint(0, one.cfg.vocab_size, (args.n, args.T), device="cuda", generator=None)
    rows = []
    for precision in args.precisions.split(","):
        cases = [("scalar", one, X), ("trace", many, X), ("diagonal", many, X),
                 ("full", many, X[: args.full_max_n])]
        for mode, model, x in cases:
            r = timed(model, x, precision, "full" if mode in ("scalar", "full") else mode, args.repeats)
            rows.append({"precision": precision, "mode": mode, "n": x.shape[0],
                         "C": 1 if mode == "scalar" else args.C, **r})
            print(json.dumps(rows[-1]), flush=True)
    import transformers

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "python": platform.python_version(), "size": args.size,
            "T": args.T}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "checks": checks, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(markdown(meta, checks, rows))
    print(markdown(meta, checks, rows))


def markdown(meta: dict, checks: list[dict], rows: list[dict]) -> str:
    lines = [f"# {meta['size']} label words on {meta['gpu']} (torch {meta['torch']}, CUDA {meta['cuda']}, "
             f"transformers {meta['transformers']})", "",
             f"GPT-Neo-{meta['size']} architecture, random weights, T={meta['T']}; best of the timed calls after a "
             "warm-up. scalar: the difference of two label words (C=1). trace: the mean over C outputs (n, n); "
             "diagonal: per output (n, n, C); full: (n C, n C), on fewer samples. "
             "`python benchmarks/label_words_gpu.py`", "",
             "Checks (fp64, tiny decoder, vs the full kernel): "
             + ", ".join(f"{c['mode']} {c['rel_error_vs_full']:.1e}" for c in checks), "",
             "| precision | mode | n | C | seconds | vs scalar | capture s | contract s | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(s for s in rows if s["precision"] == r["precision"] and s["mode"] == "scalar")
        ph = r["phases"]
        lines.append(f"| {r['precision']} | {r['mode']} | {r['n']} | {r['C']} | {r['seconds']:.3f} | "
                     f"{r['seconds'] / base['seconds']:.1f}x | {ph.get('capture', 0):.3f} | "
                     f"{ph.get('contract', 0):.3f} | {r['peak_gib']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
