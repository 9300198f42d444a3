"""Embedding Grams: token equality stands in for X_i X_j^T, so the (vocab x d) gradient is never formed.

An embedding's per-sample gradient is G_i[v] = sum_t [tok_it == v] D_it, hence
    embedding_gram:          <G1_i, G2_j> = sum_{t,s} [tok1_it == tok2_js] (D1_it . D2_js)
and, for a tied LM head (a Linear with the same (vocab, d) weight, inputs X2 and logit-gradients D2),
    embedding_linear_cross:  <G1_i, D2_j^T X2_j> = sum_{t,s} D2_js[tok1_it] (D1_it . X2_js).
embedding_gram has two paths: the plain-torch reference (CPU, and float64 anywhere) and the blocked path
(cuBLAS token-pair tiles with an equality mask, blocked.py; the default on CUDA). The cross term is plain
torch on every device.
"""

from __future__ import annotations

import math

import torch

from ._common import check_tokens, chunk_size, mirror_upper
from .blocked import TOKEN_PAIR_BUDGET, token_pair_gram

__all__ = ["embedding_grad_slice", "embedding_gram", "embedding_gram_blocked", "embedding_gram_reference",
           "embedding_linear_cross"]

_REFERENCE_BUDGET = 1 << 25


def _out_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _check_pair(tok1: torch.Tensor, D1: torch.Tensor, tok2: torch.Tensor, D2: torch.Tensor) -> torch.dtype:
    """Check tok (m, T) ids against D (m, T, d) on both sides; the promoted dtype of D1 and D2."""
    check_tokens("tok1", tok1, "D1", D1)
    check_tokens("tok2", tok2, "D2", D2)
    if D1.shape[2] != D2.shape[2]:
        raise ValueError(f"D1 has d={D1.shape[2]}, D2 has d={D2.shape[2]}")
    if not (D1.is_floating_point() and D2.is_floating_point()):
        raise ValueError("D1 and D2 must be floating point")
    return torch.promote_types(D1.dtype, D2.dtype)


def embedding_gram_reference(
    tok1: torch.Tensor, D1: torch.Tensor, tok2: torch.Tensor, D2: torch.Tensor, budget: int = _REFERENCE_BUDGET
) -> torch.Tensor:
    """Plain-torch embedding Gram, chunked over samples so intermediates stay below ``budget`` elements.

    tok (m, T) integer ids, D (m, T, d) -> (m1, m2) float32 (float64 if D1 or D2 is float64).
    ValueError on bad inputs, as :func:`embedding_gram`.
    """
    _check_pair(tok1, D1, tok2, D2)
    dt = _out_dtype(D1, D2)
    m1, T1 = tok1.shape
    m2, T2 = tok2.shape
    out = torch.zeros(m1, m2, dtype=dt, device=D1.device)
    cj = chunk_size(m2, T1 * T2, budget)
    ci = chunk_size(m1, cj * T1 * T2, budget)
    for j0 in range(0, m2, cj):
        t2, d2 = tok2[j0 : j0 + cj], D2[j0 : j0 + cj].to(dt)
        for i0 in range(0, m1, ci):
            t1, d1 = tok1[i0 : i0 + ci], D1[i0 : i0 + ci].to(dt)
            eq = (t1[:, None, :, None] == t2[None, :, None, :]).to(dt)  # (ci, cj, T1, T2)
            dd = torch.einsum("itb,jsb->ijts", d1, d2)
            out[i0 : i0 + ci, j0 : j0 + cj] = (eq * dd).sum(dim=(2, 3))
    return out


def embedding_gram_blocked(
    tok1: torch.Tensor,
    D1: torch.Tensor,
    tok2: torch.Tensor,
    D2: torch.Tensor,
    *,
    same: bool = False,
    budget: int = TOKEN_PAIR_BUDGET,
) -> torch.Tensor:
    """Embedding Gram from cuBLAS token-pair tiles (blocked.py) masked by token equality, on any device.

    tok (m, T) integer ids, D (m, T, d) promoted to one floating dtype. Returns float32 (m1, m2) (float64
    for float64 D); each token-pair tile holds at most ``budget`` elements. same=True (tok2 is tok1, D2 is
    D1): upper tiles only, exactly symmetric. ValueError on bad inputs.
    """
    dtype = _check_pair(tok1, D1, tok2, D2)
    if same and not (tok2 is tok1 and D2 is D1):
        raise ValueError("same=True needs tok2 is tok1 and D2 is D1")
    D1 = D1.to(dtype)
    D2 = D1 if same else D2.to(dtype)
    t1, t2 = tok1.reshape(-1), tok2.reshape(-1)

    def weigh(Q: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        return Q.masked_fill_(t1[rows, None] != t2[None, cols], 0)

    return token_pair_gram(D1, D2, weigh, same=same, budget=budget)


def embedding_gram(
    tok1: torch.Tensor,
    D1: torch.Tensor,
    tok2: torch.Tensor | None = None,
    D2: torch.Tensor | None = None,
    *,
    budget: int | None = None,
) -> torch.Tensor:
    """Gram of per-sample embedding-weight gradients: tok (m, T) integer ids, D (m, T, d) output-gradients.

    Returns float32 (m1, m2) with fp32 accumulation (float64 for float64 D). tok2, D2 omitted (or tok2 is
    tok1 and D2 is D1): one sample set, exactly symmetric. Token ids need not be in any range (they are
    only compared). Path: on CUDA tensors of 32- or 16-bit dtype embedding_gram_blocked, on CPU and for
    float64 embedding_gram_reference. budget: elements of each intermediate of that path (default: its
    own). ValueError on mismatched shapes, non-integer ids or non-floating D.
    """
    if (tok2 is None) != (D2 is None):
        raise ValueError("give both tok2 and D2, or neither")
    same = tok2 is None or (tok2 is tok1 and D2 is D1)
    if tok2 is None or D2 is None:
        tok2, D2 = tok1, D1
    dtype = _check_pair(tok1, D1, tok2, D2)
    kw = {"budget": budget} if budget else {}
    blocked = D1.device.type == "cuda" and dtype != torch.float64
    limit = budget or (TOKEN_PAIR_BUDGET if blocked else _REFERENCE_BUDGET)
    if tok1.shape[1] * tok2.shape[1] > max(limit, 1):  # one sample pair's token pairs exceed the budget
        out = _by_token_blocks(tok1, D1, tok2, D2, math.isqrt(limit), budget)
    elif blocked:
        return embedding_gram_blocked(tok1, D1, tok2, D2, same=same, **kw)
    else:
        out = embedding_gram_reference(tok1, D1, tok2, D2, **kw)
    return mirror_upper(out) if same else out


def _by_token_blocks(tok1, D1, tok2, D2, side: int, budget: int | None) -> torch.Tensor:
    """The Gram as the sum of the Grams of token blocks of `side` tokens (exact: it is a sum over token pairs),
    for sequences so long that one sample pair's token-pair matrix exceeds the budget."""
    side, out = max(1, side), None
    for a in range(0, tok1.shape[1], side):
        for b in range(0, tok2.shape[1], side):
            part = embedding_gram(tok1[:, a : a + side], D1[:, a : a + side], tok2[:, b : b + side],
                                  D2[:, b : b + side], budget=budget)
            out = part if out is None else out.add_(part)
    return out


def embedding_grad_slice(tok: torch.Tensor, D: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Per-sample gradients of embedding rows r0:r1, G_i[v] = sum_t [tok_it == v] D_it, flattened row-major:
    (m, (r1 - r0) d) in D's dtype (fp32 accumulation for 16-bit D). tok (m, T) ids, D (m, T, d)."""
    check_tokens("tok", tok, "D", D)
    onehot = (tok[:, None, :] == torch.arange(r0, r1, device=tok.device)[None, :, None])  # (m, r, T)
    acc = D.dtype if D.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.bmm(onehot.to(acc), D.to(acc)).to(D.dtype).flatten(1)


def embedding_linear_cross(
    tok1: torch.Tensor, D1: torch.Tensor, X2: torch.Tensor, D2: torch.Tensor, budget: int = _REFERENCE_BUDGET,
    check_ids: bool = True,
) -> torch.Tensor:
    """Cross Gram of an embedding (tok1 (m1, T1), D1 (m1, T1, d)) and a Linear sharing its (V, d) weight.

    X2 (m2, T2, d): the Linear's inputs; D2 (m2, T2, V): its output-gradients. Returns (m1, m2), float32
    (float64 if any input is float64). Plain torch (a gather and two einsums, chunked): in LMs D2 is
    nonzero at few positions, so T2 is small after the engine drops all-zero time steps. check_ids=False skips
    the range check of tok1 (a host sync) for callers whose ids an embedding has already read.
    """
    check_tokens("tok1", tok1, "D1", D1)
    if X2.dim() != 3 or D2.dim() != 3 or X2.shape[:2] != D2.shape[:2]:
        raise ValueError(f"X2 {tuple(X2.shape)} and D2 {tuple(D2.shape)} must be (m2, T2, d) and (m2, T2, V)")
    if X2.shape[2] != D1.shape[2]:
        raise ValueError(f"D1 has d={D1.shape[2]} but X2 has d={X2.shape[2]}")
    V = D2.shape[2]
    if check_ids and tok1.numel() and (int(tok1.min()) < 0 or int(tok1.max()) >= V):
        raise ValueError(f"tok1 ids must lie in [0, {V}) (the Linear's output size)")
    dt = _out_dtype(D1, X2, D2)
    m1, T1 = tok1.shape
    m2, T2, _ = X2.shape
    out = torch.zeros(m1, m2, dtype=dt, device=D1.device)
    cj = chunk_size(m2, T1 * T2, budget)
    ci = chunk_size(m1, cj * T1 * T2, budget)
    for j0 in range(0, m2, cj):
        x2, d2 = X2[j0 : j0 + cj].to(dt), D2[j0 : j0 + cj]
        for i0 in range(0, m1, ci):
            t1, d1 = tok1[i0 : i0 + ci], D1[i0 : i0 + ci].to(dt)
            w = d2[:, :, t1.reshape(-1)].to(dt).reshape(d2.shape[0], T2, t1.shape[0], T1)  # (cj, T2, ci, T1)
            dx = torch.einsum("itd,jsd->ijts", d1, x2)
            out[i0 : i0 + ci, j0 : j0 + cj] = torch.einsum("ijts,jsit->ij", dx, w)
    return out
