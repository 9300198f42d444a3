"""Token-pair tiling shared by the blocked (cuBLAS) paths of the ghost and embedding Grams.

    out[i, j] = sum_{t, s} P[(i, t), (j, s)] * (D1[i, t] . D2[j, s])

with P = X1 X2^T (ghost.py) or P = [tok1 == tok2] (embedding.py); each caller supplies its P. Rows are
(sample, token) pairs; a tile of ci samples x cj samples forms its (ci T1) x (cj T2) token-pair matrix
D1 D2^T with one GEMM (fp32 accumulation, 16-bit operands on tensor cores), weighs it by P, and sums each
T1 x T2 block. The token-pair tiles reach memory (at most `budget` elements each); a symmetric Gram
computes only the tiles on and above the diagonal.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._common import chunk_size, mirror_upper, mm_fp32

__all__ = ["TOKEN_PAIR_BUDGET", "token_pair_gram"]

# Elements of one token-pair tile (each of P and D1 D2^T), 1 GiB in fp32.
TOKEN_PAIR_BUDGET = 1 << 28

# weigh(Q, rows, cols) -> Q * P[rows, cols]: Q is an fp32 (fp64) tile that it may overwrite.
Weigh = Callable[[torch.Tensor, slice, slice], torch.Tensor]


def token_pair_gram(
    D1: torch.Tensor,
    D2: torch.Tensor,
    weigh: Weigh,
    *,
    same: bool = False,
    budget: int = TOKEN_PAIR_BUDGET,
) -> torch.Tensor:
    """(m1, m2) Gram sum_{t,s} P[(i,t), (j,s)] (D1[i,t] . D2[j,s]) from token-pair tiles; no input checks.

    D1 (m1, T1, b), D2 (m2, T2, b) of one floating dtype -> float32 (float64 for float64 D). weigh(Q, rows,
    cols) returns the tile Q = D1[rows] D2[cols]^T (rows, cols: slices of the flattened (sample, token)
    index) times P[rows, cols], and may do it in place. same=True: D2 is D1 and P is symmetric; only tiles
    on and above the diagonal are computed and the result is exactly symmetric. Each tile holds at most
    `budget` elements, unless one sample pair's T1 T2 exceeds it.
    """
    m1, T1, b = D1.shape
    m2, T2, _ = D2.shape
    out_dtype = torch.float64 if D1.dtype == torch.float64 else torch.float32
    out = torch.zeros(m1, m2, dtype=out_dtype, device=D1.device)
    if min(m1, m2, T1, T2, b) == 0:
        return out
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
            Q = weigh(mm_fp32(D1f[rows], D2f[cols].T), rows, cols)
            out[i0:i1, j0:j1] = Q.reshape(i1 - i0, T1, j1 - j0, T2).sum(dim=(1, 3)).to(out_dtype)
    return mirror_upper(out) if same else out
