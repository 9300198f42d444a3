"""The tile loop: for each layer group, capture each row block and each column block (only the upper triangle
of a symmetric Gram) and contract them into K; then the reference path's parameters; then the lower triangle."""

from __future__ import annotations

import sys
import time

import torch

from ..kernels import mirror_upper
from .capture import boundary_grads, capture
from .contract import Workspace, contract
from .inputs import Inputs
from .plan import DEFAULT_COST, CostModel, Plan
from .reference import FallbackJacobian
from .spec import Spec
from .stats import Stats
from .structure import Structure
from .variants import contract_variant


def gram(spec: Spec, st: Structure, plan: Plan, X: Inputs, X2: Inputs | None, *, strategy: str = "auto",
         cost: CostModel = DEFAULT_COST, stats: Stats | None = None, progress: bool = False) -> torch.Tensor:
    """K fp64 on spec.device, as `plan` says: (n C, n2 C) ordered (sample, output) for spec.outputs "full";
    (n, n2) summed over outputs for "trace"; (n, n2, C) for "diagonal"."""
    start = time.perf_counter()
    symmetric = X2 is None
    C, B = st.C, plan.block
    ws = Workspace.of(plan.workspace, spec.cap_dtype.itemsize)
    k = C if spec.outputs == "full" else 1  # rows and columns of K per sample
    K = torch.zeros(plan.n * k, plan.n2 * k, *((C,) if spec.outputs == "diagonal" else ()), dtype=torch.float64,
                    device=spec.device)
    rows = [(a, min(plan.n, a + B)) for a in range(0, plan.n, B)]
    cols = rows if symmetric else [(a, min(plan.n2, a + B)) for a in range(0, plan.n2, B)]
    tiles = [(i, j) for i in range(len(rows)) for j in range(len(cols)) if not symmetric or j >= i]
    total = len(plan.groups) * len(tiles) + (len(tiles) if st.fallback else 0)
    show = progress and (total > 1 or plan.flops > 1e12)
    if show:
        print(plan, file=sys.stderr)
    bar = _bar(total, show)
    XJ = X if symmetric else X2
    own = XJ is X  # an asymmetric kernel of X with itself: a tile's column block is captured once, as its row
    clock = _Clock(stats, spec.device, start)
    clock.tick("setup")
    gI = gJ = hI = hJ = None
    if plan.segmented:
        gI, hI = boundary_grads(spec, st, X, plan.n, plan.boundaries, plan.chunk, plan.starts, plan.host_cache)
        gJ, hJ = (gI, hI) if own else boundary_grads(spec, st, X2, plan.n2, plan.boundaries, plan.chunk,
                                                            plan.starts, plan.host_cache)
        clock.tick("boundary")
    opts = dict(chunk=plan.chunk, graph_budget=plan.graph_budget, margin=cost.graph_margin)
    for uses in plan.groups:
        uses = list(uses)
        for i, (a, b) in enumerate(rows):
            cI = capture(spec, st, X, a, b, uses, grads=gI, hidden=hI, **opts)
            clock.tick("capture")
            for j, (c, d) in enumerate(cols):
                if symmetric and j < i:
                    continue
                same = symmetric and i == j
                cJ = cI if own and (c, d) == (a, b) else capture(spec, st, XJ, c, d, uses, grads=gJ, hidden=hJ,
                                                                 **opts)
                clock.tick("capture")
                tile = (contract(uses, cI, cJ, same, ws, strategy, stats, spec.device, spec.outputs, C)
                        if spec.variant is None else
                        contract_variant(spec.variant, uses, cI, cJ, spec.weights, ws.mat_elems))
                clock.tick("contract")
                if tile is not None:
                    K[a * k : b * k, c * k : d * k] += tile
                del cJ
                bar.update(1)
            del cI
    if st.fallback:
        _fallback(spec, st, X, XJ, rows, cols, symmetric, plan.chunk, K, bar, progress)
    bar.close()
    clock.tick("fallback")
    return _mirror(K, rows, k) if symmetric else K


def _fallback(spec, st, X, XJ, rows, cols, symmetric, chunk, K, bar, progress) -> None:
    """K += J J^T of the reference path's parameters, block by block, in the layout of spec.outputs."""
    jac = FallbackJacobian(spec, st.fallback, progress)
    C = st.C
    k = C if spec.outputs == "full" else 1
    for i, (a, b) in enumerate(rows):
        JI = jac(X, a, b, chunk)
        for j, (c, d) in enumerate(cols):
            if symmetric and j < i:
                continue
            JJ = JI if symmetric and i == j else jac(XJ, c, d, chunk)
            K[a * k : b * k, c * k : d * k] += outputs_gram(JI.double(), JJ.double(), C, spec.outputs)
            bar.update(1)


def outputs_gram(JI: torch.Tensor, JJ: torch.Tensor, C: int, outputs: str) -> torch.Tensor:
    """J_I J_J^T of per-sample Jacobians (m C, P) (rows i C + c) in the layout of `outputs`: (mI C, mJ C),
    summed over outputs (mI, mJ), or per output (mI, mJ, C)."""
    if outputs == "full" or C == 1:
        K = JI @ JJ.T
        return K[..., None] if outputs == "diagonal" else K
    if outputs == "trace":
        return JI.reshape(-1, C * JI.shape[1]) @ JJ.reshape(-1, C * JJ.shape[1]).T
    I, J = JI.view(-1, C, JI.shape[1]), JJ.view(-1, C, JJ.shape[1])
    return torch.einsum("icp,jcp->ijc", I, J)


def _mirror(K: torch.Tensor, rows, k: int) -> torch.Tensor:
    """The lower triangle of tiles from the upper; each diagonal tile's upper triangle mirrored (the last-bit
    asymmetry of G G^T and of the vector Grams), for each output of a (n, n, C) K."""
    if K.dim() == 3:
        return torch.stack([_mirror(K[..., c], rows, k) for c in range(K.shape[-1])], -1)
    for i, (a, b) in enumerate(rows):
        for c, d in rows[:i]:
            K[a * k : b * k, c * k : d * k] = K[c * k : d * k, a * k : b * k].T
        K[a * k : b * k, a * k : b * k] = mirror_upper(K[a * k : b * k, a * k : b * k])
    return K


class _Clock:
    """Stats.tick, or nothing when no Stats was asked for."""

    def __init__(self, stats: Stats | None, device: torch.device, t0: float):
        self.stats, self.device, self.t = stats, device, t0

    def tick(self, phase: str) -> None:
        if self.stats is not None:
            self.t = self.stats.tick(phase, self.t, self.device)


def _bar(total: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="NTK tiles", disable=not show, file=sys.stderr, leave=False)
