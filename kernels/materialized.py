"""Materialized Gram of a linear layer: per-sample gradients G = D^T X formed in slices, then G1 G2^T.

    out[i, j] = < D1_i^T X1_i , D2_j^T X2_j >_F

The weight's rows (output features b) are cut into slices sized to a memory budget; for each slice the
per-sample gradients of all samples (m, b_slice, a) are formed with one batched matmul and their Gram
is added with one matmul. Both are cuBLAS GEMMs with fp32 accumulation (bf16 operands on tensor cores in
bf16 mode); every per-sample gradient entry is formed exactly once, and never all at once.
Cost: 2 (m1 T1 + m2 T2) a b + 2 m1 m2 a b flops; one sample set (same=True): 2 m T a b + about m^2 a b.
"""

from __future__ import annotations

import torch

from ._common import bmm_fp32, check_linear_pair, common_float_dtype, mirror_upper, mm_fp32
from .syrk import SYRK_BLOCK, gram_upper

__all__ = ["grad_slice", "gram_split_k", "materialized_gram", "materialized_gram_reference", "slice_rows",
           "split_k_pieces"]

# Elements of per-sample gradient slices held at once (both sides), ~1 GiB in fp32.
DEFAULT_BUDGET = 1 << 28

# A few-sample fp32 Gram (m1 m2 <= 128^2 outputs, CUDA cores) is one or a few output tiles with a very long K:
# cuBLAS runs it at ~20 TFLOP/s on an H100. Cut K into up to SPLIT_K pieces (>= SPLIT_K_MIN_K long each) run as
# one batched GEMM and summed: 1.7x faster at GPT-Neo-125M shapes (benchmarks/results/gemm_shapes.md). TF32 and
# bf16 Grams run on tensor cores at full speed unsplit.
SPLIT_K, SPLIT_K_MIN_K = 256, 2048


def materialized_gram_reference(
    X1: torch.Tensor, D1: torch.Tensor, X2: torch.Tensor, D2: torch.Tensor
) -> torch.Tensor:
    """Unsliced reference: forms every per-sample gradient (m, b, a) in fp64 and dots them."""
    check_linear_pair(X1, D1, X2, D2)
    G1 = torch.einsum("itb,ita->iba", D1.double(), X1.double()).flatten(1)
    G2 = torch.einsum("jtb,jta->jba", D2.double(), X2.double()).flatten(1)
    return G1 @ G2.T


def grad_slice(X: torch.Tensor, D: torch.Tensor, b0: int, b1: int, keep: torch.dtype) -> torch.Tensor:
    """Per-sample gradients D_i^T X_i of weight rows b0:b1, flattened row-major: (m, (b1 - b0) a), in `keep`
    (X (m, T, a), D (m, T, b); fp32 accumulation)."""
    Dt = D[:, :, b0:b1].transpose(1, 2)
    if keep in (torch.bfloat16, torch.float16):  # GEMMs accumulate in fp32 and round once to `keep`
        return torch.bmm(Dt, X).flatten(1)
    return bmm_fp32(Dt, X).to(keep).flatten(1)  # (m, bs * a), fp32 accumulation


def split_k_pieces(m1: int, m2: int, K: int, dtype: torch.dtype, cuda: bool, tf32: bool) -> int:
    """Pieces to cut an (m1, K) x (K, m2) Gram's K into (1: one GEMM): CUDA-core fp32 with few outputs only."""
    if not cuda or dtype != torch.float32 or tf32 or m1 * m2 > 128 * 128:
        return 1
    return max(1, min(SPLIT_K * 64 * 64 // (m1 * m2), K // SPLIT_K_MIN_K, SPLIT_K))


def slice_rows(b: int, per_row: int, budget: int) -> int:
    """Weight rows per slice: as many of b as fit in ``budget`` elements at ``per_row`` each (at least 1),
    rounded down to a multiple of 64 (else of 8) when the weight is cut into several slices."""
    step = max(1, min(b, budget // max(1, per_row)))
    if step < b:  # slices start on multiples of 64 rows: misaligned D slices send cuBLAS to slow kernels (3x)
        step = step // 64 * 64 or step // 8 * 8 or step
    return step


def gram_split_k(G1: torch.Tensor, G2: torch.Tensor, pieces: int) -> torch.Tensor:
    """G1 (m1, K) @ G2 (m2, K)^T with K cut into `pieces` equal parts (one batched GEMM, then their sum) and
    the remainder; fp32 accumulation and result (float64 for float64 inputs), as mm_fp32."""
    m1, K = G1.shape
    k = K // max(1, pieces)
    if pieces < 2 or k == 0:
        return mm_fp32(G1, G2.T)
    main = pieces * k
    A = G1[:, :main].unflatten(1, (pieces, k)).transpose(0, 1)  # (pieces, m1, k), no copy
    B = G2[:, :main].unflatten(1, (pieces, k)).transpose(0, 1)
    out = bmm_fp32(A, B.transpose(1, 2)).sum(0)
    if main < K:
        out += mm_fp32(G1[:, main:], G2[:, main:].T)
    return out


def materialized_gram(
    X1: torch.Tensor,
    D1: torch.Tensor,
    X2: torch.Tensor | None = None,
    D2: torch.Tensor | None = None,
    *,
    same: bool = False,
    budget: int = DEFAULT_BUDGET,
    symmetrize: bool = True,
    syrk_block: int = SYRK_BLOCK,
) -> torch.Tensor:
    """Gram <G1_i, G2_j>_F of per-sample gradients G = D^T X of a linear layer, formed slice by slice.

    X (m, T, a) layer inputs, D (m, T, b) output-gradients. Returns float32 (m1, m2) (float64 for float64
    inputs). bf16/fp16 inputs: per-sample gradients are rounded to that dtype and contracted on tensor
    cores with fp32 accumulation; float32 inputs stay float32 throughout (TF32 follows torch's setting).
    same=True (or X2, D2 omitted): one sample set, each slice formed once and its Gram computed on and above
    the diagonal blocks of syrk_block samples only (syrk.gram_upper: (R + 1) / (2 R) of the flops for R
    blocks), the result mirrored exactly symmetric; symmetrize=False returns it unmirrored, valid on and
    above the diagonal (kernels.mirror_upper), for a caller that mirrors a larger sum once.
    budget: elements of per-sample gradient slices held at once.
    """
    if (X2 is None) != (D2 is None):
        raise ValueError("give both X2 and D2, or neither")
    if same and X2 is not None and (X2 is not X1 or D2 is not D1):
        raise ValueError("same=True is the Gram of (X1, D1) with itself: omit X2 and D2, or pass same=False")
    if X2 is None or (X2 is X1 and D2 is D1):
        same = True
    if same:
        X2, D2 = X1, D1
    assert X2 is not None and D2 is not None
    check_linear_pair(X1, D1, X2, D2)
    dtype = common_float_dtype(X1=X1, D1=D1, X2=X2, D2=D2)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    m1, _, a = X1.shape
    m2 = X2.shape[0]
    b = D1.shape[2]
    if min(m1, m2, a, b, X1.shape[1], X2.shape[1]) == 0:
        return torch.zeros(m1, m2, dtype=out_dtype, device=X1.device)
    X1, D1, X2, D2 = (t.to(dtype) for t in (X1, D1, X2, D2))
    step = slice_rows(b, (m1 + (0 if same else m2)) * a, budget)
    out = None
    for b0 in range(0, b, step):
        b1 = min(b, b0 + step)
        G1 = grad_slice(X1, D1, b0, b1, dtype)
        G2 = G1 if same else grad_slice(X2, D2, b0, b1, dtype)
        if same and m1 > syrk_block:
            part = gram_upper(G1, syrk_block).to(out_dtype)
        else:
            pieces = split_k_pieces(m1, m2, G1.shape[1], G1.dtype, G1.is_cuda,
                                    torch.backends.cuda.matmul.allow_tf32)
            part = gram_split_k(G1, G2, pieces).to(out_dtype)
        out = part if out is None else out.add_(part)
    assert out is not None
    if same and symmetrize:
        out = mirror_upper(out)
    return out
