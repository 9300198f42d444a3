"""The plan: layer groups x sample blocks, and how each group's factors are captured, so that captures, one
forward chunk's autograd graph and the kernels' workspace fit a memory budget at the fewest forward/backward
passes. A pure function of the Structure, the sizes and a CostModel; tested on hand-built structures.

Capture modes: "full" (one full forward/backward pass per group and sample block), "prefix" (one full pass
caches the output-gradients at block boundaries; then each group recomputes only its own blocks, after a
forward-only prefix) and "skip" (the cache holds hidden states too, so runs start where they begin). The
boundary cache lives on the device or, on CUDA, in pinned host memory when its copies cost less than passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..kernels import SYRK_BLOCK
from .errors import NTKError
from .layers import Use, capture_bytes
from .structure import Structure, run_graph, runs


@dataclass(frozen=True)
class CostModel:
    """What the planner assumes. graph_margin: the autograd graph of a chunk, measured by the probe as saved
    tensors, times this (the backward pass's own buffers are not saved tensors; 1.3B bf16 peaked 1.15x over at
    1.0). fill: the share of the budget a plan fills. workspace_fraction, workspace_cap: the kernels'
    intermediates. host_bytes_per_s, pass_flops (fp64, fp32, tf32, bf16 flop/s of the engine's passes): price
    host copies against passes (only their ratio matters; typical H100 rates). host_fraction: the share of the
    host's available memory a cache may take. host_cache: None allows it where it frees device memory (CUDA),
    False never, True anywhere (tests)."""

    graph_margin: float = 1.5
    fill: float = 0.75
    workspace_fraction: float = 0.1
    workspace_cap: int = 3 << 30
    host_bytes_per_s: float = 20e9
    pass_flops: tuple[float, float, float, float] = (25e12, 45e12, 200e12, 300e12)
    host_fraction: float = 0.5
    host_cache: bool | None = None

    def pass_rate(self, precision: str) -> float:
        return dict(zip(("fp64", "fp32", "tf32", "bf16"), self.pass_flops)).get(precision, self.pass_flops[1])


DEFAULT_COST = CostModel()


@dataclass(frozen=True)
class Plan:
    """How a Gram will be computed: layer groups x sample blocks of `block` samples, forward chunks of `chunk`,
    with the bytes held (captures of a row and a column block, the graph of a chunk, the boundary cache) and
    the flops. Segmented plans cache output-gradients at `boundaries` (and hidden states at `starts`) and give a
    run's graph graph_budget bytes."""

    n: int
    n2: int
    C: int
    block: int
    groups: tuple[tuple[Use, ...], ...]
    fallback: tuple[str, ...]
    bytes_captures: int
    bytes_graph_chunk: int
    chunk: int
    flops: float
    budget: int
    mode: str = "full"  # "full", "prefix" or "skip"
    boundaries: tuple[int, ...] = ()
    bytes_boundary_cache: int = 0
    starts: tuple[int, ...] = ()
    graph_budget: int = 0
    passes: float = 0.0
    workspace: int = 0
    host_cache: bool = False

    @property
    def segmented(self) -> bool:
        return self.mode != "full"

    def __str__(self) -> str:
        tiles = math.ceil(self.n / self.block) * math.ceil(self.n2 / self.block)
        seg = (f"segmented at {len(self.boundaries)} block boundaries ({self.bytes_boundary_cache / 2**30:.2f} GiB "
               f"cached" + (" in host memory" if self.host_cache else "")
               + (f", hidden states at {len(self.starts)} of them" if self.starts else "") + ")"
               if self.segmented else "one full pass per group")
        return (
            f"NTK plan: n={self.n} x {self.n2}, {self.C} output(s); {len(self.groups)} layer group(s) x {tiles} "
            f"sample tile(s) of {self.block}; {seg}, ~{self.passes:.1f} forward/backward passes; forward chunks "
            f"of {self.chunk}; captures {self.bytes_captures / 2**30:.2f} GiB, graph "
            f"{self.bytes_graph_chunk / 2**30:.2f} GiB, budget {self.budget / 2**30:.2f} GiB; "
            f"~{self.flops / 1e12:.2f} TFLOP" + (f"; reference path for {list(self.fallback)}" if self.fallback else "")
        )


@dataclass(frozen=True)
class Sizes:
    """The problem: n x n2 samples (symmetric: X2 is X), the memory budget, a block size to keep to (or None),
    the capture dtype's bytes, the precision, whether the host may hold the boundary cache, and its room."""

    n: int
    n2: int
    symmetric: bool
    budget: int
    block_size: int | None
    cap_itemsize: int
    precision: str
    host_ok: bool = False
    host_bytes: float = 0.0
    outputs: str = "full"  # Spec.outputs: the full multi-output kernel keeps inputs per output, C^2 Gram flops
    own: bool = False  # X2 is X under an asymmetric kernel: one boundary cache, diagonal tiles captured once

    @property
    def x_per_output(self) -> bool:
        return self.outputs == "full"


@dataclass(frozen=True)
class Candidate:
    """One way to run a grouping, priced in passes (forward/backward over all samples) plus formations and
    host copies."""

    cost: float
    groups: tuple[tuple[Use, ...], ...]
    mode: str
    host: bool
    block: int
    chunk: int
    held: float
    boundaries: tuple[int, ...]
    starts: tuple[int, ...]
    cache: float
    free: float
    passes: float


def plan_gram(st: Structure, sz: Sizes, cost: CostModel = DEFAULT_COST) -> Plan:
    """The cheapest Candidate over layer groupings (1..number of clusters of uses sharing a parameter) and capture
    modes, as a Plan. Raises NTKError when not even one sample fits the budget."""
    clusters = clusters_of(st.uses)
    sizes = [capture_bytes(c, sz.cap_itemsize, st.C, sz.x_per_output) for c in clusters]
    modes = _modes(st, sz, cost)
    best, whole = None, set()
    for G in range(1, len(clusters) + 1):
        groups = split(clusters, sizes, G)
        for mode, host in modes:
            cand = evaluate(st, sz, cost, groups, mode, host)
            if cand is None:
                continue
            if best is None or cand.cost < best.cost - 1e-9:
                best = cand
            if math.ceil(max(sz.n, sz.n2) / cand.block) == 1:
                whole.add((mode, host))
        if len(whole) == len(modes):  # one sample tile fits in every mode: more groups only add passes
            break
    if best is None:
        graph = max(cost.graph_margin * st.graph_bytes, 1.0)
        raise NTKError(
            f"even one sample's captures ({sum(sizes) / 2**20:.1f} MiB) and graph ({graph / 2**20:.1f} MiB) exceed "
            f"the memory budget {sz.budget / 2**20:.1f} MiB; raise max_memory, pick fewer params, or use "
            f"precision='bf16'"
        )
    return _as_plan(st, sz, cost, best)


def _modes(st: Structure, sz: Sizes, cost: CostModel) -> list[tuple[str, bool]]:
    """The (capture mode, boundary cache in host memory) combinations open to this structure."""
    segmented = ["prefix"] + (["skip"] if st.skip_prefix else []) if st.segmented else []
    host = sz.host_ok if cost.host_cache is None else cost.host_cache
    return [("full", False)] + [(m, h) for m in segmented for h in ([False, True] if host else [False])]


def evaluate(st: Structure, sz: Sizes, cost: CostModel, groups, mode: str, host: bool) -> Candidate | None:
    """The price of running `groups` in `mode`, at the largest sample block that fits; None if none fits."""
    cap = max(capture_bytes(g, sz.cap_itemsize, st.C, sz.x_per_output) for g in groups)
    n_all = sz.n + (0 if sz.symmetric or sz.own else sz.n2)
    nmax = max(sz.n, sz.n2)
    E = S = ()
    cache, work, graph = 0.0, float(len(groups)), max(cost.graph_margin * st.graph_bytes, 1.0)
    if mode != "full":
        E, S, cache, graph, work = _segmented_cost(st, groups, mode, n_all, cost)
        if host:  # the cache leaves the device; each chunk holds its own slices of it
            if cache > cost.host_fraction * sz.host_bytes:
                return None
            graph += st.C * max(st.h_bytes) + max(st.h_full)
    fit = _block(sz, cost, cap, graph + cap, 0 if host else cache, mode != "full")
    if fit is None:
        return None
    B, chunk, held, free = fit
    R = math.ceil(nmax / B)
    captures = R + R * (R - 1) / 2 if sz.symmetric else R + R * (R - 1) if sz.own else R + R * R
    # the materialized form builds both blocks' per-sample gradients for every tile (2 B T P flops each, 1/3 of
    # a pass per n samples): R^2 block formations (symmetric), 2 R^2 (cross)
    forms = R * R * (1 if sz.symmetric else 2) * B / nmax / 3
    passes = captures * B / nmax * work + (n_all / nmax if mode != "full" else 0.0)
    T = max((u.T for u in st.uses), default=1)
    pass_s = 6.0 * st.n_params * n_all * T / cost.pass_rate(sz.precision)
    copies = cache / n_all * (n_all + captures * B) / cost.host_bytes_per_s / pass_s if host else 0.0
    return Candidate(passes + forms + copies, tuple(tuple(g) for g in groups), mode, host, B, chunk, held, E, S,
                     cache, free, passes)


def _segmented_cost(st: Structure, groups, mode: str, n_all: int, cost: CostModel):
    """(boundaries E, starts S, cache bytes, the largest run's graph bytes per sample, passes of local work) of
    a segmented mode: one full pass caches boundary gradients (and hidden states for "skip"); then each run of
    segments recomputes its own blocks, after a forward-only prefix worth 1/3 of its blocks unless it starts
    from a cached state."""
    L, flops = st.chain.L, sum(st.seg_flops)
    spans = [r for g in groups for r, _ in runs(g)]
    E = tuple(sorted({s1 for _, s1 in spans if s1 <= L}))
    S = tuple(sorted({s0 - 1 for s0, _ in spans if s0 >= 1})) if mode == "skip" else ()
    cache = n_all * (st.C * sum(st.h_bytes[e] for e in E) + sum(st.h_full[e] for e in S))
    prefix = 0 if S else 1 / 3
    work = sum((sum(st.seg_flops[a : b + 1]) + prefix * sum(st.seg_flops[:a])) / flops for a, b in spans)
    return E, S, cache, max(run_graph(st, r, cost.graph_margin) for r in spans), work


def _block(sz: Sizes, cost: CostModel, cap: float, per_sample: float, on_device: float, segmented: bool):
    """(block B, chunk, bytes held, bytes free for graphs) for the largest block (halving from all samples, or
    from block_size) whose captures and one chunk's graph fit; None if one sample does not."""
    nmax = max(sz.n, sz.n2)
    workspace = min(cost.workspace_cap, cost.workspace_fraction * sz.budget)
    B = nmax if sz.block_size is None else min(sz.block_size, nmax)
    while True:
        R = math.ceil(nmax / B)
        held = cap * B * (1 if R == 1 and (sz.symmetric or sz.own) else 2) + workspace
        free = cost.fill * sz.budget - held - on_device
        if segmented:
            chunk = int(free // per_sample)
            ok = chunk >= min(B, 16)
        else:
            chunk = max(1, min(B, int((1 - cost.fill) * sz.budget // per_sample)))
            ok = held + chunk * per_sample <= cost.fill * sz.budget
        if ok or B == 1:
            break
        B = max(1, B // 2)
    chunk = max(1, min(B, chunk))
    if held + on_device + chunk * per_sample > sz.budget:
        return None
    return B, chunk, held, free


def _as_plan(st: Structure, sz: Sizes, cost: CostModel, c: Candidate) -> Plan:
    graph = max(cost.graph_margin * st.graph_bytes, 1.0)
    chunk = c.chunk
    if c.mode != "full":  # the boundary pass runs before any capture is held
        chunk = max(1, min(max(sz.n, sz.n2), int((cost.fill * sz.budget - (0 if c.host else c.cache)) // graph)))
    T = max((u.T for u in st.uses), default=1)
    gram_pairs = st.C * (st.C if sz.outputs == "full" else 1)  # output pairs per sample pair
    # a symmetric Gram computes the tiles above the diagonal and, in each diagonal tile, bands of SYRK_BLOCK
    # samples on and above its diagonal: about n (n + min(block, SYRK_BLOCK)) products instead of 2 n^2
    pairs = sz.n * (sz.n + min(c.block, SYRK_BLOCK)) if sz.symmetric else 2.0 * sz.n * sz.n2
    flops = 6.0 * st.n_params * max(sz.n, sz.n2) * T * c.passes + pairs * st.n_params * gram_pairs
    return Plan(
        sz.n, sz.n2, st.C, c.block, c.groups, tuple(n for n, _ in st.fallback), int(c.held), int(chunk * graph),
        chunk, flops, sz.budget, mode=c.mode, boundaries=c.boundaries, bytes_boundary_cache=int(c.cache),
        starts=c.starts, graph_budget=int(max(c.free, 0)), passes=c.passes,
        workspace=int(min(cost.workspace_cap, cost.workspace_fraction * sz.budget)), host_cache=c.host,
    )


def clusters_of(uses) -> list[list[Use]]:
    """Uses that share a parameter (tied weights) must be contracted together: the connected groups, in order."""
    clusters: list[list[Use]] = []
    owner: dict[int, int] = {}
    for u in uses:
        ps = [id(p) for p in u.params]
        hit = sorted({owner[p] for p in ps if p in owner})
        tgt = hit[0] if hit else len(clusters)
        if not hit:
            clusters.append([])
        for h in hit[1:]:
            clusters[tgt] += clusters[h]
            clusters[h] = []
            for p, o in list(owner.items()):
                if o == h:
                    owner[p] = tgt
        clusters[tgt].append(u)
        for p in ps:
            owner[p] = tgt
    return [c for c in clusters if c]


def split(clusters: list[list[Use]], sizes: list[int], G: int) -> list[list[Use]]:
    """Consecutive clusters into G groups of near-equal bytes."""
    total, groups, cur, acc = sum(sizes), [], [], 0.0
    target = total / G
    for c, s in zip(clusters, sizes):
        if cur and acc + s > target * (len(groups) + 1) and len(groups) < G - 1:
            groups.append(cur)
            cur = []
        cur = cur + c
        acc += s
    groups.append(cur)
    return [g for g in groups if g]
