"""Contract: per layer group and pair of sample blocks, the Gram of the captured factors, summed over parameters
and their uses (a tied parameter's cross terms included), in fp64. docs/theory.md sections 2.3-2.4."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..kernels import embedding_gram, embedding_linear_cross, ghost_gram, ghost_gram_per_output, materialized_gram
from .capture import Capture
from .layers import EMBED, LINEAR, NORM, Use
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
             stats: Stats | None = None, device: torch.device | None = None, outputs: str = "full",
             C: int = 1) -> torch.Tensor | None:
    """sum over parameters of <G_i, G_j> for the uses of one layer group, in fp64 (None if no use): (mI C, mJ C)
    for outputs "full", (mI, mJ) summed over the C outputs for "trace", (mI, mJ, C) for "diagonal"."""
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
    if vec_keys:  # every vector parameter's per-sample gradient side by side: one matmul (one per output)
        t0 = time.perf_counter()
        gI = torch.cat([_sum([cI.vec[k] for k in keys]) for keys in vec_keys.values()], 1)
        gJ = gI if same else torch.cat([_sum([cJ.vec[k] for k in keys]) for keys in vec_keys.values()], 1)
        add(_per_output(lambda c: _rows(gI, C, c, outputs) @ _rows(gJ, C, c, outputs).T, C, outputs))
        _note(stats, "vector", t0, device, len(vec_keys))
    by_param: dict[int, list[Use]] = {}
    for u in uses:
        if u.weight is not None and u.kind != NORM:
            by_param.setdefault(id(u.weight), []).append(u)
    for us in by_param.values():
        for u in us:
            for v in us:  # every pair of uses of one parameter (a tied one's cross terms)
                t0 = time.perf_counter()
                pair = Pair(u, v, cI, cJ, same and u is v, ws, strategy, outputs, C)
                tile, form = pair.gram()
                add(tile, u.w_mult * v.w_mult)
                _note(stats, form, t0, device)
    return K


def _rows(t: torch.Tensor, C: int, c: int | None, outputs: str) -> torch.Tensor:
    """A virtual-sample factor (m C, ...) restricted to output c (m, ...) in "diagonal" mode; else itself."""
    if outputs != "diagonal" or C == 1 or c is None:
        return t
    return t.view(t.shape[0] // C, C, *t.shape[1:])[:, c]


def _per_output(gram, C: int, outputs: str) -> torch.Tensor:
    """gram(c) for every output, stacked (m1, m2, C), in "diagonal" mode; else gram(None)."""
    if outputs != "diagonal":
        return gram(None)
    return torch.stack([gram(c) for c in range(C)], -1)


@dataclass(frozen=True)
class Pair:
    """Two uses u, v of one weight over the samples of two captures; gram() -> (their Gram, the form used)."""

    u: Use
    v: Use
    cI: Capture
    cJ: Capture
    same: bool
    ws: Workspace
    strategy: str
    outputs: str
    C: int

    def gram(self):
        u, v = self.u, self.v
        if u.kind == EMBED and v.kind == EMBED:
            return self._each(self._embedding), "embedding"
        if u.kind == EMBED or v.kind == EMBED:
            return self._each(self._tied_cross, side_by_side=True), "tied-cross"
        a1, b2 = self.cI.A[u.label], self.cJ.B[v.label]
        m1, T1 = a1.shape[0] // (self.C if self.outputs == "diagonal" else 1), a1.shape[1]
        m2, T2 = b2.shape[0] // (self.C if self.outputs == "diagonal" else 1), b2.shape[1]
        form = choose_form(m1, T1, m2, T2, a1.shape[2], b2.shape[2], self.same, self.strategy)
        if form == "ghost" and self.outputs == "diagonal" and self.C > 1 and u.kind == LINEAR and v.kind == LINEAR:
            return self._ghost_per_output(), form  # the inputs' token-pair Gram once for every output
        return self._each(lambda c: self._dense(form, c)), form

    def _ghost_per_output(self) -> torch.Tensor:
        u, v, C = self.u, self.v, self.C
        D1, D2 = self.cI.A[u.label], self.cJ.A[v.label]  # virtual samples (m C, T, d_out) -> (m, C, T, d_out)
        return ghost_gram_per_output(self.cI.B[u.label], D1.view(-1, C, *D1.shape[1:]), self.cJ.B[v.label],
                                     D2.view(-1, C, *D2.shape[1:]), budget=self.ws.kernel_elems)

    def _each(self, gram, side_by_side: bool = False) -> torch.Tensor:
        """gram(c) per output for "diagonal"; for "trace" either one call (the factors hold the outputs side by
        side) or, for pairs whose two layouts differ (a tied embedding and head), the sum of per-output calls."""
        if self.outputs == "diagonal":
            return torch.stack([gram(c) for c in range(self.C)], -1)
        if self.outputs == "trace" and side_by_side and self.C > 1:
            return _sum([gram(c) for c in range(self.C)])
        return gram(None)

    def _get(self, cap: Capture, field: str, use: Use, c: int | None) -> torch.Tensor:
        """A factor, restricted to output c: a row slice of virtual samples ("diagonal"), a feature slice of the
        side-by-side layout ("trace", per-output D only)."""
        t = getattr(cap, field)[use.label]
        per_output = field == ("A" if use.kind == LINEAR else "B")  # D: A for Linear, B for Conv1D and Embedding
        if c is None or not per_output:
            return t
        if self.outputs == "diagonal":
            return _rows(t, self.C, c, "diagonal")
        d = t.shape[-1] // self.C
        return t[..., c * d : (c + 1) * d]

    def _embedding(self, c):
        u, v, ws = self.u, self.v, self.ws
        return embedding_gram(self.cI.tok[u.label], self._get(self.cI, "B", u, c), self.cJ.tok[v.label],
                              self._get(self.cJ, "B", v, c), budget=ws.kernel_elems)

    def _tied_cross(self, c):
        # ids need no range check here (a sync): the embedding's own forward pass has read them
        u, v, ws = self.u, self.v, self.ws
        if u.kind == EMBED:
            return embedding_linear_cross(self.cI.tok[u.label], self._get(self.cI, "B", u, c),
                                          self._get(self.cJ, "B", v, c), self._get(self.cJ, "A", v, c),
                                          budget=ws.kernel_elems, check_ids=False)
        return embedding_linear_cross(self.cJ.tok[v.label], self._get(self.cJ, "B", v, c),
                                      self._get(self.cI, "B", u, c), self._get(self.cI, "A", u, c),
                                      budget=ws.kernel_elems, check_ids=False).T

    def _dense(self, form: str, c):
        u, v, ws = self.u, self.v, self.ws
        a1, b1 = self._get(self.cI, "A", u, c), self._get(self.cI, "B", u, c)
        a2, b2 = self._get(self.cJ, "A", v, c), self._get(self.cJ, "B", v, c)
        if form == "ghost":
            return ghost_gram(b1, a1, b2, a2, budget=ws.kernel_elems)
        if self.same:  # the tile loop makes the diagonal tiles symmetric once, over all layers
            return materialized_gram(b1, a1, b1, a1, same=True, symmetrize=False, budget=ws.mat_elems)
        return materialized_gram(b1, a1, b2, a2, budget=ws.mat_elems)


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
