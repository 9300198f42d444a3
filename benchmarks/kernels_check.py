"""Gram kernels: every path checked against its fp64 reference first, then timed beside the alternatives.

For a linear layer of GPT-Neo-125M/1.3B shape the same Gram can be computed three ways: the plain-torch
ghost reference, the blocked ghost path (cuBLAS GEMMs over token-pair tiles, the default on CUDA), and the
materialized path (cuBLAS per-sample gradients and their Gram). The embedding Gram: the torch reference vs
the blocked path. The engine's cost model picks ghost vs materialized by flops; this table shows where that
choice lands in seconds. The script stops before timing if a check fails.

    python benchmarks/kernels_check.py                    # one GPU: writes benchmarks/results/kernels_check_blocked.*
    python benchmarks/kernels_check.py --device cpu --quick --out /tmp/kernels_check   # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from minintk.kernels import (
    embedding_gram,
    embedding_gram_blocked,
    embedding_gram_reference,
    ghost_gram,
    ghost_gram_blocked,
    ghost_gram_reference,
    materialized_gram,
    materialized_gram_reference,
)

# Largest accepted error / max |K| per check: all paths accumulate in fp32 on exactly rounded inputs, except the
# materialized one, which rounds 16-bit per-sample gradients before their Gram.
TOL = {"float32": 1e-5, "bfloat16": 1e-5}
TOL_MATERIALIZED = {"float32": 1e-5, "bfloat16": 3e-2}
CHECK_SHAPES = [(3, 5, 7, 7, 5, 33), (9, 4, 17, 128, 70, 3), (33, 33, 8, 8, 768, 96)]  # m1, m2, T1, T2, a, b
TIME_CASES = [(64, 128, 768, 3072), (256, 8, 768, 3072), (1024, 8, 2048, 2048), (256, 128, 2048, 2048),
              (256, 1, 2048, 50257)]  # m, T, a, b; the last two: GPT-Neo-1.3B tiles (a block's linear; the LM head)
QUICK_CHECK_SHAPES = CHECK_SHAPES[:2]
QUICK_TIME_CASES = [(8, 16, 32, 48), (32, 4, 64, 64)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def factors(m, T, a, b, dtype, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    X = torch.randn(m, T, a, device=device, generator=g).to(dtype)
    D = torch.randn(m, T, b, device=device, generator=g).to(dtype)
    return X, D


def bench(fn, reps=5) -> float:
    """Best of `reps` timed calls after one warm-up, in seconds (CUDA synchronized around each call)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def checks(device: str, shapes: list) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for m1, m2, T1, T2, a, b in shapes:
            X1, D1 = factors(m1, T1, a, b, dtype, 1, device)
            X2, D2 = factors(m2, T2, a, b, dtype, 2, device)
            ref = materialized_gram_reference(X1, D1, X2, D2)
            sref = materialized_gram_reference(X1, D1, X1, D1)
            tok1 = torch.randint(0, 5, (m1, T1), device=device)
            tok2 = torch.randint(0, 5, (m2, T2), device=device)
            eref = embedding_gram_reference(tok1, D1.double(), tok2, D2.double())
            for name, got, r in [
                ("ghost reference", ghost_gram_reference(X1, D1, X2, D2), ref),
                ("ghost blocked", ghost_gram_blocked(X1, D1, X2, D2), ref),
                ("ghost blocked same", ghost_gram_blocked(X1, D1, X1, D1, same=True, budget=4096), sref),
                ("ghost_gram (default)", ghost_gram(X1, D1, X2, D2), ref),
                ("materialized", materialized_gram(X1, D1, X2, D2, budget=4096), ref),
                ("embedding reference", embedding_gram_reference(tok1, D1, tok2, D2), eref),
                ("embedding blocked", embedding_gram_blocked(tok1, D1, tok2, D2), eref),
                ("embedding_gram (default)", embedding_gram(tok1, D1, tok2, D2), eref),
            ]:  # fmt: skip
                dt = str(dtype)[6:]
                tol = (TOL_MATERIALIZED if name == "materialized" else TOL)[dt]
                err = rel(got, r)
                rows.append({"kernel": name, "dtype": dt, "shape": [m1, m2, T1, T2, a, b], "rel_err": err,
                             "ok": err <= tol})  # fmt: skip
                print("check", json.dumps(rows[-1]), flush=True)
    return rows


def time_case(m: int, T: int, a: int, b: int, dtype: torch.dtype, device: str) -> dict:
    X, D = factors(m, T, a, b, dtype, 0, device)
    tok = torch.randint(0, 50257, (m, T), device=device)
    De = D[..., :a].contiguous()
    small = m * m * T * T <= 2**31  # the torch references hold (m, m, T, T) intermediates in chunks
    r = {"dtype": str(dtype)[6:], "m": m, "T": T, "a": a, "b": b}
    r["ghost_flops"] = m * m * T * T * (a + b)  # upper triangle only
    r["materialized_flops"] = 2 * m * T * a * b + m * m * a * b
    r["ghost_blocked_s"] = bench(lambda: ghost_gram_blocked(X, D, X, D, same=True))
    if small:
        r["ghost_torch_s"] = bench(lambda: ghost_gram_reference(X, D, X, D), reps=2)
    r["materialized_s"] = bench(lambda: materialized_gram(X, D))
    r["embedding_blocked_s"] = bench(lambda: embedding_gram_blocked(tok, De, tok, De, same=True))
    if small:
        r["embedding_torch_s"] = bench(lambda: embedding_gram_reference(tok, De, tok, De), reps=2)
    ghost_cost, mat_cost = m * m * T * T * (a + b), m * T * a * b + m * m * a * b
    r["cost_model_picks"] = "ghost" if ghost_cost < mat_cost else "materialized"
    return r


def timings(device: str, cases: list) -> list[dict]:
    rows = []
    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype in (torch.float32, torch.bfloat16):
        for m, T, a, b in cases:
            rows.append(time_case(m, T, a, b, dtype, device))
            print("time", json.dumps(rows[-1]), flush=True)
    return rows


def markdown(meta, chk, tim) -> str:
    lines = [f"# Gram kernels on {meta['device']}", "", f"torch {meta['torch']}. ghost_gram / embedding_gram take "
             f"the {meta['default_path']} path on this device (float32, bfloat16).", "",
             "## Checks (max abs error / max |K|, vs fp64 reference)", "",
             "| kernel | dtype | shape m1,m2,T1,T2,a,b | rel err |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {c['kernel']} | {c['dtype']} | {c['shape']} | {c['rel_err']:.1e} |" for c in chk]
    lines += ["", "## Timings (symmetric Gram of one layer, best of 5, seconds; fp32 = TF32 off)", "",
              "| dtype | m | T | a | b | ghost blocked | ghost torch | materialized | embedding blocked "
              "| embedding torch | ghost TFLOP/s (blocked) | materialized TFLOP/s | cost model picks |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def f(v):
        return f"{v:.4f}" if isinstance(v, float) else "-"

    for r in tim:
        lines.append(
            f"| {r['dtype']} | {r['m']} | {r['T']} | {r['a']} | {r['b']} | {f(r['ghost_blocked_s'])} | "
            f"{f(r.get('ghost_torch_s'))} | {f(r['materialized_s'])} | {f(r['embedding_blocked_s'])} | "
            f"{f(r.get('embedding_torch_s'))} | {r['ghost_flops'] / r['ghost_blocked_s'] / 1e12:.1f} | "
            f"{r['materialized_flops'] / r['materialized_s'] / 1e12:.1f} | {r['cost_model_picks']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--quick", action="store_true", help="two small check shapes and two tiny timing cases")
    ap.add_argument("--out", default=None,
                    help="path stem of the .md and .json written (default: benchmarks/results/kernels_check_blocked; "
                         "with --quick nothing is written unless --out is given)")  # fmt: skip
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu (and --quick for a short run)")
    cuda = device.type == "cuda"
    meta = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "default_path": "blocked" if cuda else "reference"}  # fmt: skip
    chk = checks(args.device, QUICK_CHECK_SHAPES if args.quick else CHECK_SHAPES)
    bad = [c for c in chk if not c["ok"]]
    if bad:
        sys.exit(f"{len(bad)} check(s) above tolerance, not timing: {json.dumps(bad)}")
    tim = timings(args.device, QUICK_TIME_CASES if args.quick else TIME_CASES)
    text = markdown(meta, chk, tim)
    print(text)
    out = args.out or (None if args.quick else "benchmarks/results/kernels_check_blocked")
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "checks": chk, "timings": tim}, indent=2))
        out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
