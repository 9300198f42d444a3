"""Kernels of other optimizers on one GPU: the SignGD kernel <g(x), sign(g(x'))> beside the eNTK (SGD kernel) of the
same model, inputs and precision, in the same run (issue 23).

Check first: on a small GPT-Neo-like model in fp64, the engine's SignGD and Adam kernels against the same kernels
from torch.func per-sample gradients on the GPU. Then time: GPT-Neo architecture (random weights, label-word logit
difference at the last token), every parameter, one call after a warm-up call on 2 samples.

    python benchmarks/kernel_variants.py --size 1.3B --n 1024 --out benchmarks/results/kernel_variants_1.3B
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minintk import Decoder
from minintk.config import gpt_neo_config
from minintk.engine import Stats, adam, ntk


def build(size: str, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    ids = (3, 7) if size == "tiny" else (352, 2089)  # two label words (the cost does not depend on them)
    cfg = gpt_neo_config(size, head="label_words", label_ids=ids, label_diff=True)
    with torch.device("cuda"):
        return Decoder(cfg).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check() -> list[dict]:
    """fp64 engine vs fp64 torch.func (strategy="func") for SignGD and Adam, n=10, T=16, cross and self."""
    m = build("tiny").double()
    g = torch.Generator(device="cuda").manual_seed(1)
    X = torch.randint(0, m.cfg.vocab_size, (10, 16), device="cuda", generator=g)
    X2 = torch.randint(0, m.cfg.vocab_size, (6, 16), device="cuda", generator=g)
    v = {n: torch.rand(p.shape, device="cuda", dtype=torch.float64) for n, p in m.named_parameters()}
    rows = []
    for name, kernel in (("signgd", "signgd"), ("adam", adam(v))):
        for Xb in (None, X2):
            got = ntk(m, X, Xb, precision="fp64", kernel=kernel, progress=False)
            ref = ntk(m, X, Xb, precision="fp64", kernel=kernel, strategy="func", progress=False)
            rows.append({"kernel": name, "pair": "self" if Xb is None else "cross", "rel_err_vs_func": rel(got, ref)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def timed(model, X, kernel: str, precision: str) -> dict:
    ntk(model, X[:2], precision=precision, kernel=kernel, progress=False)  # warm-up: discovery
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    stats = Stats()
    torch.cuda.synchronize()
    t = time.perf_counter()
    K = ntk(model, X, precision=precision, kernel=kernel, progress=False, stats=stats, cuda_graph=False)
    torch.cuda.synchronize()
    sec = time.perf_counter() - t
    ph = stats.seconds
    return {"kernel": kernel, "seconds": sec, "capture_s": ph.get("capture", 0.0) + ph.get("boundary", 0.0),
            "contract_s": ph.get("contract", 0.0), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "plan": str(stats.plan), "K": K}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.3B")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--out", default="benchmarks/results/kernel_variants_1.3B")
    args = ap.parse_args()
    checks = check()
    model = build(args.size)
    P = sum(p.numel() for p in model.parameters())
    X = torch.randint(0, model.cfg.vocab_size, (args.n, args.T), device="cuda",
                      generator=torch.Generator(device="cuda").manual_seed(0))
    rows = [timed(model, X, k, args.precision) for k in ("sgd", "signgd")]
    sym = rel(rows[1]["K"], rows[1]["K"].T)
    for r in rows:
        r.pop("K")
        print(json.dumps(r), flush=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "model": f"GPT-Neo-{args.size}", "P": P, "n": args.n, "T": args.T, "precision": args.precision}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "checks": checks, "rows": rows}, indent=1))
    ratio = rows[1]["seconds"] / rows[0]["seconds"]
    lines = [f"# SignGD kernel vs eNTK on {meta['gpu']}", "",
             f"torch {meta['torch']}, CUDA {meta['cuda']}; {meta['model']} architecture ({P:,} parameters, random "
             f"weights), n={args.n}, T={args.T}, {args.precision}, every parameter, label-word logit difference at "
             "the last token; one call after a warm-up call on 2 samples, eager (no CUDA graph). "
             "`python benchmarks/kernel_variants.py`", "",
             "| kernel | time (s) | capture s | contract s | peak GiB | plan |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['seconds']:.2f} | {r['capture_s']:.2f} | {r['contract_s']:.2f} | "
              f"{r['peak_gib']:.1f} | {r['plan']} |" for r in rows]
    lines += ["", f"SignGD / SGD time: {ratio:.2f}x. The SignGD kernel is asymmetric (relative distance of K from "
              f"K^T: {sym:.2f}), so every tile is computed.", "",
              "## Checks (fp64, tiny GPT-Neo-like model, n=10 and 6, T=16): engine vs torch.func on the GPU", "",
              "| kernel | pair | rel. err |", "|---|---|---|"]
    lines += [f"| {c['kernel']} | {c['pair']} | {c['rel_err_vs_func']:.1e} |" for c in checks]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
