"""Symmetric Gram G G^T of one sample set, upper triangle only (a symmetric rank-k update, BLAS's SYRK).

    out[i, j] = < G_i, G_j >  for i <= j  (block rows; the strict lower triangle of out is left zero)

The rows of G (m, K) are cut into R blocks of `block` rows. Band d (0 <= d < R) pairs block i with block i + d
for every i at once: both operands are strided views of G (no copy), so the band is one batched GEMM with fp32
accumulation (16-bit operands on tensor cores). R bands compute R (R + 1) / 2 of the R^2 block products: the
Gram's flops times (R + 1) / (2 R) (0.625 at R = 4), at R launches. Ragged rows (m not a multiple of block)
take one more GEMM: the last column stripe for every row.
"""

from __future__ import annotations

import torch

from ._common import bmm_fp32, mm_fp32

__all__ = ["SYRK_BLOCK", "gram_upper", "gram_upper_reference"]

# Rows per block: the trade between the flops saved and the efficiency of smaller GEMMs, measured on an H200 in
# benchmarks/results/symmetric_gram.md.
SYRK_BLOCK = 1024


def gram_upper_reference(G: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of G G^T in fp64, the rest zero: (m, m)."""
    return torch.triu(G.double() @ G.double().T)


def gram_upper(G: torch.Tensor, block: int = SYRK_BLOCK) -> torch.Tensor:
    """G (m, K) -> (m, m) fp32 (fp64 for fp64 G) holding G G^T on and above the diagonal blocks of `block`
    rows: every entry (i, j) with j >= i is exact to fp32 accumulation; entries below the diagonal inside a
    diagonal block hold their (mirror) value, the blocks below are zero. Callers read the upper triangle
    (kernels.mirror_upper). One GEMM when m <= block. ValueError for a non-2-D G or block < 1."""
    if G.dim() != 2:
        raise ValueError(f"G must be 2-D (samples, features), got shape {tuple(G.shape)}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    m = G.shape[0]
    R = m // block
    if R <= 1:
        return mm_fp32(G, G.T)
    out_dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
    out = torch.zeros(m, m, dtype=out_dtype, device=G.device)
    main = R * block
    tiles = out[:main, :main].view(R, block, R, block).permute(0, 2, 1, 3)  # (R, R, block, block) view of out
    rows = G[:main].view(R, block, G.shape[1])
    for d in range(R):
        band = bmm_fp32(rows[: R - d], rows[d:].transpose(1, 2))  # tiles (i, i + d): (R - d, block, block)
        tiles.diagonal(offset=d, dim1=0, dim2=1).copy_(band.permute(1, 2, 0))
    if main < m:  # the ragged last rows: their column stripe, for every row above and within them
        out[:, main:] = mm_fp32(G, G[main:].T)
    return out
