"""The materialized Gram's GEMM shapes on this GPU: per-sample gradient formation and the Gram G G^T,
in the layouts and slicings the kernel could use (the measurement behind kernels/materialized.py's choice).

    python benchmarks/gemm_shapes.py
"""

from __future__ import annotations

import torch
from kernels_check import bench  # this folder's timing helper (run as a script from the repo root)
from minintk.kernels import materialized_gram


def best(fn, reps: int = 5) -> float:
    """Milliseconds of fn, best of reps after one warm-up call."""
    return bench(fn, reps) * 1e3


def measure(X: torch.Tensor, D: torch.Tensor, m: int) -> dict:
    """Milliseconds of each formation layout, Gram split and materialized_gram budget for X (m, T, a), D (m, T, b)."""
    G = torch.bmm(D.transpose(1, 2), X).flatten(1)
    row = {
        "form DtX": best(lambda: torch.bmm(D.transpose(1, 2), X)),
        "form XtD": best(lambda: torch.bmm(X.transpose(1, 2), D)),
        "gram GGt": best(lambda: G @ G.T),
    }
    for s in (16, 64, 128, 256, 512):
        Gs = G.view(m, s, -1).transpose(0, 1)
        row[f"gram splitK{s}"] = best(lambda Gs=Gs: torch.bmm(Gs, Gs.transpose(1, 2)).sum(0))
    for budget in (1 << 28, 1 << 24, 1 << 22, 1 << 20):
        row[f"mat budget 2^{budget.bit_length() - 1}"] = best(
            lambda budget=budget: materialized_gram(X, D, same=True, budget=budget)
        )
    return row


def main() -> None:
    m, T = 64, 128
    for prec in ("fp32", "tf32", "bf16"):
        torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
        dt = torch.bfloat16 if prec == "bf16" else torch.float32
        for a, b in ((768, 768), (768, 3072), (3072, 768)):
            X = torch.randn(m, T, a, device="cuda", dtype=dt)
            D = torch.randn(m, T, b, device="cuda", dtype=dt)
            row = measure(X, D, m)
            flop_form, flop_gram = 2 * m * T * a * b, 2 * m * m * a * b
            print(f"{prec} a={a} b={b}: form {flop_form / 1e9:.1f} GF, gram {flop_gram / 1e9:.1f} GF | "
                  + ", ".join(f"{k} {v:.3f} ms" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
