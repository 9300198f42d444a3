"""Ghost and embedding Grams as cuBLAS matmuls over token-pair tiles (the alternative to the fused kernel).

    out[i, j] = sum_{t, s} P[(i, t), (j, s)] * (D1[i, t] . D2[j, s])

with P = X1 X2^T (ghost) or P = [tok1 == tok2] (embedding). Rows are (sample, token) pairs; a tile of ci
samples x cj samples forms its (ci T1) x (cj T2) token-pair matrices with two GEMMs (fp32 accumulation,
16-bit operands on tensor cores), multiplies them elementwise and sums each T1 x T2 block. Unlike the
fused kernel the token-pair tiles do reach memory (at most `budget` elements each), which the benchmark
weighs against cuBLAS's speed (`benchmarks/kernels_check.py`). A symmetric Gram computes only the tiles on
and above the diagonal. Cost: 2 m1 m2 T1 T2 (a + b) flops (ghost), 2 m1 m2 T1 T2 b (embedding).
"""

from __future__ import annotations

import math

import torch

from ._common import chunk_size, mirror_upper, mm_fp32

__all__ = ["blocked_gram"]

# Elements of one token-pair tile (each of P and D1 D2^T), 1 GiB in fp32.
DEFAULT_BUDGET = 1 << 28


def blocked_gram(
    X1: torch.Tensor,
    D1: torch.Tensor,
    X2: torch.Tensor,
    D2: torch.Tensor,
    *,
    same: bool = False,
    budget: int = DEFAULT_BUDGET,
) -> torch.Tensor:
    """(m1, m2) fp32 Gram (fp64 for fp64 D) of per-sample gradients from token-pair tiles.

    X (m, T, a) features, or (m, T) integer token ids (embedding Gram); D (m, T, b) output-gradients of one
    floating dtype. same=True: X2, D2 are X1, D1; only upper tiles are computed, the result is symmetric.
    Inputs are assumed checked by the caller (ghost_gram / embedding_gram).
    """
    m1, T1, b = D1.shape
    m2, T2, _ = D2.shape
    out_dtype = torch.float64 if D1.dtype == torch.float64 else torch.float32
    out = torch.zeros(m1, m2, dtype=out_dtype, device=D1.device)
    if min(m1, m2, T1, T2, b) == 0:
        return out
    equality = X1.dim() == 2
    X1f, X2f = (X1.reshape(-1) if equality else X1.reshape(m1 * T1, -1)), (
        X2.reshape(-1) if equality else X2.reshape(m2 * T2, -1)
    )
    D1f, D2f = D1.reshape(m1 * T1, b), D2.reshape(m2 * T2, b)
    # square-ish tiles of ci x cj samples with ci T1 x cj T2 <= budget (equal sides when symmetric)
    side = max(1, math.isqrt(max(1, budget // (T1 * T2))))
    cj = min(m2, side) if same else chunk_size(m2, T1 * T2 * min(m1, side), budget)
    ci = cj if same else chunk_size(m1, cj * T1 * T2, budget)
    for i0 in range(0, m1, ci):
        i1 = min(m1, i0 + ci)
        rows = slice(i0 * T1, i1 * T1)
        for j0 in range(i0 if same else 0, m2, cj):
            j1 = min(m2, j0 + cj)
            cols = slice(j0 * T2, j1 * T2)
            Q = mm_fp32(D1f[rows], D2f[cols].T)
            if equality:
                Q = Q.masked_fill_(X1f[rows, None] != X2f[None, cols], 0)
            else:
                Q = Q.mul_(mm_fp32(X1f[rows], X2f[cols].T))
            out[i0:i1, j0:j1] = Q.reshape(i1 - i0, T1, j1 - j0, T2).sum(dim=(1, 3)).to(out_dtype)
    return mirror_upper(out) if same else out
