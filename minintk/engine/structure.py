"""Structure: what the probe found out about a model once (its layer calls, the parameters that go to the
reference path, memory and flops per segment of its block chain). Frozen, cached per model; the planner, the
capture and the contraction read it. Planner tests build it by hand."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .layers import Use


@dataclass(frozen=True)
class Chain:
    """The model's stack of transformer blocks as the probe ran it: the blocks (empty when there is no usable
    chain), how each returns its hidden state (0: a tensor, k: a k-tuple (h, ...), None: runs cannot skip
    blocks), and whether Embeddings fed a batch of 1 get one row per sample."""

    blocks: tuple[nn.Module, ...] = ()
    out_form: int | None = None
    expand_batch1: bool = True

    @property
    def L(self) -> int:
        return len(self.blocks)


@dataclass(frozen=True)
class Structure:
    """Per sample, in bytes and flops. Segments: 0 before the first block, k + 1 inside block k, L + 1 after the
    last; boundaries e = 0..L are the inputs of blocks (e = L the last block's output)."""

    uses: tuple[Use, ...]
    fallback: tuple[tuple[str, nn.Parameter], ...] = ()
    reasons: tuple[str, ...] = ()  # why the fallback parameters are not contracted layer by layer
    C: int = 1
    scalar_output: bool = True
    n_params: int = 0  # P, every selected parameter
    graph_bytes: float = 0.0  # autograd graph of a full forward pass
    seg_graph: tuple[float, ...] = ()  # ... per segment
    seg_flops: tuple[float, ...] = ()  # forward flops of the linear layers per segment
    h_bytes: tuple[float, ...] = ()  # hidden state at each boundary, in the capture dtype
    h_full: tuple[float, ...] = ()  # ... in its own dtype
    chain: Chain = Chain()
    skip_prefix: bool = False  # segmented runs may start from cached hidden states (checked by the probe)

    @property
    def segmented(self) -> bool:
        """Whether runs of segments can be recomputed alone (a checked block chain and forward flops)."""
        return bool(self.chain.blocks) and sum(self.seg_flops) > 0


def runs(uses: list[Use] | tuple[Use, ...]) -> list[tuple[tuple[int, int], list[Use]]]:
    """Uses split into runs of consecutive segments: [((s0, s1), uses in s0..s1), ...]."""
    spans: list[list[int]] = []
    for s in sorted({u.segment for u in uses}):
        if spans and s == spans[-1][1] + 1:
            spans[-1][1] = s
        else:
            spans.append([s, s])
    return [((a, b), [u for u in uses if a <= u.segment <= b]) for a, b in spans]


def run_graph(structure: Structure, run: tuple[int, int], margin: float) -> float:
    """Autograd-graph bytes per sample of a run of segments, times the cost model's margin."""
    return max(margin * sum(structure.seg_graph[run[0] : run[1] + 1]), 1.0)
