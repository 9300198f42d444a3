"""Gram kernels on the GPU: each checked against its fp64 reference, then timed beside the alternatives.

For a linear layer of GPT-Neo-125M/1.3B shape the same Gram can be computed three ways: the fused Triton
ghost kernel, the plain-torch ghost reference, and the materialized path (cuBLAS per-sample gradients and
Gram). The embedding Gram: the Triton equality kernel vs its torch reference. The engine's cost model picks
ghost vs materialized by flops; this table shows where that choice lands in seconds.

    python benchmarks/kernels_check.py --out benchmarks/results/kernels_check
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from minintk.kernels import (
    embedding_gram,
    embedding_gram_reference,
    ghost_gram,
    ghost_gram_reference,
    materialized_gram,
    materialized_gram_reference,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def factors(m, T, a, b, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    X = torch.randn(m, T, a, device="cuda", generator=g).to(dtype)
    D = torch.randn(m, T, b, device="cuda", generator=g).to(dtype)
    return X, D


def bench(fn, reps=5) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def checks() -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for m1, m2, T1, T2, a, b in [(3, 5, 7, 7, 5, 33), (9, 4, 17, 128, 70, 3), (33, 33, 8, 8, 768, 96)]:
            X1, D1 = factors(m1, T1, a, b, dtype, 1)
            X2, D2 = factors(m2, T2, a, b, dtype, 2)
            ref = materialized_gram_reference(X1, D1, X2, D2)
            tok1 = torch.randint(0, 5, (m1, T1), device="cuda")
            tok2 = torch.randint(0, 5, (m2, T2), device="cuda")
            eref = embedding_gram_reference(tok1, D1.double(), tok2, D2.double())
            for name, got, r in [
                ("ghost triton", ghost_gram(X1, D1, X2, D2, backend="triton"), ref),
                ("ghost triton same", ghost_gram(X1, D1, backend="triton"),
                 materialized_gram_reference(X1, D1, X1, D1)),
                ("materialized", materialized_gram(X1, D1, X2, D2, budget=4096), ref),
                ("embedding triton", embedding_gram(tok1, D1, tok2, D2, backend="triton"), eref),
                ("ghost blocked", ghost_gram(X1, D1, X2, D2, backend="blocked"), ref),
                ("embedding blocked", embedding_gram(tok1, D1, tok2, D2, backend="blocked"), eref),
            ]:  # fmt: skip
                shape = [m1, m2, T1, T2, a, b]
                rows.append({"kernel": name, "dtype": str(dtype)[6:], "shape": shape, "rel_err": rel(got, r)})
                print("check", json.dumps(rows[-1]), flush=True)
    return rows


def time_case(m: int, T: int, a: int, b: int, dtype: torch.dtype) -> dict:
    X, D = factors(m, T, a, b, dtype)
    tok = torch.randint(0, 50257, (m, T), device="cuda")
    De = D[..., :a].contiguous()
    small = m * m * T * T <= 2**31  # the torch references hold (m, m, T, T) intermediates in chunks
    r = {"dtype": str(dtype)[6:], "m": m, "T": T, "a": a, "b": b}
    r["ghost_flops"] = m * m * T * T * (a + b)  # upper triangle only
    r["materialized_flops"] = 2 * m * T * a * b + m * m * a * b
    r["ghost_triton_s"] = bench(lambda: ghost_gram(X, D, backend="triton"))
    r["ghost_blocked_s"] = bench(lambda: ghost_gram(X, D, backend="blocked"))
    r["embedding_blocked_s"] = bench(lambda: embedding_gram(tok, De, backend="blocked"))
    if small:
        r["ghost_torch_s"] = bench(lambda: ghost_gram_reference(X, D, X, D), reps=2)
    r["materialized_s"] = bench(lambda: materialized_gram(X, D))
    r["embedding_triton_s"] = bench(lambda: embedding_gram(tok, De, backend="triton"))
    if small:
        r["embedding_torch_s"] = bench(lambda: embedding_gram_reference(tok, De, tok, De), reps=2)
    ghost_cost, mat_cost = m * m * T * T * (a + b), m * T * a * b + m * m * a * b
    r["cost_model_picks"] = "ghost" if ghost_cost < mat_cost else "materialized"
    return r


def timings() -> list[dict]:
    rows = []
    torch.backends.cuda.matmul.allow_tf32 = False
    cases = [(64, 128, 768, 3072), (256, 8, 768, 3072), (1024, 8, 2048, 2048), (256, 128, 2048, 2048),
             (256, 1, 2048, 50257)]  # the last two: GPT-Neo-1.3B tiles (a block's linear / embedding; the LM head)
    for dtype in (torch.float32, torch.bfloat16):
        for m, T, a, b in cases:
            rows.append(time_case(m, T, a, b, dtype))
            print("time", json.dumps(rows[-1]), flush=True)
    return rows


def markdown(meta, chk, tim) -> str:
    lines = [f"# Gram kernels on {meta['gpu']}", "", f"torch {meta['torch']}, triton {meta['triton']}.", "",
             "## Checks (max abs error / max |K|, vs fp64 reference)", "",
             "| kernel | dtype | shape m1,m2,T1,T2,a,b | rel err |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {c['kernel']} | {c['dtype']} | {c['shape']} | {c['rel_err']:.1e} |" for c in chk]
    lines += ["", "## Timings (symmetric Gram of one layer, best of 5, seconds; fp32 = TF32 off)", "",
              "| dtype | m | T | a | b | ghost Triton | ghost blocked | ghost torch | materialized "
              "| embedding Triton | embedding blocked | embedding torch | ghost TFLOP/s (Triton) "
              "| materialized TFLOP/s | cost model picks |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def f(v):
        return f"{v:.4f}" if isinstance(v, float) else "-"

    for r in tim:
        lines.append(
            f"| {r['dtype']} | {r['m']} | {r['T']} | {r['a']} | {r['b']} | {f(r['ghost_triton_s'])} | "
            f"{f(r.get('ghost_blocked_s'))} | {f(r.get('ghost_torch_s'))} | {f(r['materialized_s'])} | "
            f"{f(r['embedding_triton_s'])} | {f(r.get('embedding_blocked_s'))} | {f(r.get('embedding_torch_s'))} | "
            f"{r['ghost_flops'] / r['ghost_triton_s'] / 1e12:.1f} | "
            f"{r['materialized_flops'] / r['materialized_s'] / 1e12:.1f} | {r['cost_model_picks']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/kernels_check")
    args = ap.parse_args()
    import triton

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    chk = checks()
    tim = timings()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "checks": chk, "timings": tim}, indent=2))
    out.with_suffix(".md").write_text(markdown(meta, chk, tim))
    print(markdown(meta, chk, tim))


if __name__ == "__main__":
    main()
