"""Ghost Gram of a linear layer: <G1_i, G2_j>_F for per-sample weight gradients G = D^T X, never formed.

    out[i, j] = sum_{t, s} (X1[i, t] . X2[j, s]) * (D1[i, t] . D2[j, s])

The Triton kernel tiles tokens of a pair of samples, forms the (tokens x tokens) tiles of X1 X2^T and
D1 D2^T with ``tl.dot`` in fp32, multiplies them elementwise and reduces; the T1 x T2 products never
reach memory. Short sequences are packed: a tile row is (sample, token slot), so T = 8 with
BLOCK_M = 64 puts 8 samples in one tile and ``tl.dot`` keeps its >= 16 tile sides.
Cost: 2 * m1 * m2 * T1 * T2 * (a + b) flops, against ~2 * m1 * m2 * a * b for the materialized Gram.
"""

from __future__ import annotations

import torch

from ._common import (
    FP32_PRECISIONS,
    check_linear_pair,
    chunk_size,
    common_float_dtype,
    dot_upcast,
    mirror_upper,
    next_pow2,
    pick_configs,
    resolve_backend,
    tl,
    triton,
)
from .blocked import blocked_gram

__all__ = ["ghost_gram", "ghost_gram_reference"]

# Elements of each (ci, cj, T1, T2) intermediate of the torch reference.
_REFERENCE_BUDGET = 1 << 25


def ghost_gram_reference(
    X1: torch.Tensor,
    D1: torch.Tensor,
    X2: torch.Tensor,
    D2: torch.Tensor,
    *,
    compute_dtype: torch.dtype | None = None,
    budget: int = _REFERENCE_BUDGET,
) -> torch.Tensor:
    """Plain-torch ghost Gram, chunked over samples so intermediates stay below ~2^25 elements.

    X1 (m1, T1, a), D1 (m1, T1, b), X2 (m2, T2, a), D2 (m2, T2, b) -> (m1, m2) in ``compute_dtype``
    (default: float64 for float64 inputs, float32 otherwise).
    """
    check_linear_pair(X1, D1, X2, D2)
    dt = compute_dtype or (torch.float64 if X1.dtype == torch.float64 else torch.float32)
    m1, T1, _ = X1.shape
    m2, T2, _ = X2.shape
    out = torch.zeros(m1, m2, dtype=dt, device=X1.device)
    cj = chunk_size(m2, T1 * T2, budget)
    ci = chunk_size(m1, cj * T1 * T2, budget)
    for j0 in range(0, m2, cj):
        x2, d2 = X2[j0 : j0 + cj].to(dt), D2[j0 : j0 + cj].to(dt)
        for i0 in range(0, m1, ci):
            x1, d1 = X1[i0 : i0 + ci].to(dt), D1[i0 : i0 + ci].to(dt)
            xx = torch.einsum("ita,jsa->ijts", x1, x2)
            dd = torch.einsum("itb,jsb->ijts", d1, d2)
            out[i0 : i0 + ci, j0 : j0 + cj] = (xx * dd).sum(dim=(2, 3))
    return out


def _samples_per_tile(block: int, tokens_pow2: int) -> int:
    """Samples packed in a tile side of ``block`` rows (1 when a sample's tokens fill the tile)."""
    return (block + tokens_pow2 - 1) // tokens_pow2


_GHOST_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (64, 64, 32, 4, 4),
        (64, 128, 64, 4, 3),
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
    ]
]
_GHOST_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})
_GHOST_KEY = ["T1", "T2", "A", "B"]  # not m1, m2: a tile of n samples is not re-tuned per block size


@triton.autotune(configs=pick_configs(_GHOST_CONFIGS, _GHOST_INTERPRET_CONFIG), key=_GHOST_KEY)
@triton.jit
def _ghost_gram_kernel(
    x1_ptr, d1_ptr, x2_ptr, d2_ptr, out_ptr,
    m1, m2, T1, T2, A, B,
    stride_x1i, stride_x1t, stride_d1i, stride_d1t,
    stride_x2i, stride_x2t, stride_d2i, stride_d2t,
    stride_oi, stride_oj,
    T1P: tl.constexpr, T2P: tl.constexpr, EQUALITY: tl.constexpr,
    SYMMETRIC: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Tile row r <-> (sample pid_i * BLOCK_I + r // TILE_T1, token t0 + r % TILE_T1); columns alike.
    BLOCK_I: tl.constexpr = (BLOCK_M + T1P - 1) // T1P
    TILE_T1: tl.constexpr = BLOCK_M // BLOCK_I
    BLOCK_J: tl.constexpr = (BLOCK_N + T2P - 1) // T2P
    TILE_T2: tl.constexpr = BLOCK_N // BLOCK_J

    pid = tl.program_id(0)
    num_pid_j = tl.cdiv(m2, BLOCK_J)
    pid_i = pid // num_pid_j
    pid_j = pid % num_pid_j
    if SYMMETRIC:
        # Only pairs with j >= i are needed: skip blocks strictly below the diagonal.
        if (pid_j + 1) * BLOCK_J <= pid_i * BLOCK_I:
            return

    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    i_idx = pid_i * BLOCK_I + rm // TILE_T1
    j_idx = pid_j * BLOCK_J + rn // TILE_T2
    i_ok = i_idx < m1
    j_ok = j_idx < m2
    x1_rows = x1_ptr + i_idx.to(tl.int64) * stride_x1i
    d1_rows = d1_ptr + i_idx.to(tl.int64) * stride_d1i
    x2_cols = x2_ptr + j_idx.to(tl.int64) * stride_x2i
    d2_cols = d2_ptr + j_idx.to(tl.int64) * stride_d2i

    # (BLOCK_I, BLOCK_J) sums over token pairs, fp32.
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for t0 in range(0, T1, TILE_T1):
        t = t0 + rm % TILE_T1
        row_ok = i_ok & (t < T1)
        x1_t = x1_rows + t * stride_x1t
        d1_t = d1_rows + t * stride_d1t
        for s0 in range(0, T2, TILE_T2):
            s = s0 + rn % TILE_T2
            col_ok = j_ok & (s < T2)
            x2_s = x2_cols + s * stride_x2t
            d2_s = d2_cols + s * stride_d2t
            if EQUALITY:
                # Embedding Gram: x1/x2 hold token ids (m, T); X1_i X2_j^T of one-hot rows is token equality.
                tok1 = tl.load(x1_t, mask=row_ok, other=-1)
                tok2 = tl.load(x2_s, mask=col_ok, other=-2)
                xx = (tok1[:, None] == tok2[None, :]).to(tl.float32)
            else:
                # (BLOCK_M, BLOCK_N) tile of X1_i X2_j^T; masked rows/columns load zeros.
                xx = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, A, BLOCK_K):
                    k = k0 + rk
                    k_ok = k < A
                    x1 = tl.load(x1_t[:, None] + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    x2 = tl.load(x2_s[None, :] + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                    if DOT_UPCAST:
                        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
                    xx = tl.dot(x1, x2, xx, input_precision=INPUT_PRECISION)
            # Same tile of D1_i D2_j^T.
            dd = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, B, BLOCK_K):
                k = k0 + rk
                k_ok = k < B
                d1 = tl.load(d1_t[:, None] + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                d2 = tl.load(d2_s[None, :] + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                if DOT_UPCAST:
                    d1, d2 = d1.to(tl.float32), d2.to(tl.float32)
                dd = tl.dot(d1, d2, dd, input_precision=INPUT_PRECISION)
            # Sum each (TILE_T1 x TILE_T2) block of token pairs into its (sample, sample) entry.
            prod = tl.reshape(xx * dd, (BLOCK_I, TILE_T1, BLOCK_J, TILE_T2))
            acc += tl.sum(tl.sum(prod, axis=3), axis=1)

    oi = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    oj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    out_ptrs = out_ptr + oi[:, None] * stride_oi + oj[None, :] * stride_oj
    tl.store(out_ptrs, acc, mask=(oi < m1)[:, None] & (oj < m2)[None, :])


def _ghost_gram_triton(
    X1: torch.Tensor,
    D1: torch.Tensor,
    X2: torch.Tensor,
    D2: torch.Tensor,
    symmetric: bool,
    fp32_precision: str,
) -> torch.Tensor:
    """Launch the fused kernel on same-dtype (fp32/bf16/fp16) D's; returns fp32 (m1, m2).

    X1, X2 are (m, T, a) features of D's dtype, or (m, T) integer token ids (the embedding Gram).
    """
    X1, D1, X2, D2 = (t.contiguous() for t in (X1, D1, X2, D2))
    equality = X1.dim() == 2
    m1, T1, B = D1.shape
    m2, T2, _ = D2.shape
    A = 1 if equality else X1.shape[2]
    out = torch.empty(m1, m2, dtype=torch.float32, device=X1.device)
    T1P, T2P = next_pow2(T1), next_pow2(T2)

    def grid(meta: dict) -> tuple[int]:
        bi = _samples_per_tile(meta["BLOCK_M"], T1P)
        bj = _samples_per_tile(meta["BLOCK_N"], T2P)
        return (triton.cdiv(m1, bi) * triton.cdiv(m2, bj),)

    _ghost_gram_kernel[grid](
        X1, D1, X2, D2, out,
        m1, m2, T1, T2, A, B,
        X1.stride(0), X1.stride(1), D1.stride(0), D1.stride(1),
        X2.stride(0), X2.stride(1), D2.stride(0), D2.stride(1),
        out.stride(0), out.stride(1),
        T1P=T1P, T2P=T2P, EQUALITY=equality, SYMMETRIC=symmetric,
        INPUT_PRECISION=fp32_precision if D1.dtype == torch.float32 else "tf32",
        DOT_UPCAST=dot_upcast(D1.dtype),
    )  # fmt: skip
    return mirror_upper(out) if symmetric else out


def ghost_gram(
    X1: torch.Tensor,
    D1: torch.Tensor,
    X2: torch.Tensor | None = None,
    D2: torch.Tensor | None = None,
    *,
    same: bool = False,
    backend: str = "auto",
    fp32_precision: str = "ieee",
    budget: int | None = None,
) -> torch.Tensor:
    """Gram <G1_i, G2_j>_F of per-sample linear-layer weight gradients G = D^T X, without forming G.

    X1 (m1, T1, a), D1 (m1, T1, b), X2 (m2, T2, a), D2 (m2, T2, b): layer inputs and output-gradients
    per token. Returns float32 (m1, m2) (float64 for float64 inputs, computed by the torch reference).
    Inputs may be float32 / bfloat16 / float16 (mixed dtypes are promoted); accumulation is fp32.

    same=True (or X2, D2 omitted, or X2 is X1 and D2 is D1): one sample set; only the upper triangle is
    computed and the result is exactly symmetric.
    backend: "auto" (Triton on CUDA, or on CPU when TRITON_INTERPRET=1; torch otherwise), "triton",
    "torch", or "blocked" (cuBLAS token-pair tiles: kernels/blocked.py). budget: elements of each
    intermediate of the torch and blocked paths (default: theirs).
    fp32_precision: tl.dot precision for float32 inputs, one of "ieee", "tf32x3", "tf32".
    """
    if (X2 is None) != (D2 is None):
        raise ValueError("give both X2 and D2, or neither (same=True)")
    if X2 is None or (X2 is X1 and D2 is D1):
        same = True
    if same:
        if not (X2 is None or (X2 is X1 and D2 is D1)):
            raise ValueError("same=True needs X2, D2 omitted or identical (`is`) to X1, D1")
        X2, D2 = X1, D1
    assert X2 is not None and D2 is not None
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    check_linear_pair(X1, D1, X2, D2)
    dtype = common_float_dtype(X1=X1, D1=D1, X2=X2, D2=D2)
    path = resolve_backend(backend, X1.device, dtype)
    if path == "torch":
        out = ghost_gram_reference(X1, D1, X2, D2, **({"budget": budget} if budget else {}))
        return mirror_upper(out) if same else out
    if path == "blocked":
        X1, D1, X2, D2 = (t.to(dtype) for t in (X1, D1, X2, D2))
        kw = {"budget": budget} if budget else {}
        return blocked_gram(X1, D1, X1, D1, same=True, **kw) if same else blocked_gram(X1, D1, X2, D2, **kw)
    if min(X1.shape[0], X2.shape[0], X1.shape[1], X2.shape[1], X1.shape[2], D1.shape[2]) == 0:
        return torch.zeros(X1.shape[0], X2.shape[0], dtype=torch.float32, device=X1.device)
    X1, D1, X2, D2 = (t.to(dtype) for t in (X1, D1, X2, D2))
    return _ghost_gram_triton(X1, D1, X2, D2, same, fp32_precision)
