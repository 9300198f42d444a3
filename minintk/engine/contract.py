"""Contract: per layer group and pair of sample blocks, the Gram of the captured factors, summed over parameters
and their uses (a tied parameter's cross terms included), in fp64. docs/theory.md sections 2.3-2.4."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..kernels import embedding_gram, embedding_linear_cross, ghost_gram, materialized_gram
from .capture import Capture
from .layers import EMBED, NORM, Use
from .stats import Stats

STRATEGIES = ("auto", "ghost", "materialized", "loop", "func")


@dataclass(frozen=True)
class Workspace:
    """Element budgets of the kernels' intermediates: token-pair tiles (ghost, embedding) and per-sample gradient
    slices (materialized form), from the plan's workspace bytes."""

    kernel_elems: int = 1 << 28
    mat_elems: int = 1 << 28

    @staticmethod
    def of(workspace_bytes: int, cap_itemsize: int) -> Workspace:
        return Workspace(max(1, workspace_bytes // 24),  # ~3 intermediates of 8-byte elements
                         # slices in the capture dtype; half the workspace leaves room for an fp32 operand copy
                         max(1, workspace_bytes // (2 * cap_itemsize)))


def choose_form(m1: int, T1: int, m2: int, T2: int, r: int, c: int, same: bool, strategy: str = "auto") -> str:
    """"ghost" or "materialized" for a Linear's (m1 x m2) Gram with T1, T2 tokens and an r x c weight: the one
    with fewer flops (ghost ~ m1 m2 T1 T2 (r + c); materialized ~ (m1 T1 + m2 T2) r c + m1 m2 r c), unless
    `strategy` forces one."""
    if strategy in ("ghost", "materialized"):
        return strategy
    ghost = m1 * m2 * T1 * T2 * (r + c)
    mat = (m1 * T1 + (0 if same else m2 * T2)) * r * c + m1 * m2 * r * c
    return "ghost" if ghost < mat else "materialized"


def contract(uses: list[Use], cI: Capture, cJ: Capture, same: bool, ws: Workspace, strategy: str = "auto",
             stats: Stats | None = None, device: torch.device | None = None) -> torch.Tensor | None:
    """sum over parameters of <G_i, G_j> for the uses of one layer group: (mI C, mJ C) fp64 (None if no use)."""
    K = None

    def add(t: torch.Tensor, w: float = 1.0) -> None:  # K += w t in fp64, one kernel per term
        nonlocal K
        if K is None:
            K = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        K.add_(t, alpha=w)

    vec_keys: dict[int, list] = {}
    for u in uses:
        for p, key in ((u.bias, "bias"), (u.weight if u.kind == NORM else None, "weight")):
            if p is not None and (u.label, key) in cI.vec:
                vec_keys.setdefault(id(p), []).append((u.label, key))
    if vec_keys:  # every vector parameter's per-sample gradient side by side: one matmul
        t0 = time.perf_counter()
        gI = torch.cat([_sum([cI.vec[k] for k in keys]) for keys in vec_keys.values()], 1)
        gJ = gI if same else torch.cat([_sum([cJ.vec[k] for k in keys]) for keys in vec_keys.values()], 1)
        add(gI @ gJ.T)
        _note(stats, "vector", t0, device, len(vec_keys))
    by_param: dict[int, list[Use]] = {}
    for u in uses:
        if u.weight is not None and u.kind != NORM:
            by_param.setdefault(id(u.weight), []).append(u)
    for us in by_param.values():
        for u in us:
            for v in us:  # every pair of uses of one parameter (a tied one's cross terms)
                t0 = time.perf_counter()
                tile, form = weight_pair(u, v, cI, cJ, same and u is v, ws, strategy)
                add(tile, u.w_mult * v.w_mult)
                _note(stats, form, t0, device)
    return K


def weight_pair(u: Use, v: Use, cI: Capture, cJ: Capture, same: bool, ws: Workspace, strategy: str):
    """(<G_i^u, G_j^v> over the two blocks, the form used) for two uses of one weight."""
    lu, lv = u.label, v.label
    if u.kind == EMBED and v.kind == EMBED:
        return embedding_gram(cI.tok[lu], cI.B[lu], cJ.tok[lv], cJ.B[lv], budget=ws.kernel_elems), "embedding"
    if u.kind == EMBED:
        return embedding_linear_cross(cI.tok[lu], cI.B[lu], cJ.B[lv], cJ.A[lv], budget=ws.kernel_elems), "tied-cross"
    if v.kind == EMBED:
        cross = embedding_linear_cross(cJ.tok[lv], cJ.B[lv], cI.B[lu], cI.A[lu], budget=ws.kernel_elems)
        return cross.T, "tied-cross"
    a1, b1, a2, b2 = cI.A[lu], cI.B[lu], cJ.A[lv], cJ.B[lv]
    form = choose_form(a1.shape[0], a1.shape[1], a2.shape[0], a2.shape[1], a1.shape[2], b2.shape[2], same, strategy)
    if form == "ghost":
        return ghost_gram(b1, a1, b2, a2, budget=ws.kernel_elems), form
    if same:  # the tile loop makes the diagonal tiles symmetric once, over all layers
        return materialized_gram(b1, a1, b1, a1, same=True, symmetrize=False, budget=ws.mat_elems), form
    return materialized_gram(b1, a1, b2, a2, budget=ws.mat_elems), form


def _sum(ts: list[torch.Tensor]) -> torch.Tensor:
    """Sum of a non-empty list of tensors (no kernel for a single one, unlike sum())."""
    out = ts[0]
    for t in ts[1:]:
        out = out + t
    return out


def _note(stats: Stats | None, form: str, t0: float, device, times: int = 1) -> None:
    if stats is not None:
        for _ in range(times):
            stats.count(form)
        stats.time_form(form, t0, device)
