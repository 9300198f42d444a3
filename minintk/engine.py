"""The empirical NTK Gram K = J J^T of a torch model, layer by layer, in bounded memory (docs/theory.md section 2).

capture -> per-layer contraction -> sum. One batched forward of the samples records every supported layer's
inputs X; one backward of sum_i f(x_i) (per output c) records its output-gradients D. A parameter's
per-sample gradient is then G_i = sum_t A_it (x) B_it (an outer product per token: A = D, B = X for a Linear),
and <G_i, G_j> is contracted without ever forming J:
  ghost          sum_{t,s} (A_i A_j^T)_ts (B_i B_j^T)_ts          cost ~ T^2 (r + c) per pair
  materialized   vec(A_i^T B_i) . vec(A_j^T B_j)                 cost ~ r c per pair + T r c per sample
  embedding      token equality replaces A_i A_j^T (one-hot inputs)
  vectors        biases and LayerNorm: G_i is a small vector, formed and dotted.
A parameter used by several layers (a tied LM head) sums over every pair of uses (cross terms). The
samples are tiled into row/column blocks and the layers into groups, so memory stays under a budget.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from .kernels import embedding_gram, embedding_linear_cross, ghost_gram, materialized_gram
from .kernels._common import mirror_upper

PRECISIONS = ("fp64", "fp32", "tf32", "bf16")
STRATEGIES = ("auto", "ghost", "materialized", "loop", "func")

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


# The ghost and embedding contractions' backend on CUDA: "triton" (the fused kernels) or "blocked" (cuBLAS
# token-pair tiles); benchmarks/kernels_check.py and ntk_throughput.py --ghost-backend measure both.
CUDA_GHOST_BACKEND = "blocked"

# The autograd graph's saved tensors, measured per sample by the probe, times this: the backward pass's own
# buffers (activation gradients, autocast copies) are not saved tensors. 1.3B bf16 peaked 1.15x over budget at 1.0.
GRAPH_MARGIN = 1.5

# Relative tolerance of the probe's checks (layer factors against autograd's gradients, segmented against full
# passes). They catch structural misuse, whose error is O(1); rounding is ~1e-7 in fp32, ~1e-3 with TF32's
# 10-bit operands (which also enter the backward pass), ~1e-2 in bf16.
CHECK_TOL = {"fp64": 1e-9, "fp32": 1e-4, "tf32": 1e-2, "bf16": 5e-2}

# The default memory budget on CUDA: this fraction of the memory free to torch (the plan then fills 3/4 of it; the
# measured peaks at 1.3B n=1024 on an 80 GB H100 were 0.90 (bf16) and 0.79 (fp32) of the budget at 0.9, i.e. 59 and
# 52 GiB of 79). benchmarks/ntk_throughput.py --memory-fraction sets it.
BUDGET_FRACTION = 0.9

# A segmented plan may keep its boundary cache (hidden states and output-gradients at block boundaries) in pinned
# host memory when that saves passes: the planner prices its copies at HOST_BYTES_PER_S against a pass priced at
# PASS_FLOPS_PER_S (typical H100 rates of the engine's passes; only their ratio matters), and uses at most
# HOST_FRACTION of the host's available memory.
HOST_BYTES_PER_S = 20e9
PASS_FLOPS_PER_S = {"fp64": 25e12, "fp32": 45e12, "tf32": 200e12, "bf16": 300e12}
HOST_FRACTION = 0.5

# Discovered layer uses per model (weakly keyed: a model's entry goes with the model).
_DISCOVERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_CONTRACTED = "torch.nn Linear, Embedding and LayerNorm, transformers' Conv1D, minintk's Linear and Embedding"


def _warn(message: str) -> None:
    """warnings.warn pointing at the first caller outside minintk."""
    frame, level = sys._getframe(1), 2
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    while frame is not None and frame.f_code.co_filename.startswith(here):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _warn_fallback(reasons: Iterable[str]) -> None:
    _warn("the engine cannot contract some parameters layer by layer; their part of K comes from per-sample "
          "gradients of the whole model (exact, slower): " + "; ".join(reasons))


def clear_cache() -> None:
    """Forget every model's discovered layer structure (after replacing modules or re-tying weights)."""
    _DISCOVERED.clear()


class NTKError(ValueError):
    """The NTK cannot be computed for this model, input or setting; the message says what to change."""


# ----------------------------------------------------------------------------------------------- outputs


def label_words(ids: Iterable[int], diff: bool = False, position: int | str = "last") -> Callable:
    """Output f for an LM: logits of token `ids` at `position` (n, k), or logit[ids[1]] - logit[ids[0]] (n,).

    position "last": each sample's last attended token (the last 1 of its attention_mask, so right, left and no
    padding all read the sample's own last token; the last position without a mask); an int: that position.
    Works on a (n, T, V) logits tensor or any model output with a `.logits` field (transformers). The engine
    passes the inputs as the second argument (f.takes_inputs).
    """
    ids = [int(i) for i in ids]
    if diff and len(ids) != 2:
        raise NTKError(f"label_words(diff=True) needs exactly 2 ids, got {ids}")
    if position != "last" and not isinstance(position, int):
        raise NTKError(f"label_words position must be 'last' or an int, got {position!r}")

    def f(out, inputs: Inputs | None = None):
        logits = getattr(out, "logits", out)
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if position != "last":
            z = logits[:, position]
        elif mask is None:
            z = logits[:, -1]
        else:
            at = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
            last = torch.where(mask.bool(), at, -1).amax(1).clamp_min(0)
            z = logits[torch.arange(logits.shape[0], device=logits.device), last]
        z = z[:, ids]
        return z[:, 1] - z[:, 0] if diff else z

    f.takes_inputs = True
    return f


def _apply_output(output: Callable | None, out, x: Inputs) -> torch.Tensor:
    if output is None:
        return _as_output(out)
    return _as_output(output(out, x) if getattr(output, "takes_inputs", False) else output(out))


def _as_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    raise NTKError(
        f"the model returned {type(out).__name__}, not a tensor of outputs; pass output=..., e.g. "
        f"minintk.label_words([id0, id1], diff=True) for an LM"
    )


# ----------------------------------------------------------------------------------------------- inputs


def _n(X: Inputs) -> int:
    if isinstance(X, torch.Tensor):
        if X.dim() == 0:
            raise NTKError("X must have a leading sample dimension, got a 0-d tensor")
        return X.shape[0]
    if isinstance(X, Mapping) and X:
        sizes = {k: v.shape[0] for k, v in X.items() if isinstance(v, torch.Tensor)}
        if len(set(sizes.values())) != 1 or len(sizes) != len(X):
            raise NTKError(f"every input must be a tensor with the same leading sample dimension, got {sizes}")
        return next(iter(sizes.values()))
    raise NTKError(f"X must be a tensor (n, ...) or a dict of such tensors, got {type(X).__name__}")


def _slice(X: Inputs, lo: int, hi: int, device) -> Inputs:
    if isinstance(X, torch.Tensor):
        return X[lo:hi].to(device)
    return {k: v[lo:hi].to(device) for k, v in X.items()}


def _take(X: Inputs, rows: list[int], device) -> Inputs:
    idx = torch.tensor(rows)
    if isinstance(X, torch.Tensor):
        return X[idx.to(X.device)].to(device)
    return {k: v[idx.to(v.device)].to(device) for k, v in X.items()}


def _probe_rows(model: nn.Module, X: Inputs, most: int = 6) -> list[int]:
    """The samples the probe runs: the first and the last, and those that hold what the data holds of special
    tokens and padding (an embedding's padding id; the most padded row, a left- and a right-padded one)."""
    n = _n(X)
    if n == 1:  # two copies: a layer that mixes samples or orders them (T, n, ...) shows only with two
        return [0, 0]
    rows = [0, n - 1]
    tensors = {"": X} if isinstance(X, torch.Tensor) else dict(X)
    pads = {m.padding_idx for m in model.modules() if isinstance(m, nn.Embedding) and m.padding_idx is not None}
    for key, v in tensors.items():
        if v.dim() != 2 or v.is_floating_point():
            continue
        if "mask" in key:
            off = v == 0
            rows += [int(off.sum(1).argmax())] + [int(c.nonzero()[0]) for c in (off[:, 0], off[:, -1]) if c.any()]
        else:
            rows += [int(hit.nonzero()[0]) for hit in ((v == p).any(1) for p in pads) if hit.any()]
    return sorted(list(dict.fromkeys(rows))[:most])


def _call(model: nn.Module, x: Inputs, output: Callable | None) -> torch.Tensor:
    out = model(**x) if isinstance(x, Mapping) else model(x)
    return _apply_output(output, out, x)


def _check_inputs(model: nn.Module, X: Inputs, name: str) -> int:
    n = _n(X)
    if n == 0:
        raise NTKError(f"{name} has no samples")
    ids = X if isinstance(X, torch.Tensor) else X.get("input_ids", X.get("idx"))
    emb = _input_embedding(model)
    if emb is not None and isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise NTKError(
                f"{name} holds token ids for an embedding model: it must be an integer tensor, got {ids.dtype}"
            )
        if ids.dim() != 2:
            raise NTKError(f"{name} token ids must have shape (n, T), got {tuple(ids.shape)}")
        lo, hi = torch.stack([ids.min(), ids.max()]).tolist()
        if lo < 0 or hi >= emb.num_embeddings:
            raise NTKError(f"{name} token ids must lie in [0, {emb.num_embeddings}), got min {lo}, max {hi}")
    mask = X.get("attention_mask") if isinstance(X, Mapping) else None
    if isinstance(mask, torch.Tensor) and mask.dim() >= 2:
        empty = (~mask.bool().flatten(1).any(1)).nonzero().flatten().tolist()
        if empty:
            raise NTKError(f"{name}['attention_mask'] rows {empty[:8]} mask every token: such a sample has no "
                           f"output to differentiate; drop it")
    return n


def _input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The embedding that reads the token ids: the model's get_input_embeddings() (transformers, our Decoder),
    else its largest Embedding."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, nn.Embedding):
        return emb
    embs = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(embs, key=lambda m: m.num_embeddings) if embs else None


def _check_model(model: nn.Module) -> None:
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise NTKError(
            f"parameters {meta[:3]} are on the meta device (no values: a model built under init_empty_weights or "
            f"device_map offloading); load its weights first, e.g. model.to_empty(device=...) then load_state_dict"
        )
    for name, m in model.named_modules():
        if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise NTKError(f"{name or 'model'} is batch norm in training mode: samples interact; call model.eval()")
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            raise NTKError(f"{name} is dropout (p={m.p}) in training mode: f is random; call model.eval()")
    named = list(model.named_parameters())
    with torch.no_grad():  # the largest |entry| of all parameters (multi-tensor kernels, one sync): NaN/inf propagate
        if not named or math.isfinite(nn.utils.get_total_norm([p for _, p in named], math.inf).item()):
            return
        for name, p in named:
            if not torch.isfinite(p).all():
                raise NTKError(f"parameter {name} holds NaN or inf values; the NTK of such a model is undefined")


# ----------------------------------------------------------------------------------------------- params


def select_params(model: nn.Module, params=None) -> list[tuple[str, nn.Parameter]]:
    """The parameters whose Jacobian enters K, as (name, parameter) in the model's order.

    params: None (every parameter that requires grad), glob pattern(s) on names, module(s) or parameter(s) of
    the model, or a predicate (name, parameter) -> bool. Parameters chosen by name, object or predicate are
    differentiated whether or not they require grad (a frozen backbone's kernel is a kernel too).
    Examples: "blocks.*.attn.*" (attention only), ["blocks.10.*", "blocks.11.*"], model.lm_head.
    Raises NTKError when nothing is selected.
    """
    named = list(model.named_parameters())
    many = isinstance(params, (list, tuple)) and len(params) > 0
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen and named:
            raise NTKError("no parameter of the model requires grad; name the ones to differentiate with params=")
    elif isinstance(params, str) or (many and all(isinstance(q, str) for q in params)):
        pats = [params] if isinstance(params, str) else list(params)
        chosen = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, q) for q in pats)]
    elif isinstance(params, nn.Module) or (many and all(isinstance(q, nn.Module) for q in params)):
        mods = [params] if isinstance(params, nn.Module) else list(params)
        ids = {id(p) for m in mods for p in m.parameters()}
        chosen = [(n, p) for n, p in named if id(p) in ids]
    elif isinstance(params, nn.Parameter) or (many and all(isinstance(q, nn.Parameter) for q in params)):
        ids = {id(p) for p in ([params] if isinstance(params, nn.Parameter) else params)}
        chosen = [(n, p) for n, p in named if id(p) in ids]
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        raise NTKError(
            f"params must be None, a glob pattern, a list of patterns, module(s), parameter(s) or a predicate; "
            f"got {params!r}"
        )
    if not chosen:
        raise NTKError(f"params={params!r} selects no parameter of this model; names look like "
                       f"{[n for n, _ in named[:4]]}")
    return chosen


def last_blocks(model: nn.Module, k: int) -> list[str]:
    """Glob patterns selecting the parameters of the last k transformer blocks (ours or transformers')."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise NTKError("the model has no nn.ModuleList of blocks")
    name, blocks = max(lists, key=lambda t: len(t[1]))
    return [f"{name}.{i}.*" for i in range(max(0, len(blocks) - k), len(blocks))]


# ----------------------------------------------------------------------------------------------- layers

_LINEAR, _CONV1D, _EMBED, _NORM = "linear", "conv1d", "embedding", "layernorm"


def _kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return _LINEAR
    if _is_conv1d(m):
        return _CONV1D
    if isinstance(m, nn.Embedding):
        return _EMBED
    if isinstance(m, nn.LayerNorm):
        return _NORM
    return None


def _layer_params(m: nn.Module) -> list[nn.Parameter]:
    """A supported layer's weight and bias, where they are Parameters."""
    return [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(p, nn.Parameter)]


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 style y = x W + b), not torch.nn.Conv1d."""
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers") and hasattr(m, "nf")


def _known_forwards() -> set:
    """forward functions whose per-sample gradients are the layer algebra of the module docstring (ours multiply
    by w_mult / b_mult, which the engine reads)."""
    from . import model as ours

    return {nn.Linear.forward, nn.Embedding.forward, nn.LayerNorm.forward, ours.Linear.forward,
            ours.Embedding.forward}


def _layer_issue(name: str, m: nn.Module, known: set) -> str | None:
    """Why the parameters of a supported layer cannot be contracted layer by layer (they then come from torch.func
    per-sample gradients), or None. Decided from the module's structure, never from a probe of a few samples.
    Raises NTKError for an Embedding with max_norm, whose forward rewrites its own weight."""
    where = name or "the model"
    if isinstance(m, nn.Embedding) and m.max_norm is not None:
        raise NTKError(
            f"{where} is an Embedding with max_norm={m.max_norm}: its forward renormalizes rows of the weight in "
            f"place, so the model changes its own parameters while the Gram is computed. Renormalize once and "
            f"turn it off: with torch.no_grad(): torch.embedding_renorm_({where}.weight, "
            f"torch.arange({m.num_embeddings}), {m.max_norm}, {m.norm_type}); {where}.max_norm = None"
        )
    if isinstance(m, nn.Embedding) and m.scale_grad_by_freq:
        return (f"{where} has scale_grad_by_freq=True (its gradient is divided by how often each token occurs, "
                f"per sample)")
    if "forward" in vars(m):
        return f"{where} has its forward replaced on the instance"
    if type(m).forward not in known and not _is_conv1d(m):
        return f"{where} is a {type(m).__qualname__}, whose forward overrides its base class's"
    if m._forward_hooks or m._forward_pre_hooks:
        return f"{where} has forward hooks, which may change what it computes"
    return None


@dataclass
class Use:
    """One call of a supported layer whose parameters are selected. Shapes are per (virtual) sample."""

    name: str
    module: nn.Module
    call: int
    kind: str
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    w_mult: float
    b_mult: float
    T: int = 0
    d_in: int = 0
    d_out: int = 0
    segment: int = 0  # 0 before the first block, k + 1 inside block k, L + 1 after the last (blocks: _find_blocks)
    shares_x: str = ""  # label of an earlier use with the same input tensor (q/k/v projections): X stored once

    @property
    def label(self) -> str:
        return self.name if self.call == 0 else f"{self.name}#{self.call}"

    def bytes_per_sample(self, elem: int, C: int, with_x: bool = True) -> int:
        """Bytes a capture keeps per sample: the factors, or for LayerNorm its summed (fp32/fp64) vector gradients."""
        if self.kind == _NORM:
            return C * ((self.weight is not None) + (self.bias is not None)) * self.d_out * max(elem, 4)
        x = self.T * (self.d_in if self.kind != _EMBED else 1) * (8 if self.kind == _EMBED else elem)
        return C * (x * with_x + self.T * self.d_out * elem)


def _capture_bytes(uses: list[Use], elem: int, C: int) -> int:
    """Capture bytes per sample of a set of uses, counting an input shared by several of them once."""
    labels = {u.label for u in uses}
    return sum(u.bytes_per_sample(elem, C, with_x=u.shares_x not in labels) for u in uses)


@dataclass
class Capture:
    """Per-use factors of a block of m samples x C outputs (virtual samples m C), after time compression.

    Matrix weights: G = A^T B with A (mC, T, r), B (mC, T, c) (tokens (mC, T) instead of A for embeddings).
    Vectors: per-sample gradient of each vector parameter (mC, numel), multiplier applied.
    """

    A: dict = field(default_factory=dict)
    B: dict = field(default_factory=dict)
    tok: dict = field(default_factory=dict)
    vec: dict = field(default_factory=dict)
    vec_abs: dict = field(default_factory=dict)  # the probe's check only: per-sample sums of |terms| of vec

    def items(self) -> Iterable[tuple[str, object, torch.Tensor]]:
        """(field name, key, tensor) of every factor."""
        for name in ("A", "B", "tok", "vec"):
            for key, v in getattr(self, name).items():
                yield name, key, v


@dataclass
class _Out:
    """A recorded layer output, held as its autograd edge: the gradient w.r.t. it can be asked for while its memory
    goes back as soon as the graph frees it (holding the tensors kept every layer's output alive at the peak)."""

    edge: object
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


class _Recorder:
    """Forward hooks that keep the inputs and outputs of the layers in `uses` for one forward pass (outputs as
    autograd edges outside the probe)."""

    def __init__(self, uses: list[Use], m: int, probe: bool = False, T: int = 0, expand: bool = True):
        self.m, self.probe, self.T, self.expand = m, probe, T, expand
        self.expanded = False  # an Embedding's batch-1 input was given one row per sample
        self.stack: list[int] = []  # probe: ids of the layers whose forward is running (innermost last)
        self.by_module: dict[int, dict[int, Use]] = {}
        for u in uses:
            self.by_module.setdefault(id(u.module), {})[u.call] = u
        self.calls: dict[int, int] = {}
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.seen: list[tuple[str, nn.Module, int]] = []
        self.handles = []
        self.segment = 0  # probe: the segment being run (set by the block hooks of _Engine._forward)
        self.segment_of: dict[tuple[int, int], int] = {}
        self.taps: dict[int, torch.Tensor] = {}  # block-boundary hidden states asked for by _Engine._forward
        self.events: list[tuple[str, int, torch.Tensor | None]] = []
        self.forms: set[int | None] = set()  # probe: how the blocks return their hidden state (_out_form)
        self.misfit: dict[tuple[int, int], str] = {}  # probe: calls whose tensors do not lead with the samples
        self.outside: dict[int, str] = {}  # probe: parameters read outside their layers (_ParamUses)

    def attach(self, modules: Iterable[tuple[str, nn.Module]]):
        for name, mod in modules:
            self.handles.append(mod.register_forward_pre_hook(self._pre))
            self.handles.append(mod.register_forward_hook(self._make_post(name)))
        return self

    def _pre(self, mod, args):
        if self.probe:
            self.stack.append(id(mod))
        # transformers feeds position ids of batch 1 to broadcast: give the embedding one row per sample (the probe
        # checks that this leaves f unchanged, and turns it off for models where it does not).
        if (self.expand and isinstance(mod, nn.Embedding) and args and isinstance(args[0], torch.Tensor)
                and args[0].dim() >= 1 and args[0].shape[0] == 1 and self.m > 1):
            self.expanded = True
            return (args[0].expand(self.m, *args[0].shape[1:]),) + tuple(args[1:])
        return None

    def _make_post(self, name):
        def post(mod, args, out):
            k = self.calls.get(id(mod), 0)
            self.calls[id(mod)] = k + 1
            if self.probe:
                if self.stack and self.stack[-1] == id(mod):
                    self.stack.pop()
                self.seen.append((name, mod, k))
                self.segment_of[(id(mod), k)] = self.segment
            use = self.by_module.get(id(mod), {}).get(k)
            if use is None and not self.probe:
                return
            key = (id(mod), k)
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            rows = {self.m, self.m * self.T} if self.T else {self.m}
            if x is None or x.dim() == 0 or x.shape[0] not in rows or out.shape[0] != x.shape[0]:
                shape = "no positional tensor" if x is None else f"input {tuple(x.shape)}"
                why = (f"{name} does not lead with the samples ({shape}, output {tuple(out.shape)} for {self.m} "
                       f"samples of {self.T} tokens)")
                if not self.probe:
                    raise NTKError(why + ", though it did on the probe's samples: its rows depend on the data "
                                   "(unpadding, token routing); leave its parameters out of params=")
                self.misfit[key] = why
                return
            self.inputs[key] = x.detach()
            if self.probe or out.grad_fn is None:
                self.outputs[key] = out
            else:
                self.outputs[key] = _Out(get_gradient_edge(out), out.shape, out.dtype, out.device)

        return post

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _sum(ts: list[torch.Tensor]) -> torch.Tensor:
    """Sum of a non-empty list of tensors (no kernel for a single one, unlike sum())."""
    out = ts[0]
    for t in ts[1:]:
        out = out + t
    return out


def _storage(t: torch.Tensor) -> tuple:
    """What makes two tensors the same values: memory, layout and dtype."""
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


def _flat(t: torch.Tensor, m: int) -> torch.Tensor:
    """(m, ..., d) -> (m, T, d) with T the product of the middle dimensions (1 for (m, d))."""
    return t.reshape(m, -1, t.shape[-1]) if t.dim() >= 2 else t.reshape(m, 1, 1)


def _norm_hat(mod: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the normalized dimensions, in at least fp32 (one fused kernel)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.layer_norm(xf, mod.normalized_shape, eps=mod.eps)


class _ProbeStats:
    """What the probe's saved-tensor hook measures: autograd-graph bytes per segment (tensors that carry the
    sample dimension), and in fp64 the first saved tensor of a narrower float dtype (dtype, shape) or None."""

    def __init__(self, m: int, T: int, segments: int, precision: str):
        self.m, self.T, self.precision = m, T, precision
        self.seg_bytes = [0.0] * segments
        self.narrow: tuple | None = None
        self._seen: set = set()

    def hooks(self, segment: Callable[[], int]) -> tuple[Callable, Callable]:
        def pack(t):
            key = (t.data_ptr(), t.dtype, tuple(t.shape))
            if key not in self._seen and t.dim() >= 1 and t.shape[0] in (self.m, self.m * self.T):
                self._seen.add(key)  # only tensors that grow with the chunk (not weights or their casts)
                self.seg_bytes[segment()] += t.numel() * t.element_size()
            narrower = t.is_floating_point() and t.dtype != torch.float64
            if self.precision == "fp64" and narrower and self.narrow is None:
                self.narrow = (t.dtype, tuple(t.shape))
            return t

        return pack, lambda t: t


_METADATA = {"size", "dim", "numel", "nelement", "ndimension", "is_floating_point", "is_complex", "element_size",
             "stride", "storage_offset", "is_contiguous", "data_ptr", "get_device", "untyped_storage", "detach",
             "__len__", "__format__", "__repr__", "__hash__", "__bool__"}


class _ParamUses(torch.overrides.TorchFunctionMode):
    """During the probe's forward: selected parameters that an operation reads anywhere but inside the forward of
    a layer holding them (F.linear(x, mod.weight) elsewhere, torch.where(mask, p, ...), ...), whatever the
    data: {id(p): why}. Metadata (shape, dtype, device) and detached reads do not count."""

    def __init__(self, selected, layers, rec: _Recorder):
        super().__init__()
        self.names = {id(p): n for n, p in selected}
        self.owners: dict[int, set[int]] = {}
        for _, mod in layers:
            for p in _layer_params(mod):
                self.owners.setdefault(id(p), set()).add(id(mod))
        self.rec, self.outside = rec, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in _METADATA and not name.endswith("__get__"):
            here = self.rec.stack[-1] if self.rec.stack else None
            for a in _leaves((args, kwargs)):
                if isinstance(a, nn.Parameter) and id(a) in self.names and here not in self.owners.get(id(a), ()):
                    why = ("is read outside its layer" if id(a) in self.owners else
                           f"is not a parameter of a layer the engine contracts ({_CONTRACTED}); it is read")
                    self.outside.setdefault(id(a), f"{self.names[id(a)]} {why} by {name}")
        return func(*args, **kwargs)


def _leaves(tree) -> Iterable:
    if isinstance(tree, (list, tuple)):
        for t in tree:
            yield from _leaves(t)
    elif isinstance(tree, dict):
        for t in tree.values():
            yield from _leaves(t)
    else:
        yield tree


def _tokens(x: Inputs) -> int:
    """Tokens per sample of a chunk of inputs: dimension 1 of its ids (0 for inputs without a second dimension)."""
    if isinstance(x, torch.Tensor):
        return x.shape[1] if x.dim() >= 2 else 0
    ids = x.get("input_ids", x.get("idx"))
    ids = ids if isinstance(ids, torch.Tensor) else next((v for v in x.values() if v.dim() >= 2), None)
    return ids.shape[1] if ids is not None and ids.dim() >= 2 else 0


def _segment_flops(rec: _Recorder, m: int, L: int) -> list[float]:
    """Forward flops per sample of the linear layers, per segment (0 before the blocks, k + 1 in block k, ...)."""
    flops = [0.0] * (L + 2)
    for _, mod, k in rec.seen:
        key = (id(mod), k)
        if _kind(mod) in (_LINEAR, _CONV1D) and key in rec.outputs:
            flops[rec.segment_of[key]] += 2.0 * rec.outputs[key].numel() / m * rec.inputs[key].shape[-1]
    return flops


def _refuse_reentrant(f: torch.Tensor) -> None:
    """NTKError if f's autograd graph holds a reentrant activation checkpoint (its forward ran without a graph, so
    layer outputs inside it cannot be differentiated by torch.autograd.grad)."""
    todo, seen = [f.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "CheckpointFunctionBackward":
            raise NTKError(
                "the model uses reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True), "
                "which torch.autograd.grad cannot differentiate; use use_reentrant=False (transformers: "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})), or "
                "turn it off (transformers checkpoints only in training mode: model.eval())"
            )
        todo.extend(n for n, _ in node.next_functions)


class _Stop(Exception):
    """Raised by a hook to end a forward pass at the end of a run of blocks."""


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor | None:
    h = args[0] if args else kwargs.get("hidden_states")
    return h if isinstance(h, torch.Tensor) else None


def _hidden_out(out) -> torch.Tensor | None:
    h = out if isinstance(out, torch.Tensor) else (out[0] if isinstance(out, (tuple, list)) and out else None)
    return h if isinstance(h, torch.Tensor) else None


def _out_form(out) -> int | None:
    """How a block returns its hidden state: 0 as a tensor, k as a k-tuple (h, ...), None otherwise."""
    if isinstance(out, torch.Tensor):
        return 0
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return len(out)
    return None


def _with_hidden(form: int, h: torch.Tensor):
    """A skipped block's output of the given form (see _out_form): h, or (h, None, ...) (transformers' blocks
    also return attention weights, which their models read only when asked to output attentions)."""
    return h if form == 0 else (h,) + (None,) * (form - 1)


def _find_blocks(model: nn.Module) -> list[nn.Module] | None:
    """The model's stack of transformer blocks: its longest ModuleList of one module type holding layers."""
    best = None
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(c) for c in mod}) == 1:
            if any(_kind(s) is not None for s in mod[0].modules()) and (best is None or len(mod) > len(best)):
                best = mod
    return list(best) if best is not None else None


# ----------------------------------------------------------------------------------------------- the engine


@dataclass
class Plan:
    """How a Gram will be computed: layer groups x sample blocks, with estimated memory and flops."""

    n: int
    n2: int
    C: int
    block: int
    groups: list[list[Use]]
    fallback: list[str]
    bytes_captures: int
    bytes_graph_chunk: int
    chunk: int
    flops: float
    budget: int
    # Segmented capture: output-gradients cached at these block boundaries by one full pass, then each layer
    # group recomputed from its own blocks only (see _Engine.capture); graph_budget bytes for a run's graph.
    segmented: bool = False
    boundaries: tuple[int, ...] = ()
    bytes_boundary_cache: int = 0  # the gradients, and the hidden states at `starts`
    starts: tuple[int, ...] = ()  # boundaries whose hidden states are cached too: runs start there, no prefix
    graph_budget: int = 0
    passes: float = 0.0
    workspace: int = 0  # bytes for the contraction kernels' intermediates
    host_cache: bool = False  # the boundary cache lives in pinned host memory (copied in per chunk)

    def __str__(self) -> str:
        tiles = math.ceil(self.n / self.block) * math.ceil(self.n2 / self.block)
        seg = (
            f"segmented at {len(self.boundaries)} block boundaries "
            f"({self.bytes_boundary_cache / 2**30:.2f} GiB cached" + (" in host memory" if self.host_cache else "")
            + (f", hidden states at {len(self.starts)} of them" if self.starts else "")
            + ")"
            if self.segmented
            else "one full pass per group"
        )
        return (
            f"NTK plan: n={self.n} x {self.n2}, {self.C} output(s); {len(self.groups)} layer group(s) x {tiles} "
            f"sample tile(s) of {self.block}; {seg}, ~{self.passes:.1f} forward/backward passes; forward chunks "
            f"of {self.chunk}; captures {self.bytes_captures / 2**30:.2f} GiB, "
            f"graph {self.bytes_graph_chunk / 2**30:.2f} GiB, budget {self.budget / 2**30:.2f} GiB; "
            f"~{self.flops / 1e12:.2f} TFLOP" + (f"; torch.func fallback for {self.fallback}" if self.fallback else "")
        )


@contextlib.contextmanager
def _matmul_flags(precision: str):
    """fp32 matmuls as `precision` asks (TF32 only for "tf32"), whatever the caller's global flags."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old[0], old[1]
        torch.set_float32_matmul_precision(old[2])


@contextlib.contextmanager
def _precision_mode(precision: str, device: torch.device):
    """The forward pass's mode on top of _matmul_flags (which ntk and plan hold throughout): bf16 autocast."""
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def _host_available(default: int = 8 << 30) -> int:
    """Bytes of host memory available (Linux /proc/meminfo; `default` elsewhere)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", default)
    return default


def _host_cache_ok(device: torch.device) -> bool:
    """Whether a plan may keep its boundary cache in host memory: only where that frees device memory (CUDA)."""
    return device.type == "cuda"


def default_budget(device: torch.device, fraction: float = 0.9) -> int:
    """The default memory budget in bytes: `fraction` of the memory free to torch on CUDA (free, plus blocks torch's
    allocator holds but does not use); on CPU min(8 GiB, half the available host memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(fraction * free)
    return int(min(8 << 30, 0.5 * _host_available()))


def _default_budget(device: torch.device) -> int:
    return default_budget(device, BUDGET_FRACTION)


class _Engine:
    def __init__(self, model, output, selected, precision, strategy, progress, device):
        self.model, self.output, self.precision, self.strategy = model, output, precision, strategy
        self.progress, self.device = progress, device
        # Ghost/embedding contractions on CUDA: CUDA_GHOST_BACKEND; the plain-torch references elsewhere (and fp64).
        self.backend = CUDA_GHOST_BACKEND if device.type == "cuda" and precision != "fp64" else "torch"
        self.selected = selected
        self.cap_dtype = {"fp64": torch.float64, "bf16": torch.bfloat16}.get(precision, torch.float32)
        self.stats: dict | None = None
        self.fallback_by_loop: bool | None = None  # fallback_jacobian's way, chosen on its first chunk
        self.expand_batch1 = True  # Embeddings fed a batch of 1 get one row per sample (checked by the probe)
        self.blocks: list[nn.Module] | None = None
        self.block_out_form: int | None = None
        self.skip_prefix = False  # segmented runs may start from cached hidden states (checked by the probe)
        self.kernel_budget = 1 << 28  # elements per contraction intermediate (the plan's workspace sets it)
        self.mat_budget = 1 << 28  # elements of per-sample gradient slices in the materialized form (likewise)

    def _tick(self, phase: str, t0: float) -> float:
        """Add the seconds since t0 to stats[phase] (synchronizing the GPU so that they are real); on CUDA, note
        the phase in which the allocator's peak (since the caller's last reset) was reached: stats['peak_phase']."""
        if self.stats is None:
            return t0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            if peak > self.stats.get("peak_bytes", 0):
                self.stats["peak_bytes"], self.stats["peak_phase"] = peak, phase
        now = time.perf_counter()
        self.stats[phase] = self.stats.get(phase, 0.0) + now - t0
        return now

    def _count(self, form: str) -> None:
        self._form = form
        if self.stats is not None:
            forms = self.stats.setdefault("forms", {})
            forms[form] = forms.get(form, 0) + 1

    def _time_form(self, t0: float) -> None:
        """stats['form_seconds'][form of the last contraction] += seconds since t0 (GPU synchronized)."""
        if self.stats is not None and self.stats.get("time_forms"):
            seconds = self.stats.setdefault("form_seconds", {})
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds[self._form] = seconds.get(self._form, 0.0) + time.perf_counter() - t0

    # ---- forward/backward of a block, recording the given uses
    def _forward(self, x, uses, m, probe=False, saved=None, run=None, taps=(), start=None):
        """One forward pass of a chunk of m samples, recording the layers of `uses` (every layer when probing).

        run=(s0, s1): a run of segments (see Use.segment): autograd records only from segment s0 on (the blocks
        before are evaluated without a graph), and the pass stops at the end of segment s1 <= L, whose hidden
        state is left in rec.taps[s1] and f is None. start: the hidden state (m, ...) at boundary s0 - 1 (cached
        by boundary_grads): the blocks before it are skipped and the run starts from it. taps: boundaries e
        whose hidden states go to rec.taps[e].
        """
        rec = _Recorder(uses, m, probe, _tokens(x), self.expand_batch1)
        mods = [(n, mod) for n, mod in self.model.named_modules() if _kind(mod) is not None]
        if not probe:
            want = {id(u.module) for u in uses}
            mods = [(n, mod) for n, mod in mods if id(mod) in want]
        rec.attach(mods)
        handles = []
        blocks = self.blocks or []
        L = len(blocks)

        def pre(k, fn):
            handles.append(blocks[k].register_forward_pre_hook(fn, with_kwargs=True))

        def post(k, fn):
            handles.append(blocks[k].register_forward_hook(fn))

        def grad_on(*_):
            torch.set_grad_enabled(True)

        def tap_in(e, stop=False):
            def hook(mod, args, kwargs):
                rec.taps[e] = _hidden_in(args, kwargs)
                if stop:
                    raise _Stop

            return hook

        def tap_out(e, stop=False):
            def hook(mod, args, out):
                rec.taps[e] = _hidden_out(out)
                if stop:
                    raise _Stop

            return hook

        def inject_in(mod, args, kwargs):
            torch.set_grad_enabled(True)
            if args:
                return (start,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": start}

        def inject_out(mod, args, out):
            torch.set_grad_enabled(True)
            return _with_hidden(self.block_out_form, start)

        if probe:
            self._probe_rec = rec  # the probe's pack hook reads the running segment from it
            for k in range(L):
                pre(k, self._probe_hook(rec, "pre", k))
                post(k, self._probe_hook(rec, "post", k))
        grad_from_start = True
        skipped: list[tuple[nn.Module, object]] = []
        if run is not None:
            s0, s1 = run
            if s0 > 0:
                grad_from_start = False
                if start is not None:  # blocks before boundary s0 - 1 return their input: no prefix computed
                    form = self.block_out_form
                    for k in range(min(s0 - 1, L)):
                        skipped.append((blocks[k], blocks[k].__dict__.get("forward")))
                        blocks[k].forward = lambda *a, **kw: _with_hidden(form, _hidden_in(a, kw))
                    if s0 <= L:
                        pre(s0 - 1, inject_in)
                    else:
                        post(L - 1, inject_out)
                elif s0 <= L:
                    pre(s0 - 1, grad_on)
                else:
                    post(L - 1, grad_on)
            if s1 == 0:
                pre(0, tap_in(0, stop=True))
            elif s1 <= L:
                post(s1 - 1, tap_out(s1, stop=True))
        for e in taps:
            if e < L:
                pre(e, tap_in(e))
            else:
                post(L - 1, tap_out(e))
        f = None
        try:
            with _precision_mode(self.precision, self.device):
                ctx = torch.autograd.graph.saved_tensors_hooks(*saved) if saved else contextlib.nullcontext()
                trace = _ParamUses(self.selected, mods, rec) if probe else contextlib.nullcontext()
                with ctx, trace, torch.set_grad_enabled(grad_from_start):
                    f = _call(self.model, x, self.output)
                rec.outside = trace.outside if probe else {}
        except _Stop:
            pass
        finally:
            rec.close()
            for h in handles:
                h.remove()
            for blk, fwd in skipped:
                if fwd is None:
                    del blk.forward
                else:
                    blk.forward = fwd
        if f is None:
            return rec, None
        if f.dim() not in (1, 2) or f.shape[0] != m:
            raise NTKError(
                f"output must return one value (m,) or C values (m, C) per sample; for {m} samples it returned "
                f"shape {tuple(f.shape)}"
            )
        if not torch.isfinite(f).all():
            raise NTKError("the model's output holds NaN or inf for these inputs")
        self.scalar_output = f.dim() == 1
        return rec, (f if f.dim() == 2 else f[:, None])

    @staticmethod
    def _probe_hook(rec: _Recorder, kind: str, k: int):
        """Probe: log block entries/exits with their hidden states, and track the segment being run."""
        if kind == "pre":

            def hook(mod, args, kwargs):
                rec.events.append(("pre", k, _hidden_in(args, kwargs)))
                rec.segment = k + 1

        else:

            def hook(mod, args, out):
                rec.events.append(("post", k, _hidden_out(out)))
                rec.forms.add(_out_form(out))
                rec.segment = k + 2

        return hook

    def discover(self, X, budget: int | None = None):
        """`_discover`, remembered per (model, parameters, output, input shape, precision): a model's layer
        structure is probed once, as a compiler would trace it once. `clear_cache()` after changing a model.
        Raises NTKError when the probe's own forward/backward pass cannot fit `budget` bytes."""
        sig = tuple((k, v.dtype, tuple(v.shape[1:])) for k, v in (X.items() if isinstance(X, Mapping) else [("", X)]))
        key = (tuple(id(p) for _, p in self.selected), self.output, sig, self.precision)
        per_model = _DISCOVERED.setdefault(self.model, {})
        if key not in per_model:
            start = time.perf_counter()
            self._probe_fits(X, _default_budget(self.device) if budget is None else budget)
            self._discover(X)
            seconds = time.perf_counter() - start
            if self.progress and seconds > 1.0:
                print(f"minintk: probed the model's layers in {seconds:.1f} s (once per model, parameters, output and "
                      f"input shape)", file=sys.stderr)
            per_model[key] = {k: getattr(self, k) for k in self._DISCOVERED_ATTRS}
        else:
            for k, v in per_model[key].items():
                setattr(self, k, v)
            if self.fallback:
                _warn_fallback(self.fallback_reasons)
        return self.uses

    _DISCOVERED_ATTRS = ("uses", "fallback", "fallback_reasons", "graph_bytes_per_sample", "C", "blocks",
                         "seg_graph", "seg_flops", "h_bytes", "h_full", "block_out_form", "skip_prefix",
                         "scalar_output", "expand_batch1")

    def _probe_fits(self, X, budget: int, lengths: tuple[int, ...] = (64, 128, 256)) -> None:
        """Before probing long sequences (T > 2 * lengths[-1]), the autograd graph of one sample, fitted as
        a + b T + c T^2 (attention is quadratic) from the same sample cut to `lengths`, must fit the budget for
        the probe's few samples; else NTKError with the bytes needed. Models that cannot run cut inputs are not
        estimated (their probe then fails, if it does, as one NTKError)."""
        seqs = [v for v in ([X] if isinstance(X, torch.Tensor) else X.values()) if v.dim() >= 2]
        T = seqs[0].shape[1] if seqs else 0
        if T <= 2 * lengths[-1] or any(v.shape[1] != T for v in seqs):
            return
        sizes = []
        for t in lengths:
            cut = X[:1, :t] if isinstance(X, torch.Tensor) else {k: v[:1, :t] if v.dim() >= 2 else v[:1]
                                                                  for k, v in X.items()}
            saved = [0]

            def pack(x, saved=saved):
                saved[0] += x.numel() * x.element_size()
                return x

            try:
                with _precision_mode(self.precision, self.device), torch.enable_grad(), \
                        torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                    _call(self.model, _take(cut, [0], self.device), self.output)
            except Exception:
                return
            sizes.append(saved[0])
        coef = torch.linalg.solve(torch.tensor([[1.0, t, t * t] for t in lengths], dtype=torch.float64),
                                  torch.tensor(sizes, dtype=torch.float64))
        need = float(coef @ torch.tensor([1.0, T, T * T], dtype=torch.float64))
        m = len(_probe_rows(self.model, X))
        if GRAPH_MARGIN * m * need > budget:
            raise NTKError(
                f"one sample of length T={T} needs ~{need / 2**30:.1f} GiB for its forward/backward pass (fitted "
                f"from T={', '.join(map(str, lengths))}); the probe's {m} samples need "
                f"~{GRAPH_MARGIN * m * need / 2**30:.1f} GiB, over the memory budget of {budget / 2**30:.1f} GiB: "
                f"shorten the inputs or raise max_memory"
            )

    def _discover(self, X):
        """Probe a few samples: find the uses of the selected parameters, their shapes, graph memory, and the
        model's block structure (segments) when it has one. Parameters that the layer algebra does not model go
        to per-sample gradients of the whole model, with a warning that names why: decided from the module's
        structure (_layer_issue), from where the forward pass reads each parameter (_ParamUses), from the
        layout of the layers' rows, and from a check of the implied gradients against autograd's."""
        idx = _probe_rows(self.model, X)
        m = len(idx)
        x = _take(X, idx, self.device)
        sel = {id(p) for _, p in self.selected}
        self.blocks = _find_blocks(self.model)
        L = len(self.blocks or [])
        rec, f, stats = self._probe_forward(x, m, L)
        _refuse_reentrant(f)
        if stats.narrow is not None:
            _warn(f"precision='fp64', but the model computes part of its forward in {stats.narrow[0]} (its autograd "
                  f"graph saves a {stats.narrow[0]} tensor of shape {stats.narrow[1]}; transformers' GPT-Neo, for "
                  f"one, casts its attention scores to fp32): the Gram is exact for this function, whose values "
                  f"carry that dtype's rounding")
        self.C = f.shape[1]
        self.graph_bytes_per_sample = sum(stats.seg_bytes) / m
        self.seg_graph = [b / m for b in stats.seg_bytes]
        self._check_blocks(rec, m)
        self.seg_flops = _segment_flops(rec, m, L)
        reasons = self._structural_reasons(sel)
        for id_p, why in {**self._layout_reasons(rec, f, m, sel), **rec.outside}.items():
            reasons.setdefault(id_p, why)
        uses = self._uses(rec, m, sel, set(reasons))
        for id_p, why in self._gradient_reasons(rec, uses, f, m).items():
            reasons.setdefault(id_p, why)
        if reasons:
            uses = [u for u in (self._without(u, reasons) for u in uses) if u.weight is not None or u.bias is not None]
            _warn_fallback(reasons.values())
        self.uses = uses
        self.fallback = [(n, p) for n, p in self.selected if id(p) in reasons]
        self.fallback_reasons = list(dict.fromkeys(reasons.values()))
        if self.blocks is not None and uses and not self._check_segmented(x, uses, m):
            self.blocks = None
        return uses

    def _probe_forward(self, x, m: int, L: int):
        """The probe's forward pass, recording every layer: (recorder, f, _ProbeStats). Embeddings fed a batch of 1
        (transformers' position ids) are given one row per sample only where that leaves f as it is: else (an
        error, or another f) the pass is run again without, and those layers' rows do not lead with the samples."""
        for expand in (True, False):
            self.expand_batch1 = expand
            stats = _ProbeStats(m, _tokens(x), L + 2, self.precision)
            try:
                rec, f = self._forward(x, [], m, probe=True, saved=stats.hooks(lambda: self._probe_rec.segment))
            except NTKError:
                raise
            except Exception:
                if not expand:
                    raise
                continue
            if not (expand and rec.expanded) or self._same_as_plain(x, f):
                return rec, f, stats
        raise AssertionError("unreachable")

    def _same_as_plain(self, x, f: torch.Tensor) -> bool:
        """Whether f equals the model's own output without the engine's hooks (to the precision's tolerance)."""
        with torch.no_grad(), _precision_mode(self.precision, self.device):
            plain = _call(self.model, x, self.output)
        plain = plain if plain.dim() == 2 else plain[:, None]
        if plain.shape != f.shape:
            return False
        scale = max(plain.abs().max().item(), 1e-30)
        return (plain.double() - f.detach().double()).abs().max().item() <= CHECK_TOL[self.precision] * scale

    def _gradient_reasons(self, rec: _Recorder, uses: list[Use], f: torch.Tensor, m: int) -> dict[int, str]:
        """{id(p): why} for selected parameters with no contracted use, or whose implied gradient of a random
        combination of all outputs differs from autograd's on the probe's samples (_implied_matches)."""
        r = torch.randn(f.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        fr = (f * r.to(f.device, f.dtype)).sum(1, keepdim=True)
        params = [p for _, p in self.selected]
        grads = torch.autograd.grad(fr.sum(), params, allow_unused=True, retain_graph=True)
        cap = self._factors(rec, uses, fr, m, columns=[0], magnitudes=True)
        reasons = {}
        for (name, p), g in zip(self.selected, grads):
            used = any(p is u.weight or p is u.bias for u in uses)
            if not used:
                reasons[id(p)] = f"{name} is not a parameter of a layer the engine contracts ({_CONTRACTED})"
            elif not self._implied_matches(uses, cap, p, g):
                reasons[id(p)] = f"{name} is also used outside its layer"
        return reasons

    def _structural_reasons(self, sel: set) -> dict[int, str]:
        """{id(parameter): why} for the selected parameters of layers _layer_issue refuses."""
        known, reasons = _known_forwards(), {}
        for name, mod in self.model.named_modules():
            if _kind(mod) is None:
                continue
            ps = [p for p in _layer_params(mod) if id(p) in sel]
            why = _layer_issue(name, mod, known) if ps else None
            for p in ps if why else []:
                reasons.setdefault(id(p), why)
        return reasons

    @staticmethod
    def _layout_reasons(rec: _Recorder, f: torch.Tensor, m: int, sel: set) -> dict[int, str]:
        """{id(parameter): why} for selected parameters of layer calls whose rows are not grouped by sample: the
        call's tensors do not lead with the samples (rec.misfit), or the gradient of one sample's outputs reaches
        rows of another sample's block (a (T, n, ...) layout flattened, or samples mixed). Layers may flatten
        samples and tokens sample-major ((n T, d), as OPT's MLP does): that passes."""
        why = dict(rec.misfit)
        calls = [(name, mod, k) for name, mod, k in rec.seen if (id(mod), k) in rec.outputs]
        calls = [c for c in calls if any(id(p) in sel for p in _layer_params(c[1]))]
        outs = [rec.outputs[(id(mod), k)] for _, mod, k in calls]
        live = [i for i, o in enumerate(outs) if o.requires_grad]
        for j in range(m) if live and m > 1 else []:
            gs = torch.autograd.grad(f[j].sum(), [outs[i] for i in live], retain_graph=True, allow_unused=True)
            for i, g in zip(live, gs):
                name, mod, k = calls[i]
                if g is not None and m > 1 and torch.cat([g.reshape(m, -1)[:j], g.reshape(m, -1)[j + 1 :]]).any():
                    why.setdefault((id(mod), k), f"{name} does not keep each sample's rows apart (output "
                                                 f"{tuple(g.shape)} for {m} samples)")
        mods = {(id(mod), k): mod for _, mod, k in rec.seen}
        return {id(p): text for key, text in why.items() for p in _layer_params(mods[key]) if id(p) in sel}

    def _uses(self, rec: _Recorder, m: int, sel: set, routed: set) -> list[Use]:
        """The probe's record as uses of the selected (and not routed) parameters, in call order."""
        uses, first_x = [], {}
        for name, mod, k in rec.seen:
            if (id(mod), k) in rec.misfit:
                continue
            kind = _kind(mod)
            w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
            w = w if isinstance(w, nn.Parameter) and id(w) in sel and id(w) not in routed else None
            b = b if isinstance(b, nn.Parameter) and id(b) in sel and id(b) not in routed else None
            if w is None and b is None:
                continue
            xin, out = rec.inputs[(id(mod), k)], rec.outputs[(id(mod), k)]
            u = Use(name, mod, k, kind, w, b, float(getattr(mod, "w_mult", 1.0)), float(getattr(mod, "b_mult", 1.0)))
            width = math.prod(mod.normalized_shape) if kind == _NORM else out.shape[-1]
            u.T = out.numel() // (m * width)
            u.d_out = width
            u.d_in = 1 if kind == _EMBED else xin.shape[-1]
            u.segment = rec.segment_of[(id(mod), k)]
            if w is not None and kind in (_LINEAR, _CONV1D):  # layers fed the same tensor store it once
                u.shares_x = first_x.setdefault(_storage(xin), u.label)
                u.shares_x = "" if u.shares_x == u.label else u.shares_x
            uses.append(u)
        return uses

    @staticmethod
    def _without(u: Use, routed: dict) -> Use:
        if u.weight is not None and id(u.weight) in routed:
            u.weight = None
        if u.bias is not None and id(u.bias) in routed:
            u.bias = None
        return u

    def _implied_matches(self, uses: list[Use], cap: Capture, p: nn.Parameter, g: torch.Tensor | None) -> bool:
        """Whether the per-sample gradients the layers imply for p sum to autograd's batch gradient g of output 0.

        The tolerance is relative to the sum of the terms' magnitudes, the scale of a sum's rounding error, so a
        gradient that cancels to zero (a key-projection bias, which softmax ignores) passes as it should, while a
        parameter also used outside its layers (F.linear(x, mod.weight)) fails by O(1). One fp64 parameter-sized
        buffer pair at a time."""
        implied = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
        magnitude = torch.zeros_like(implied)
        for u in uses:
            if u.weight is p and u.kind != _NORM:
                implied += self._weight_sum(u, cap).reshape(p.shape)
                magnitude += self._weight_sum(u, cap, absolute=True).reshape(p.shape)
            for q, v, size in self._vector_grads(u, cap, magnitudes=True):
                if q is p:
                    implied += v.double().sum(0).reshape(p.shape)
                    magnitude += size.double().sum(0).reshape(p.shape)
        ref = torch.zeros_like(implied) if g is None else g.double()
        scale = max(magnitude.max().item() + ref.abs().max().item(), 1e-300)
        return (implied - ref).abs().max().item() <= CHECK_TOL[self.precision] * scale

    def _check_blocks(self, rec: _Recorder, m: int) -> None:
        """Keep self.blocks only if the probe ran them once each, in order, as a chain of hidden states."""
        blocks, ev = self.blocks, rec.events
        self.h_bytes, self.h_full = [], []
        forms = rec.forms
        self.block_out_form = next(iter(forms)) if len(forms) == 1 else None  # None: runs cannot skip blocks
        if blocks is None:
            return
        L = len(blocks)
        want = [(kind, k) for k in range(L) for kind in ("pre", "post")]
        ok = [(kind, k) for kind, k, _ in ev] == want and all(h is not None and h.shape[0] == m for _, _, h in ev)
        ok = ok and all(ev[2 * k + 1][2] is ev[2 * k + 2][2] for k in range(L - 1))
        if not ok:
            self.blocks = None
            return
        hs = [ev[2 * k][2] for k in range(L)] + [ev[-1][2]]  # boundary e: input of block e; L: the last output
        self.h_bytes = [h.numel() / m * min(h.element_size(), self.cap_dtype.itemsize) for h in hs]
        self.h_full = [h.numel() / m * h.element_size() for h in hs]

    def _check_segmented(self, x, uses: list[Use], m: int) -> bool:
        """Segmented capture (one run per segment, from cached boundary gradients) reproduces the full pass;
        sets skip_prefix if it does so with runs that start from cached hidden states too."""
        rec, f = self._forward(x, uses, m)
        full = self._factors(rec, uses, f, m)
        del rec, f
        L = len(self.blocks)
        segs = sorted({u.segment for u in uses})
        E, H = [s for s in segs if s <= L], [s - 1 for s in segs if s >= 1]
        for skip in ([True, False] if self.block_out_form is not None else [False]):
            try:
                grads, hidden = self.boundary_grads(x, m, E, m, H if skip else ())
                same = all(self._same_factors(full, self._capture_chunks(
                    x, 0, m, [u for u in uses if u.segment == s], m, (s, s), grads, hidden)) for s in segs)
            except Exception:  # a model that reads more than the hidden state of a skipped block's output
                if not skip:
                    raise
                same = False
            if same:
                self.skip_prefix = skip
                return True
        return False

    def _same_factors(self, full: Capture, part: Capture) -> bool:
        """part's factors equal full's (same keys) to the precision's tolerance."""
        tol = CHECK_TOL[self.precision]
        for name, key, v in part.items():
            ref = getattr(full, name)[key]
            if v.shape != ref.shape:
                return False
            if name == "tok":
                if not torch.equal(v, ref):
                    return False
                continue
            scale = max(ref.abs().max().item(), 1e-30)
            if (v.double() - ref.double()).abs().max().item() > tol * scale:
                return False
        return True

    def _runs(self, uses: list[Use]) -> list[tuple[tuple[int, int], list[Use]]]:
        """Uses split into runs of consecutive segments: [((s0, s1), uses in s0..s1), ...]."""
        spans: list[list[int]] = []
        for s in sorted({u.segment for u in uses}):
            if spans and s == spans[-1][1] + 1:
                spans[-1][1] = s
            else:
                spans.append([s, s])
        return [((a, b), [u for u in uses if a <= u.segment <= b]) for a, b in spans]

    def _run_graph(self, run: tuple[int, int]) -> float:
        """Autograd-graph bytes per sample of a run of segments."""
        return max(GRAPH_MARGIN * sum(self.seg_graph[run[0] : run[1] + 1]), 1.0)

    def boundary_grads(self, X, n: int, E, chunk: int, H=(), host: bool = False) -> tuple[dict, dict]:
        """dF_c/dh_e at block boundaries e (the input of block e; e = L the last block's output) for the n
        samples of X, by full forward/backward passes in chunks: {e: (n, C, *h.shape[1:])}, h's dtype (the
        capture dtype in 16-bit modes); and the hidden states h_e themselves at the boundaries H, in their own
        dtype (a run starts from exactly the state the full pass had): {e: (n, *h.shape[1:])}. host: both live
        in pinned host memory (filled by asynchronous copies; _capture_chunks copies each chunk's slice back)."""
        where = {"device": "cpu", "pin_memory": self.device.type == "cuda"} if host else {}
        grads: dict[int, torch.Tensor] = {}
        hidden: dict[int, torch.Tensor] = {}
        E, H = list(E), list(H)
        if not E and not H:
            return grads, hidden
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            rec, f = self._forward(_slice(X, a, b, self.device), [], b - a, taps=sorted(set(E) | set(H)))
            for e in H:
                h = rec.taps[e]
                if e not in hidden:
                    hidden[e] = torch.empty((n, *h.shape[1:]), dtype=h.dtype, **(where or {"device": h.device}))
                hidden[e][a:b].copy_(h.detach(), non_blocking=True)
            hs = [rec.taps[e] for e in E]
            live = [i for i, h in enumerate(hs) if h.requires_grad]
            C = f.shape[1]
            cols: list[list] = [[] for _ in E]
            for c in range(C if E else 0):
                gs = torch.autograd.grad(
                    f[:, c].sum(), [hs[i] for i in live], retain_graph=c < C - 1, allow_unused=True
                )
                got = dict(zip(live, gs))
                for i, h in enumerate(hs):  # a boundary the output does not depend on has gradient 0
                    g = got.get(i)
                    cols[i].append(torch.zeros_like(h) if g is None else g)
            for e, h, gl in zip(E, hs, cols):
                if e not in grads:  # 16-bit modes keep them in the capture dtype (half the memory)
                    dt = self.cap_dtype if self.cap_dtype.itemsize < h.dtype.itemsize else h.dtype
                    grads[e] = torch.empty((n, C, *h.shape[1:]), dtype=dt, **(where or {"device": h.device}))
                # one contiguous slice per chunk (an asynchronous copy into pinned memory must not need a staging copy)
                grads[e][a:b].copy_(torch.stack(gl, 1), non_blocking=True)
                gl.clear()
            del rec, f, hs
        return grads, hidden

    def _weight_sum(self, u: Use, cap: Capture, absolute: bool = False) -> torch.Tensor:
        """sum_i G_i of a use's weight, fp64, in the parameter's layout (a check of the capture); absolute: the
        same sum of |terms| (the scale of its rounding error)."""
        mag = torch.abs if absolute else (lambda t: t)
        if u.kind == _EMBED:
            tok, D = cap.tok[u.label], mag(cap.B[u.label].double())
            G = torch.zeros(u.weight.shape, dtype=torch.float64, device=D.device)
            G.index_add_(0, tok.reshape(-1), D.reshape(-1, D.shape[-1]))
            return abs(u.w_mult) * G if absolute else u.w_mult * G
        A, B = mag(cap.A[u.label].double()), mag(cap.B[u.label].double())
        return (abs(u.w_mult) if absolute else u.w_mult) * torch.einsum("mtr,mtc->rc", A, B)

    @staticmethod
    def _vector_grads(u: Use, cap: Capture, magnitudes: bool = False) -> list[tuple]:
        """(parameter, per-sample gradients) of a use's vector parameters; magnitudes: + their sums of |terms|."""
        keys = [(u.bias, "bias")] if u.bias is not None else []
        keys += [(u.weight, "weight")] if u.kind == _NORM and u.weight is not None else []
        if magnitudes:
            return [(p, cap.vec[(u.label, k)], cap.vec_abs[(u.label, k)]) for p, k in keys]
        return [(p, cap.vec[(u.label, k)]) for p, k in keys]

    def _factors(self, rec: _Recorder, uses: list[Use], f, m: int, columns=None, root=None,
                 magnitudes: bool = False) -> Capture:
        """Backward per output column; returns the factors of every use (virtual samples ordered i*C + c).
        magnitudes: also the sums of |terms| of the vector gradients (Capture.vec_abs, for the probe's check).

        root=(h, g): backpropagate from a block boundary h (m, ...) with its cached gradient g (m, C, ...)
        instead of from the output f.
        """
        columns = list(range(f.shape[1] if root is None else root[1].shape[1])) if columns is None else columns
        keys = [(id(u.module), u.call) for u in uses]
        outs = [rec.outputs[k] for k in keys]
        live = [i for i, o in enumerate(outs) if isinstance(o, _Out) or o.requires_grad]  # others: f ignores them
        refs = [outs[i].edge if isinstance(outs[i], _Out) else outs[i] for i in live]
        Ds = [[] for _ in uses]
        for c in columns:
            keep = c != columns[-1]  # the last backward frees the graph as it goes: activations, D's never coexist
            if not refs:
                gs = []
            elif root is None:
                gs = torch.autograd.grad(f[:, c].sum(), refs, retain_graph=keep, allow_unused=True)
            else:
                gs = torch.autograd.grad(root[0], refs, root[1][:, c], retain_graph=keep, allow_unused=True)
            got = dict(zip(live, gs))
            for i, o in enumerate(outs):
                g = got.get(i)
                Ds[i].append(torch.zeros(o.shape, dtype=o.dtype, device=o.device) if g is None else g)
        cap = Capture()
        C = len(columns)
        dt = self.cap_dtype
        xs: dict[tuple, torch.Tensor] = {}  # one stored copy of an input several layers read (q/k/v projections)
        for i, (u, key) in enumerate(zip(uses, keys)):
            Dl, Ds[i] = Ds[i], None  # a layer's output-gradient is freed once its factors are stored
            D = Dl[0].reshape(m, -1, u.d_out)
            D = D if C == 1 else torch.stack([d.reshape(m, -1, u.d_out) for d in Dl], 1).reshape(m * C, -1, u.d_out)
            x = rec.inputs[key]
            if u.kind == _EMBED:
                tok = x.reshape(m, -1)[:, None, :].expand(m, C, -1).reshape(m * C, -1)
                if u.module.padding_idx is not None:  # torch gives the padding row no gradient
                    D = D.masked_fill((tok == u.module.padding_idx)[..., None], 0)
                if u.weight is not None:
                    cap.tok[u.label], cap.B[u.label] = tok, D.to(dt)
                continue
            X = _flat(x, m)
            if u.kind == _NORM:
                xhat = _norm_hat(u.module, x).reshape(m, -1, u.d_out)
                Xv = xhat[:, None].expand(m, C, *xhat.shape[1:]).reshape(m * C, *xhat.shape[1:])
                if u.weight is not None:
                    vt = self._vec_dtype()
                    cap.vec[(u.label, "weight")] = (D.to(vt) * Xv.to(vt)).sum(1)
                    if magnitudes:
                        cap.vec_abs[(u.label, "weight")] = (D.to(vt) * Xv.to(vt)).abs().sum(1)
            elif u.weight is not None:
                sig = _storage(x)
                if sig not in xs:
                    xs[sig] = X[:, None].expand(m, C, *X.shape[1:]).reshape(m * C, *X.shape[1:]).to(dt)
                # Row factor A spans the weight's first dimension: D for Linear (out, in), X for Conv1D (in, out).
                A, B = (D.to(dt), xs[sig]) if u.kind == _LINEAR else (xs[sig], D.to(dt))
                cap.A[u.label], cap.B[u.label] = A, B
            if u.bias is not None:
                g = D.sum(1, dtype=self._vec_dtype())
                cap.vec[(u.label, "bias")] = g if u.b_mult == 1.0 else g.mul_(u.b_mult)
                if magnitudes:
                    cap.vec_abs[(u.label, "bias")] = D.abs().sum(1, dtype=self._vec_dtype()) * abs(u.b_mult)
        return cap

    def _vec_dtype(self):
        return torch.float64 if self.precision == "fp64" else torch.float32

    def _capture_chunks(self, X, lo, hi, uses, chunk, run=None, grads=None, hidden=None) -> Capture:
        """Factors of samples lo:hi for `uses`, forward/backward in chunks (of a run of segments: see _forward;
        hidden: boundary_grads' hidden states, from which the run starts when its start boundary is there)."""
        cap, C, first = Capture(), self.C, True
        e = run[0] - 1 if run is not None else -1
        for a in range(lo, hi, chunk):
            b = min(hi, a + chunk)
            x = _slice(X, a, b, self.device)
            start = hidden[e][a:b].to(self.device, non_blocking=True) if hidden and e in hidden else None
            rec, f = self._forward(x, uses, b - a, run=run, start=start)
            if f is None:
                h = rec.taps[run[1]]
                root = (h, grads[run[1]][a:b].to(self.device, non_blocking=True).to(h.dtype))
            else:
                root = None
            part = self._factors(rec, uses, f, b - a, root=root)
            del rec, f, root
            if first and b == hi:  # one chunk: its factors are the capture
                return part
            if first:  # the factors of all samples lo:hi, filled chunk by chunk (rows ordered i * C + c)
                first = False
                made: dict[int, torch.Tensor] = {}  # a factor shared by several uses gets one buffer
                for name, key, v in part.items():
                    if id(v) not in made:
                        made[id(v)] = v.new_empty(((hi - lo) * C, *v.shape[1:]))
                    getattr(cap, name)[key] = made[id(v)]
            done: set[int] = set()
            for name, key, v in part.items():
                if id(v) not in done:
                    done.add(id(v))
                    getattr(cap, name)[key][(a - lo) * C : (b - lo) * C] = v
            del part
        return cap

    def capture(self, X, lo, hi, uses, chunk, grads=None, graph_budget=0, hidden=None) -> Capture:
        """Factors of samples lo:hi for `uses`, with zero time steps dropped. grads, hidden (boundary_grads of
        X): segmented, each run of segments is recomputed alone (from a cached hidden state where there is one)
        in chunks that fit graph_budget bytes; otherwise full forward/backward passes in chunks of `chunk`."""
        if grads is None:
            cap = self._capture_chunks(X, lo, hi, uses, chunk)
        else:
            cap = Capture()
            for run, us in self._runs(uses):
                per = self._run_graph(run) + _capture_bytes(us, self.cap_dtype.itemsize, self.C)
                c = max(1, min(hi - lo, int(graph_budget // per)))
                for name, key, v in self._capture_chunks(X, lo, hi, us, c, run, grads, hidden).items():
                    getattr(cap, name)[key] = v
        # drop tokens where the output-gradient vanishes for every sample (e.g. LM logits but the last); one sync
        mats = [u for u in uses if u.weight is not None and u.kind != _NORM]
        norms = [torch.linalg.vector_norm(cap.B[u.label] if u.kind in (_EMBED, _CONV1D) else cap.A[u.label],
                                          math.inf, dim=(0, 2)) for u in mats]
        flags = (torch.cat(norms) > 0).tolist() if norms else []
        sliced: dict[tuple, torch.Tensor] = {}  # a shared factor stays shared where its uses keep the same steps

        def take(t: torch.Tensor, idx: torch.Tensor, steps: tuple) -> torch.Tensor:
            if (id(t), steps) not in sliced:
                sliced[(id(t), steps)] = t[:, idx]
            return sliced[(id(t), steps)]

        at = 0
        for u, nm in zip(mats, norms):
            keep, at = flags[at : at + nm.numel()], at + nm.numel()
            if all(keep):
                continue
            steps = tuple(t for t, k in enumerate(keep) if k)
            idx = torch.tensor(steps, dtype=torch.long, device=self.device)
            if u.kind == _EMBED:
                cap.tok[u.label] = take(cap.tok[u.label], idx, steps)
            else:
                cap.A[u.label] = take(cap.A[u.label], idx, steps)
            cap.B[u.label] = take(cap.B[u.label], idx, steps)
        return cap

    # ---- contractions
    def _dense_pair(self, a1, b1, a2, b2, same: bool) -> torch.Tensor:
        m1, T1, r = a1.shape
        m2, T2, c = b2.shape
        ghost = m1 * m2 * T1 * T2 * (r + c)
        mat = (m1 * T1 + (0 if same else m2 * T2)) * r * c + m1 * m2 * r * c
        use_ghost = self.strategy == "ghost" or (self.strategy == "auto" and ghost < mat)
        self._count("ghost" if use_ghost else "materialized")
        if use_ghost:
            return ghost_gram(b1, a1, b2, a2, backend=self.backend, budget=self.kernel_budget)
        kw = {"budget": self.mat_budget}
        if same:  # _layerwise makes the diagonal tiles symmetric once, over all layers
            return materialized_gram(b1, a1, b1, a1, same=True, symmetrize=False, **kw)
        return materialized_gram(b1, a1, b2, a2, **kw)

    def contract(self, uses, cI: Capture, cJ: Capture, same: bool) -> torch.Tensor:
        """sum over parameters of <G_i, G_j> for the uses of one layer group: (mI C, mJ C) fp64."""
        K = None

        def add(t, w=1.0):  # K += w t, accumulated in fp64 (one kernel per term)
            nonlocal K
            if K is None:
                K = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
            K.add_(t, alpha=w)

        by_param: dict[int, list[Use]] = {}
        vec_params: dict[int, list] = {}
        for u in uses:
            if u.weight is not None and u.kind != _NORM:
                by_param.setdefault(id(u.weight), []).append(u)
            for key in [(u.label, "bias"), (u.label, "weight")]:
                if key in cI.vec:
                    p = u.bias if key[1] == "bias" else u.weight
                    vec_params.setdefault(id(p), []).append(key)
        if vec_params:  # every vector parameter's per-sample gradient side by side: one matmul
            t0 = time.perf_counter()
            for _ in vec_params:
                self._count("vector")
            gI = torch.cat([_sum([cI.vec[k] for k in keys]) for keys in vec_params.values()], 1)
            gJ = gI if same else torch.cat([_sum([cJ.vec[k] for k in keys]) for keys in vec_params.values()], 1)
            add(gI @ gJ.T)
            self._time_form(t0)
        for us in by_param.values():
            for u in us:
                for v in us:
                    t0 = time.perf_counter()
                    add(self._weight_pair(u, v, cI, cJ, same and u is v), u.w_mult * v.w_mult)
                    self._time_form(t0)
        return K

    def _weight_pair(self, u: Use, v: Use, cI: Capture, cJ: Capture, same: bool) -> torch.Tensor:
        lu, lv = u.label, v.label
        if u.kind == _EMBED and v.kind == _EMBED:
            self._count("embedding")
            return embedding_gram(
                cI.tok[lu], cI.B[lu], cJ.tok[lv], cJ.B[lv], backend=self.backend, budget=self.kernel_budget
            )
        if u.kind == _EMBED or v.kind == _EMBED:
            self._count("tied-cross")
        if u.kind == _EMBED:
            return embedding_linear_cross(cI.tok[lu], cI.B[lu], cJ.B[lv], cJ.A[lv], budget=self.kernel_budget)
        if v.kind == _EMBED:
            return embedding_linear_cross(cJ.tok[lv], cJ.B[lv], cI.B[lu], cI.A[lu], budget=self.kernel_budget).T
        return self._dense_pair(cI.A[lu], cI.B[lu], cJ.A[lv], cJ.B[lv], same)

    # ---- torch.func per-sample gradients (fallback parameters, and the `func` reference)
    def fallback_jacobian(self, X, lo, hi, chunk) -> torch.Tensor:
        """Per-sample gradients (m C, P) of the fallback parameters: torch.func where it can run the model, else
        one backward pass per sample and output (data-dependent control flow such as transformers' padding-mask
        checks, activation checkpointing), said once in a warning."""
        if self.fallback_by_loop is None:
            try:
                J = self.func_jacobian(X, lo, min(hi, lo + chunk), self.fallback, chunk)
            except RuntimeError as e:
                self.fallback_by_loop = True
                _warn(f"torch.func cannot run this model ({str(e).splitlines()[0][:160]}); the fallback parameters' "
                      f"per-sample gradients come from one backward pass per sample and output instead")
            else:
                self.fallback_by_loop = False
                rest = self.func_jacobian(X, lo + chunk, hi, self.fallback, chunk) if hi > lo + chunk else None
                return J if rest is None else torch.cat([J, rest])
        if self.fallback_by_loop:
            return self.loop_jacobian(X, lo, hi, self.fallback)
        return self.func_jacobian(X, lo, hi, self.fallback, chunk)

    def loop_jacobian(self, X, lo, hi, named) -> torch.Tensor:
        """Per-sample gradients (m C, P) of the parameters `named`, one sample and one output at a time."""
        params = [p for _, p in named]
        rows = []
        for i in _bar_iter(range(lo, hi), self.progress and hi - lo > 16):
            x = _slice(X, i, i + 1, self.device)
            with _precision_mode(self.precision, self.device):
                f = _call(self.model, x, self.output).reshape(-1)
            for c in range(f.shape[0]):
                gs = torch.autograd.grad(f[c], params, retain_graph=c < f.shape[0] - 1, allow_unused=True)
                rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                       for g, p in zip(gs, params)]))
        return torch.stack(rows)

    def func_jacobian(self, X, lo, hi, named, chunk) -> torch.Tensor:
        """Per-sample gradients (m C, P) of the parameters `named` via torch.func (vmap of jacrev)."""
        from torch.func import functional_call, jacrev, vmap

        names = [n for n, _ in named]
        fixed = {n: p.detach() for n, p in self.model.named_parameters()}
        buffers = dict(self.model.named_buffers())

        def f_one(ps, x):
            xb = {k: v[None] for k, v in x.items()} if isinstance(x, Mapping) else x[None]
            state = {**fixed, **ps, **buffers}
            out = _call_functional(functional_call, self.model, state, xb, self.output)
            return out.reshape(-1)

        rows = []
        ps = {n: p.detach() for n, p in named}
        for a in range(lo, hi, chunk):
            x = _slice(X, a, min(hi, a + chunk), self.device)
            with _precision_mode(self.precision, self.device):
                jac = vmap(jacrev(f_one), in_dims=(None, 0))(ps, x)  # {name: (m, C, *shape)}
            rows.append(torch.cat([jac[n].reshape(jac[n].shape[0] * jac[n].shape[1], -1) for n in names], 1))
        return torch.cat(rows)


def _call_functional(functional_call, model, state, x, output):
    out = functional_call(model, state, (), x) if isinstance(x, Mapping) else functional_call(model, state, (x,))
    return _apply_output(output, out, x)


def _plan(eng: _Engine, n: int, n2: int, symmetric: bool, budget: int, block_size: int | None) -> Plan:
    """Choose layer groups and the sample block so that captures + one forward chunk fit `budget`."""
    C = eng.C
    elem = torch.empty((), dtype=eng.cap_dtype).element_size()
    # Uses that share a parameter (tied weights) must be contracted together: union them into clusters.
    clusters: list[list[Use]] = []
    owner: dict[int, int] = {}
    for u in eng.uses:
        ps = [id(p) for p in (u.weight, u.bias) if p is not None]
        hit = sorted({owner[p] for p in ps if p in owner})
        if hit:
            tgt = hit[0]
            for h in hit[1:]:
                clusters[tgt] += clusters[h]
                clusters[h] = []
                for p, o in list(owner.items()):
                    if o == h:
                        owner[p] = tgt
            clusters[tgt].append(u)
        else:
            tgt = len(clusters)
            clusters.append([u])
        for p in ps:
            owner[p] = tgt
    clusters = [c for c in clusters if c]
    per_sample = [_capture_bytes(c, elem, C) for c in clusters]
    total = sum(per_sample)
    graph = max(GRAPH_MARGIN * eng.graph_bytes_per_sample, 1.0)
    P = sum(p.numel() for _, p in eng.selected)
    T = max((u.T for u in eng.uses), default=1)
    nmax = max(n, n2)
    n_all = n + (0 if symmetric else n2)
    L = len(eng.blocks or [])
    flops = sum(eng.seg_flops) if eng.blocks else 0.0
    workspace = min(3 << 30, 0.1 * budget)  # materialized slices, blocked token-pair tiles (kernels' budgets)
    # modes: full passes per group (False), segmented runs after a forward-only prefix ("prefix"), segmented
    # runs from cached hidden states ("skip": more cache, no prefix)
    modes: list = [False] + (["prefix"] + (["skip"] if eng.skip_prefix else []) if eng.blocks and flops > 0 else [])
    # ... each with its boundary cache on the device, or (CUDA) in pinned host memory, its copies priced in passes
    places = [False, True] if _host_cache_ok(eng.device) else [False]
    host_room = HOST_FRACTION * _host_available(0) if places[-1] else 0.0
    pass_s = 6.0 * P * n_all * T / PASS_FLOPS_PER_S.get(eng.precision, PASS_FLOPS_PER_S["fp32"])
    combos = [(m, h) for m in modes for h in (places if m else [False])]  # (segmented mode, cache in host memory)
    whole: set = set()  # modes in which a single sample tile fits
    best = None
    for G in range(1, len(clusters) + 1):
        groups = _split(clusters, per_sample, G)
        cap = max(_capture_bytes(g, elem, C) for g in groups)
        for segmented, host in combos:
            if segmented:  # one full pass caches boundary gradients; then each run recomputes its own blocks
                runs = [r for g in groups for r, _ in eng._runs(g)]
                E = tuple(sorted({s1 for _, s1 in runs if s1 <= L}))
                S = tuple(sorted({s0 - 1 for s0, _ in runs if s0 >= 1})) if segmented == "skip" else ()
                cache = n_all * (C * sum(eng.h_bytes[e] for e in E) + sum(eng.h_full[e] for e in S))
                run_graph = max(eng._run_graph(r) for r in runs)
                prefix = 0 if S else 1 / 3
                work = sum(
                    (sum(eng.seg_flops[a : b + 1]) + prefix * sum(eng.seg_flops[:a])) / flops for a, b in runs
                )  # local forward/backward (+ forward-only prefix), in full passes
                if host:  # the cache leaves the device; each chunk holds its own slices of it
                    if cache > host_room:
                        continue
                    run_graph += C * max(eng.h_bytes) + max(eng.h_full)
            else:
                E, S, cache, run_graph, work = (), (), 0, graph, float(G)
            on_device = 0 if host else cache
            # held: captures of a row block and a column block (one when a single block covers n), the contraction
            # kernels' workspace, and a chunk's graph (with the chunk's factors before they are stored: + cap)
            run_graph += cap
            B = nmax if block_size is None else min(block_size, nmax)
            while True:
                R = math.ceil(nmax / B)
                held = cap * B * (1 if R == 1 and symmetric else 2) + workspace
                free = 0.75 * budget - held - on_device
                if segmented:
                    chunk = int(free // run_graph)
                    ok = chunk >= min(B, 16)
                else:
                    chunk = max(1, min(B, int(0.25 * budget // run_graph)))
                    ok = held + chunk * run_graph <= 0.75 * budget
                if ok or B == 1:
                    break
                B = max(1, B // 2)
            chunk = max(1, min(B, chunk))
            if held + on_device + chunk * run_graph > budget:
                continue
            captures = R + R * (R - 1) / 2 if symmetric else R + R * R
            # the materialized form builds both blocks' per-sample gradients for every tile (2 B T P flops each,
            # 1/3 of a pass per n samples): R^2 block formations (symmetric), 2 R^2 (cross)
            forms = R * R * (1 if symmetric else 2) * B / nmax / 3
            passes = captures * B / nmax * work + (n_all / nmax if segmented else 0.0)
            # host copies: the cache out once, in once per capture of a tile
            copies = cache / n_all * (n_all + captures * B) / HOST_BYTES_PER_S / pass_s if host else 0.0
            cost = passes + forms + copies
            if best is None or cost < best[0] - 1e-9:
                best = (cost, groups, B, chunk, held, segmented, E, cache, free, run_graph, S, passes, host)
            if R == 1:
                whole.add((segmented, host))
        if len(whole) == len(combos):  # one sample tile fits in every combination: more groups only add passes
            break
    if best is None:
        raise NTKError(
            f"even one sample's captures ({total / 2**20:.1f} MiB) and graph ({graph / 2**20:.1f} MiB) exceed the "
            f"memory budget {budget / 2**20:.1f} MiB; raise max_memory, pick fewer params, or use precision='bf16'"
        )
    _, groups, B, chunk, held, segmented, E, cache, free, run_graph, S, passes, host = best
    if segmented:  # the boundary pass runs before any capture is held
        chunk = max(1, min(nmax, int((0.75 * budget - (0 if host else cache)) // graph)))
    flops_total = 6.0 * P * nmax * T * passes + 2.0 * n * n2 * P * C * C
    return Plan(
        n, n2, C, B, groups, [nm for nm, _ in eng.fallback], int(held), int(chunk * graph), chunk, flops_total,
        budget, segmented=bool(segmented), boundaries=E, bytes_boundary_cache=int(cache), starts=S,
        graph_budget=int(max(free, 0)), passes=passes, workspace=int(workspace), host_cache=bool(host),
    )


def _split(clusters, sizes, G):
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


def ntk(
    model: nn.Module,
    X: Inputs,
    X2: Inputs | None = None,
    *,
    output: Callable | None = None,
    params=None,
    precision: str = "fp32",
    strategy: str = "auto",
    trace: bool = False,
    normalize: bool | float = False,
    max_memory: int | None = None,
    block_size: int | None = None,
    progress: bool = True,
    stats: dict | None = None,
) -> torch.Tensor:
    """Empirical NTK Gram K[i, j] = J(x_i) J(x2_j)^T of `model` at its current parameters.

    X: (n, T) token ids (or (n, ...) inputs, or a dict of them passed as keywords); X2 the same for a cross
    kernel (default X). output: f of the model's batched output -> (n,) or (n, C); None uses the output as is.
    Returns (n, n2), or (n, n2, C, C) for C outputs (trace=True sums the diagonal over outputs -> (n, n2)),
    fp64 for precision="fp64" else fp32. params: see select_params. normalize: True divides by the model's
    width (docs/theory.md section 1), a number divides by it. strategy: "auto" picks ghost/materialized per layer by
    cost; "ghost"/"materialized" force one; "loop" and "func" are the references. max_memory: bytes for the
    engine's working set (default: most of free memory, capped at 8 GiB on CPU). stats: a dict to fill with
    the plan, the seconds spent capturing and contracting, and the contraction form chosen per layer (with
    stats["time_forms"] = True beforehand, also the seconds per form, synchronizing after each layer).
    """
    if precision not in PRECISIONS:
        raise NTKError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if strategy not in STRATEGIES:
        raise NTKError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    model, selected, X, X2 = _prepare(model, X, X2, params, precision)
    n = _n(X)
    n2 = n if X2 is None else _n(X2)
    eng = _Engine(model, output, selected, precision, strategy, progress, _device(model))
    eng.stats = stats
    # backward passes and contractions too, not only the forward, run at the precision's matmul flags
    with _matmul_flags(precision), _differentiable([p for _, p in selected]), _torch_errors():
        if strategy in ("loop", "func"):
            K = _reference(eng, X, X2, n, n2, strategy)
        else:
            K = _layerwise(eng, X, X2, n, n2, max_memory, block_size)
    C = eng.C
    K = K.reshape(n, C, n2, C).permute(0, 2, 1, 3)
    if trace:
        K = K.diagonal(dim1=2, dim2=3).sum(-1)
    elif eng.scalar_output:
        K = K[:, :, 0, 0]
    if normalize:
        K = K / (_width(model) if normalize is True else float(normalize))
    return K.to(torch.float64 if precision == "fp64" else torch.float32).contiguous()


def _prepare(model: nn.Module, X: Inputs, X2: Inputs | None, params, precision: str):
    """Checks, then (model in the precision's dtype, its selected (name, parameter)s, X, X2 in the model's dtype).

    Parameters are selected on the caller's model and carried to a converted copy by name; floating inputs
    follow the model's conversion (fp32 inputs of an fp32 model become fp64 with it)."""
    _check_model(model)
    _check_inputs(model, X, "X")
    if X2 is not None:
        _check_inputs(model, X2, "X2")
    names = [name for name, _ in select_params(model, params)]
    before = next(model.parameters()).dtype
    model = _in_precision(model, precision)
    after = next(model.parameters()).dtype
    by_name = dict(model.named_parameters())
    return model, [(name, by_name[name]) for name in names], _as_dtype(X, before, after), _as_dtype(X2, before, after)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _as_dtype(X: Inputs | None, before: torch.dtype, after: torch.dtype) -> Inputs | None:
    """Floating tensors of dtype `before` converted to `after` (the model's conversion), and floating tensors
    narrower than `after` widened to it (exact); others as they are."""

    def one(v):
        change = isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != after
        if change and (v.dtype == before or v.dtype.itemsize < after.itemsize):
            return v.to(after)
        return v

    if X is None:
        return X
    return one(X) if isinstance(X, torch.Tensor) else {k: one(v) for k, v in X.items()}


@contextlib.contextmanager
def _differentiable(params: list[nn.Parameter]):
    """Selected parameters require grad for the call (a frozen backbone's too: the NTK is a property of f and of
    the chosen parameters, not of which ones a training loop updates); restored afterwards."""
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


@contextlib.contextmanager
def _torch_errors():
    """torch's errors for reentrant activation checkpointing and for allocations that fail, as one NTKError."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if "use_reentrant=True" in text or "incompatible with .grad()" in text:
            raise NTKError(
                "the model uses reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True), "
                "which torch.autograd.grad cannot differentiate; use use_reentrant=False (transformers: "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})), or "
                "turn it off (transformers checkpoints only in training mode: model.eval())"
            ) from e
        if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text:
            raise NTKError(
                f"out of memory ({text.splitlines()[0][:200]}); pass a smaller max_memory, fewer params, shorter "
                f"inputs, or precision='bf16'"
            ) from e
        raise


def _in_precision(model: nn.Module, precision: str) -> nn.Module:
    """The model with parameters in the precision's dtype (fp64; fp32 for the others, bf16 models stay bf16):
    itself, or a converted copy."""
    want = torch.float64 if precision == "fp64" else torch.float32
    pdt = next(model.parameters()).dtype
    if pdt != want and not (precision == "bf16" and pdt == torch.bfloat16):
        return copy.deepcopy(model).to(want)  # deepcopy keeps tied parameters tied
    return model


def _width(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    for attr in ("d_model", "hidden_size", "n_embd"):
        if cfg is not None and getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise NTKError("normalize=True needs the model's width (config d_model/hidden_size); pass normalize=<width>")


def _layerwise(eng: _Engine, X, X2, n, n2, max_memory, block_size) -> torch.Tensor:
    start = time.perf_counter()
    symmetric = X2 is None
    budget = int(max_memory) if max_memory is not None else _default_budget(eng.device)
    eng.discover(X, budget)
    plan = _plan(eng, n, n2, symmetric, budget, block_size)
    eng.plan = plan
    eng.kernel_budget = max(1, int(plan.workspace // 24))  # ~3 intermediates of 8-byte elements
    # per-sample gradient slices are in the capture dtype; half the workspace leaves room for an fp32 operand copy
    eng.mat_budget = max(1, int(plan.workspace // (2 * eng.cap_dtype.itemsize)))
    C, B = eng.C, plan.block
    K = torch.zeros(n * C, n2 * C, dtype=torch.float64, device=eng.device)
    rows = [(a, min(n, a + B)) for a in range(0, n, B)]
    cols = rows if symmetric else [(a, min(n2, a + B)) for a in range(0, n2, B)]
    tiles = [(i, j) for i in range(len(rows)) for j in range(len(cols)) if not symmetric or j >= i]
    total = len(plan.groups) * len(tiles) + (len(tiles) if eng.fallback else 0)
    show = eng.progress and (total > 1 or plan.flops > 1e12)
    if show:
        print(plan, file=sys.stderr)
    bar = _bar(total, show)
    XJ = X if symmetric else X2
    if eng.stats is not None:
        eng.stats["plan"] = plan
    t = eng._tick("setup", start)
    gI = gJ = hI = hJ = None
    if plan.segmented:
        gI, hI = eng.boundary_grads(X, n, plan.boundaries, plan.chunk, plan.starts, plan.host_cache)
        gJ, hJ = (
            (gI, hI)
            if symmetric
            else eng.boundary_grads(X2, n2, plan.boundaries, plan.chunk, plan.starts, plan.host_cache)
        )
        t = eng._tick("boundary", t)
    for uses in plan.groups:
        for i, (a, b) in enumerate(rows):
            cI = eng.capture(X, a, b, uses, plan.chunk, gI, plan.graph_budget, hI)
            t = eng._tick("capture", t)
            for j, (c, d) in enumerate(cols):
                if symmetric and j < i:
                    continue
                same = symmetric and i == j
                cJ = cI if same else eng.capture(XJ, c, d, uses, plan.chunk, gJ, plan.graph_budget, hJ)
                t = eng._tick("capture", t)
                tile = eng.contract(uses, cI, cJ, same)
                t = eng._tick("contract", t)
                if tile is not None:
                    K[a * C : b * C, c * C : d * C] += tile
                del cJ
                bar.update(1)
            del cI
    if eng.fallback:
        for i, (a, b) in enumerate(rows):
            JI = eng.fallback_jacobian(X, a, b, plan.chunk)
            for j, (c, d) in enumerate(cols):
                if symmetric and j < i:
                    continue
                JJ = JI if symmetric and i == j else eng.fallback_jacobian(XJ, c, d, plan.chunk)
                K[a * C : b * C, c * C : d * C] += JI.double() @ JJ.double().T
                bar.update(1)
    bar.close()
    eng._tick("fallback", t)
    if symmetric:
        for i, (a, b) in enumerate(rows):
            for c, d in rows[:i]:  # tiles below the diagonal: the transposes of those computed above it
                K[a * C : b * C, c * C : d * C] = K[c * C : d * C, a * C : b * C].T
            # a diagonal tile's last-bit asymmetry (G G^T, vector Grams): its upper triangle, mirrored
            K[a * C : b * C, a * C : b * C] = mirror_upper(K[a * C : b * C, a * C : b * C])
    return K


def _reference(eng: _Engine, X, X2, n, n2, strategy) -> torch.Tensor:
    """The peers: `loop` (one backward per sample and output) and `func` (torch.func vmap of jacrev, chunks of 8)."""
    with torch.no_grad():
        probe = _call(eng.model, _slice(X, 0, 1, eng.device), eng.output)
    eng.scalar_output = probe.dim() == 1
    eng.C = 1 if probe.dim() == 1 else probe.shape[1]

    def jac(Xs, m):
        if strategy == "loop":
            return eng.loop_jacobian(Xs, 0, m, eng.selected)
        try:
            return eng.func_jacobian(Xs, 0, m, eng.selected, 8)
        except RuntimeError as e:
            raise NTKError(f"strategy='func': torch.func cannot run this model ({str(e).splitlines()[0][:160]}); "
                           f"strategy='loop' computes the same reference one backward pass at a time") from e

    J = jac(X, n)
    J2 = J if X2 is None else jac(X2, n2)
    acc = torch.float64 if eng.precision == "fp64" else torch.float32
    return (J.to(acc) @ J2.to(acc).T).double()


def _bar(total: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="NTK tiles", disable=not show, file=sys.stderr, leave=False)


def _bar_iter(it, show: bool):
    from tqdm.auto import tqdm

    return tqdm(it, desc="NTK samples", disable=not show, file=sys.stderr, leave=False)


def ntk_fn(model: nn.Module, **options) -> Callable[..., torch.Tensor]:
    """neural-tangents style: K_fn(X, X2=None) -> Gram, with `options` fixed (see ntk)."""

    def K_fn(X: Inputs, X2: Inputs | None = None) -> torch.Tensor:
        return ntk(model, X, X2, **options)

    return K_fn


def plan(
    model: nn.Module,
    X: Inputs,
    X2: Inputs | None = None,
    *,
    output: Callable | None = None,
    params=None,
    precision: str = "fp32",
    max_memory: int | None = None,
    block_size: int | None = None,
) -> Plan:
    """The tiling plan `ntk` would use (layer groups, sample blocks, memory, flops), without the Gram."""
    model, selected, X, X2 = _prepare(model, X, X2, params, precision)
    device = _device(model)
    eng = _Engine(model, output, selected, precision, "auto", False, device)
    budget = int(max_memory) if max_memory is not None else _default_budget(device)
    with _matmul_flags(precision), _differentiable([p for _, p in selected]), _torch_errors():
        eng.discover(X, budget)
    n = _n(X)
    n2 = n if X2 is None else _n(X2)
    return _plan(eng, n, n2, X2 is None, budget, block_size)
