"""The symmetric Gram G G^T of the materialized form on one GPU: one cuBLAS GEMM (all m^2 products) against
kernels.gram_upper (bands of batched cuBLAS GEMMs on and above the diagonal blocks) at several band widths, and
a Triton upper-triangle kernel (a candidate written here: tiles on and above the diagonal only, deterministic
split-K, autotuned) -- the measurement behind SYRK_BLOCK and behind keeping or dropping a Triton path.

Check first (each path's upper triangle vs an fp64 G G^T, per dtype), then time (best of 5 after a warm-up).
Effective TFLOP/s count the symmetric work m (m + 1) K for every path, so the paths compare directly.

    python benchmarks/symmetric_gram.py --out benchmarks/results/symmetric_gram
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from kernels_check import bench  # this folder's timing helper (run as a script from the repo root)
from minintk.kernels import gram_upper

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU machines: only the cuBLAS paths are timed
    triton = None


if triton is not None:

    @triton.autotune(
        configs=[triton.Config({"BM": bm, "BK": bk}, num_warps=w, num_stages=s)
                 for bm, bk, w, s in ((128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 4, 4), (64, 64, 4, 4))],
        key=["M", "K", "SPLIT"],
    )
    @triton.jit
    def _upper_tiles(G, P, M, K, KS, SPLIT, sgm, sgk, sps, spm, spn, BM: tl.constexpr, BK: tl.constexpr):
        """P[s, tile] = G[rows i] G[rows j]^T over the s-th K range, for tile (i, j); tiles below the diagonal
        return at once."""
        ti, tj, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if tj < ti:
            return
        rm = ti * BM + tl.arange(0, BM)
        rn = tj * BM + tl.arange(0, BM)
        rk = tl.arange(0, BK)
        k0 = s * KS
        k1 = tl.minimum(k0 + KS, K)
        acc = tl.zeros((BM, BM), dtype=tl.float32)
        for k in range(k0, k1, BK):
            kk = k + rk
            a = tl.load(G + rm[:, None] * sgm + kk[None, :] * sgk, mask=(rm[:, None] < M) & (kk[None, :] < k1),
                        other=0.0)
            b = tl.load(G + rn[None, :] * sgm + kk[:, None] * sgk, mask=(rn[None, :] < M) & (kk[:, None] < k1),
                        other=0.0)
            acc += tl.dot(a, b)
        tl.store(P + s * sps + rm[:, None] * spm + rn[None, :] * spn, acc, mask=(rm[:, None] < M) & (rn[None, :] < M))


def triton_upper(G: torch.Tensor, split: int) -> torch.Tensor:
    """Upper-triangle tiles of G G^T (fp32), K cut into `split` ranges summed in a fixed order."""
    M, K = G.shape
    P = torch.zeros(split, M, M, dtype=torch.float32, device=G.device)
    KS = math.ceil(K / split / 64) * 64

    def grid(meta):
        t = math.ceil(M / meta["BM"])
        return (t, t, split)

    _upper_tiles[grid](G, P, M, K, KS, split, G.stride(0), G.stride(1), P.stride(0), P.stride(1), P.stride(2))
    return P.sum(0) if split > 1 else P[0]


def check(dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    G = torch.randn(700, 5000, device="cuda").to(dtype)
    ref = torch.triu(G.double() @ G.double().T)
    out = {}
    paths = {"cublas": lambda: G.float() @ G.float().T if dtype == torch.float32 else torch.mm(G, G.T).float(),
             "bands256": lambda: gram_upper(G, 256)}
    if triton is not None:
        paths["triton"] = lambda: triton_upper(G, 2)
    for name, fn in paths.items():
        got = torch.triu(fn().double())
        out[name] = ((got - ref).abs().max() / ref.abs().max()).item()
    return out


def time_paths(G: torch.Tensor) -> dict[str, float]:
    """Seconds of each path on G (m, K)."""
    m = G.shape[0]
    times = {"cublas GEMM (all m^2)": bench(lambda: torch.mm(G, G.T, out_dtype=torch.float32))}
    for block in (256, 512, 1024):
        if 2 * block <= m:
            times[f"bands of {block}"] = bench(lambda block=block: gram_upper(G, block))
    if triton is not None:
        for split in (1, 4):
            times[f"triton upper tiles, split-K {split}"] = bench(lambda split=split: triton_upper(G, split))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="1024,2048,4096")
    ap.add_argument("--K", type=int, default=393216)
    ap.add_argument("--out", default="benchmarks/results/symmetric_gram")
    args = ap.parse_args()
    checks = {str(d): check(d) for d in (torch.bfloat16, torch.float32)}
    print(json.dumps(checks), flush=True)
    rows = []
    for m in (int(v) for v in args.ms.split(",")):
        sym = m * (m + 1) * args.K
        for path, sec in time_paths(torch.randn(m, args.K, device="cuda", dtype=torch.bfloat16)).items():
            rows.append({"m": m, "K": args.K, "path": path, "ms": sec * 1e3, "eff_tflops": sym / sec / 1e12})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": getattr(triton, "__version__", None)}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "checks": checks, "rows": rows}, indent=2))
    lines = [f"# Symmetric Gram G G^T, bf16 -> fp32, on {meta['gpu']} (torch {meta['torch']}, CUDA {meta['cuda']}, "
             f"triton {meta['triton']})", "",
             "G (m, K) as the materialized form's per-sample gradient slices; effective TFLOP/s count the symmetric "
             "work m (m + 1) K. `python benchmarks/symmetric_gram.py`", "",
             "Checks (max error / max entry of the upper triangle vs fp64, m=700, K=5000): "
             + "; ".join(f"{d}: " + ", ".join(f"{k} {v:.1e}" for k, v in c.items()) for d, c in checks.items()), "",
             "| m | K | path | ms | effective TFLOP/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['m']} | {r['K']} | {r['path']} | {r['ms']:.2f} | {r['eff_tflops']:.0f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
