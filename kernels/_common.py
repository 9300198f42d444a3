"""Shared helpers of the Gram contractions: input checks, fp32-accumulating matmuls, chunking, the mirror.

Nothing here imports from ``minintk``: ``minintk.kernels`` is self-contained.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "common_float_dtype",
    "check_linear_pair",
    "check_tokens",
    "mm_fp32",
    "bmm_fp32",
    "mirror_upper",
    "chunk_size",
]


def common_float_dtype(**tensors: torch.Tensor) -> torch.dtype:
    """The promoted floating dtype of the named tensors; ValueError if one is not floating point."""
    dtype = None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    assert dtype is not None
    return dtype


def _check_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")


def check_linear_pair(X1: torch.Tensor, D1: torch.Tensor, X2: torch.Tensor, D2: torch.Tensor) -> None:
    """Check X1 (m1, T1, a), D1 (m1, T1, b), X2 (m2, T2, a), D2 (m2, T2, b); ValueError naming the mismatch."""
    for name, t in (("X1", X1), ("D1", D1), ("X2", X2), ("D2", D2)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (samples, tokens, features), got shape {tuple(t.shape)}")
    if X1.shape[:2] != D1.shape[:2]:
        raise ValueError(f"X1 {tuple(X1.shape)} and D1 {tuple(D1.shape)} must share (m1, T1)")
    if X2.shape[:2] != D2.shape[:2]:
        raise ValueError(f"X2 {tuple(X2.shape)} and D2 {tuple(D2.shape)} must share (m2, T2)")
    if X1.shape[2] != X2.shape[2]:
        raise ValueError(f"input features differ: X1 has a={X1.shape[2]}, X2 has a={X2.shape[2]}")
    if D1.shape[2] != D2.shape[2]:
        raise ValueError(f"output features differ: D1 has b={D1.shape[2]}, D2 has b={D2.shape[2]}")
    _check_device(X1=X1, D1=D1, X2=X2, D2=D2)


def check_tokens(name: str, tok: torch.Tensor, dname: str, D: torch.Tensor) -> None:
    """Check tok (m, T) integer ids against D (m, T, b)."""
    if tok.dim() != 2:
        raise ValueError(f"{name} must be 2-D (samples, tokens), got shape {tuple(tok.shape)}")
    if tok.is_floating_point() or tok.is_complex() or tok.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got dtype {tok.dtype}")
    if D.dim() != 3:
        raise ValueError(f"{dname} must be 3-D (samples, tokens, features), got shape {tuple(D.shape)}")
    if tuple(tok.shape) != tuple(D.shape[:2]):
        raise ValueError(f"{name} {tuple(tok.shape)} and {dname} {tuple(D.shape)} must share (m, T)")


def chunk_size(total: int, per_item: int, budget: int) -> int:
    """How many items of ``per_item`` elements fit in ``budget`` elements (at least 1, at most ``total``)."""
    return max(1, min(total, budget // max(1, per_item)))


_OUT_DTYPE_OK: dict[str, bool] = {}


def _out_dtype_call(op: Callable, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``op(a, b, out_dtype=float32)`` where this torch supports it on CUDA, else None (remembered)."""
    if a.device.type != "cuda" or _OUT_DTYPE_OK.get(name) is False:
        return None
    try:
        out = op(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        _OUT_DTYPE_OK[name] = False
        return None
    _OUT_DTYPE_OK[name] = True
    return out


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (n, k) @ b (k, p) with fp32 accumulation and an fp32 (float64 for float64 inputs) result.

    16-bit inputs on CUDA use ``torch.mm(..., out_dtype=torch.float32)`` when available (tensor cores,
    fp32 output); otherwise they are cast to fp32 first.
    """
    if a.dtype in (torch.float16, torch.bfloat16) and a.dtype == b.dtype:
        out = _out_dtype_call(torch.mm, "mm", a, b)
        if out is not None:
            return out
    if a.dtype == torch.float64 or b.dtype == torch.float64:
        return a.double() @ b.double()
    return a.float() @ b.float()


def bmm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a (B, n, k) @ b (B, k, p) with an fp32 result; see :func:`mm_fp32`."""
    if a.dtype in (torch.float16, torch.bfloat16) and a.dtype == b.dtype:
        out = _out_dtype_call(torch.bmm, "bmm", a, b)
        if out is not None:
            return out
    if a.dtype == torch.float64 or b.dtype == torch.float64:
        return torch.bmm(a.double(), b.double())
    return torch.bmm(a.float(), b.float())


def mirror_upper(out: torch.Tensor) -> torch.Tensor:
    """Symmetric matrix from the upper triangle (diagonal included) of square ``out``; the rest is ignored."""
    upper = torch.triu(out)
    return upper + torch.triu(out, diagonal=1).transpose(0, 1)
