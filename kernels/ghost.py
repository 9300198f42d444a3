"""Ghost Gram of a linear layer: <G1_i, G2_j>_F for per-sample weight gradients G = D^T X, never formed.

    out[i, j] = sum_{t, s} (X1[i, t] . X2[j, s]) * (D1[i, t] . D2[j, s])

Two paths: the plain-torch reference (einsums over sample chunks; CPU, and float64 anywhere) and the
blocked path (cuBLAS GEMMs over token-pair tiles, blocked.py; the default on CUDA). ghost_gram picks one.
Cost: 2 * m1 * m2 * T1 * T2 * (a + b) flops, against ~2 * m1 * m2 * a * b for the materialized Gram.
"""

from __future__ import annotations

import torch

from ._common import check_linear_pair, chunk_size, common_float_dtype, mirror_upper, mm_fp32
from .blocked import TOKEN_PAIR_BUDGET, token_pair_gram

__all__ = ["ghost_gram", "ghost_gram_blocked", "ghost_gram_per_output", "ghost_gram_reference"]

# Elements of each (ci, cj, T1, T2) intermediate of the torch reference.
_REFERENCE_BUDGET = 1 << 25


def ghost_gram_reference(
    X1: torch.Tensor,
    D1: torch.Tensor,
    X2: torch.Tensor,
    D2: torch.Tensor,
    *,
    budget: int = _REFERENCE_BUDGET,
) -> torch.Tensor:
    """Plain-torch ghost Gram, chunked over samples so intermediates stay below ``budget`` elements.

    X1 (m1, T1, a), D1 (m1, T1, b), X2 (m2, T2, a), D2 (m2, T2, b) -> (m1, m2), computed in float64 when
    an input is float64, else in float32. ValueError on mismatched shapes or devices.
    """
    check_linear_pair(X1, D1, X2, D2)
    dt = torch.float64 if torch.float64 in (X1.dtype, D1.dtype, X2.dtype, D2.dtype) else torch.float32
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


def ghost_gram_blocked(
    X1: torch.Tensor,
    D1: torch.Tensor,
    X2: torch.Tensor,
    D2: torch.Tensor,
    *,
    same: bool = False,
    budget: int = TOKEN_PAIR_BUDGET,
) -> torch.Tensor:
    """Ghost Gram from cuBLAS token-pair tiles (blocked.py), on any device.

    Shapes as :func:`ghost_gram_reference`; inputs are promoted to one floating dtype. Returns float32
    (m1, m2) (float64 for float64 inputs); each of the two token-pair tiles holds at most ``budget``
    elements. same=True (X2 is X1, D2 is D1): upper tiles only, exactly symmetric. ValueError on bad inputs.
    """
    check_linear_pair(X1, D1, X2, D2)
    if same and not (X2 is X1 and D2 is D1):
        raise ValueError("same=True needs X2 is X1 and D2 is D1")
    dtype = common_float_dtype(X1=X1, D1=D1, X2=X2, D2=D2)
    X1, D1 = X1.to(dtype), D1.to(dtype)
    X2, D2 = (X1, D1) if same else (X2.to(dtype), D2.to(dtype))
    X1f, X2f = X1.reshape(-1, X1.shape[2]), X2.reshape(-1, X2.shape[2])

    def weigh(Q: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        return Q.mul_(mm_fp32(X1f[rows], X2f[cols].T))

    return token_pair_gram(D1, D2, weigh, same=same, budget=budget)


def ghost_gram(
    X1: torch.Tensor,
    D1: torch.Tensor,
    X2: torch.Tensor | None = None,
    D2: torch.Tensor | None = None,
    *,
    budget: int | None = None,
) -> torch.Tensor:
    """Gram <G1_i, G2_j>_F of per-sample linear-layer weight gradients G = D^T X, without forming G.

    X1 (m1, T1, a), D1 (m1, T1, b), X2 (m2, T2, a), D2 (m2, T2, b): layer inputs and output-gradients
    per token, float32 / bfloat16 / float16 / float64 (mixed dtypes are promoted). Returns float32
    (m1, m2) with fp32 accumulation (float64 for float64 inputs). X2, D2 omitted (or X2 is X1 and D2 is
    D1): one sample set, and the result is exactly symmetric.
    Path: on CUDA tensors of 32- or 16-bit dtype ghost_gram_blocked, on CPU and for float64
    ghost_gram_reference. budget: elements of each intermediate of that path (default: its own).
    ValueError on mismatched shapes, devices or non-floating inputs.
    """
    if (X2 is None) != (D2 is None):
        raise ValueError("give both X2 and D2, or neither")
    same = X2 is None or (X2 is X1 and D2 is D1)
    if X2 is None or D2 is None:
        X2, D2 = X1, D1
    check_linear_pair(X1, D1, X2, D2)
    dtype = common_float_dtype(X1=X1, D1=D1, X2=X2, D2=D2)
    kw = {"budget": budget} if budget else {}
    if X1.device.type == "cuda" and dtype != torch.float64:
        return ghost_gram_blocked(X1, D1, X2, D2, same=same, **kw)
    out = ghost_gram_reference(X1, D1, X2, D2, **kw)
    return mirror_upper(out) if same else out


def ghost_gram_per_output(
    X1: torch.Tensor,
    D1: torch.Tensor,
    X2: torch.Tensor,
    D2: torch.Tensor,
    *,
    budget: int | None = None,
) -> torch.Tensor:
    """Ghost Grams of C outputs that share their inputs: out[i, j, c] = sum_{t,s} (X1[i,t] . X2[j,s])
    (D1[i,c,t] . D2[j,c,s]) (the diagonal over outputs of a multi-output NTK).

    X1 (m1, T1, a), D1 (m1, C, T1, b), X2 (m2, T2, a), D2 (m2, C, T2, b) -> (m1, m2, C), float32 (float64 for
    float64 inputs). On CPU and for float64 each sample chunk's X1 X2^T is formed once for all outputs; on
    CUDA ghost_gram per output (the blocked path). budget: elements of each intermediate. ValueError on
    mismatched shapes.
    """
    if D1.dim() != 4 or D2.dim() != 4 or D1.shape[1] != D2.shape[1]:
        raise ValueError(f"D1 and D2 must be (m, C, T, b) with the same C, got {tuple(D1.shape)}, {tuple(D2.shape)}")
    C = D1.shape[1]
    check_linear_pair(X1, D1[:, 0], X2, D2[:, 0])
    dtype = common_float_dtype(X1=X1, D1=D1, X2=X2, D2=D2)
    if X1.device.type == "cuda" and dtype != torch.float64:
        kw = {"budget": budget} if budget else {}
        return torch.stack([ghost_gram_blocked(X1, D1[:, c], X2, D2[:, c], **kw) for c in range(C)], -1)
    dt = torch.float64 if dtype == torch.float64 else torch.float32
    m1, T1, _ = X1.shape
    m2, T2, _ = X2.shape
    out = torch.zeros(m1, m2, C, dtype=dt, device=X1.device)
    cj = chunk_size(m2, C * T1 * T2, budget or _REFERENCE_BUDGET)
    ci = chunk_size(m1, cj * C * T1 * T2, budget or _REFERENCE_BUDGET)
    for j0 in range(0, m2, cj):
        x2, d2 = X2[j0 : j0 + cj].to(dt), D2[j0 : j0 + cj].to(dt)
        for i0 in range(0, m1, ci):
            x1, d1 = X1[i0 : i0 + ci].to(dt), D1[i0 : i0 + ci].to(dt)
            xx = torch.einsum("ita,jsa->ijts", x1, x2)  # once for every output
            dd = torch.einsum("ictb,jcsb->ijcts", d1, d2)
            out[i0 : i0 + ci, j0 : j0 + cj] = torch.einsum("ijts,ijcts->ijc", xx, dd)
    return out
