"""The probe: one forward/backward pass over a few samples that finds a model's structure, once per model,
parameters, output, input shape and precision (as a compiler traces a function once). clear_cache() forgets.
docs/theory.md sections 2.3-2.5."""

from __future__ import annotations

import dataclasses
import sys
import time
import weakref
from collections.abc import Callable, Mapping

import torch

from . import checks
from .blocks import find_blocks, forward
from .errors import REENTRANT, NTKError, warn, warn_fallback
from .inputs import Inputs, n_samples, take, tokens
from .layers import CONV1D, LINEAR, kind
from .outputs import call
from .precision import forward_mode
from .recorder import Recorder
from .spec import Spec
from .structure import Chain, Structure

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: Structure}


def clear_cache() -> None:
    """Forget every model's probed structure (after replacing modules or re-tying weights)."""
    _CACHE.clear()


def discover(spec: Spec, X: Inputs, budget: int, *, margin: float = 1.5, progress: bool = False) -> Structure:
    """The model's Structure, probed once per (model, parameters, output, input shape, precision). Warns about
    parameters routed to the reference path when it probes (once per model and setting); NTKError if the probe
    cannot fit `budget` bytes."""
    sig = tuple((k, v.dtype, tuple(v.shape[1:])) for k, v in (X.items() if isinstance(X, Mapping) else [("", X)]))
    key = (tuple(id(p) for _, p in spec.selected), spec.output, sig, spec.precision)
    per_model = _CACHE.setdefault(spec.model, {})
    if key in per_model:
        return per_model[key]
    start = time.perf_counter()
    probe_fits(spec, X, budget, margin)
    st = per_model[key] = probe(spec, X)
    seconds = time.perf_counter() - start
    if progress and seconds > 1.0:
        print(f"minintk: probed the model's layers in {seconds:.1f} s (once per model, parameters, output and input "
              f"shape)", file=sys.stderr)
    return st


def probe(spec: Spec, X: Inputs) -> Structure:
    """Probe a few samples of X (probe_rows): the uses of the selected parameters, their shapes, graph memory
    and flops per segment, the block chain, and the parameters that go to per-sample gradients of the whole
    model (warned about, with why: checks.py)."""
    idx = probe_rows(spec.model, X)
    m = len(idx)
    x = take(X, idx, spec.device)
    blocks = find_blocks(spec.model)
    rec, f, stats, expand = _probe_forward(spec, x, m, blocks)
    _refuse_reentrant(f)
    if stats.narrow is not None:
        warn(f"precision='fp64', but the model computes part of its forward in {stats.narrow[0]} (its autograd graph "
             f"saves a {stats.narrow[0]} tensor of shape {stats.narrow[1]}; transformers' GPT-Neo, for one, casts "
             f"its attention scores to fp32): the Gram is exact for this function, whose values carry that dtype's "
             f"rounding")
    chain, h_bytes, h_full = checks.chain_of(rec, blocks, m, spec.cap_dtype, expand)
    reasons = checks.structural_reasons(spec)
    for id_p, why in {**checks.layout_reasons(spec, rec, f, m), **rec.outside}.items():
        reasons.setdefault(id_p, why)
    uses = checks.make_uses(spec, rec, m, set(reasons))
    for id_p, why in checks.gradient_reasons(spec, rec, uses, f, m).items():
        reasons.setdefault(id_p, why)
    if reasons:
        uses = checks.without(uses, set(reasons))
        warn_fallback(list(dict.fromkeys(reasons.values())))
    st = Structure(
        tuple(uses), tuple((n, p) for n, p in spec.selected if id(p) in reasons),
        tuple(dict.fromkeys(reasons.values())), C=f.shape[1], scalar_output=rec.scalar_output,
        n_params=spec.n_params, graph_bytes=sum(stats.seg_bytes) / m,
        seg_graph=tuple(b / m for b in stats.seg_bytes), seg_flops=_segment_flops(rec, m, len(blocks)),
        h_bytes=h_bytes, h_full=h_full, chain=chain,
    )
    del rec, f
    if not (chain.blocks and uses):
        return st
    ok, skip = checks.segmented_ok(spec, st, x, m)
    return _with(st, skip_prefix=skip) if ok else _with(st, chain=Chain((), chain.out_form, expand))


def _with(st: Structure, **changes) -> Structure:
    return dataclasses.replace(st, **changes)


def probe_rows(model, X: Inputs, most: int = 6) -> list[int]:
    """The samples the probe runs: the first and the last, and those that hold what the data holds of special
    tokens and padding (an embedding's padding id; the most padded row, a left- and a right-padded one). One
    sample is run twice: a layer that mixes samples or orders them (T, n, ...) shows only with two."""
    n = n_samples(X)
    if n == 1:
        return [0, 0]
    found = [0, n - 1]
    tensors = {"": X} if isinstance(X, torch.Tensor) else dict(X)
    pads = {m.padding_idx for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None}
    for key, v in tensors.items():
        if v.dim() != 2 or v.is_floating_point():
            continue
        if "mask" in key:
            off = v == 0
            found += [int(off.sum(1).argmax())] + [int(c.nonzero()[0]) for c in (off[:, 0], off[:, -1]) if c.any()]
        else:
            found += [int(hit.nonzero()[0]) for hit in ((v == p).any(1) for p in pads) if hit.any()]
    return sorted(list(dict.fromkeys(found))[:most])


class ProbeStats:
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


def _probe_forward(spec: Spec, x, m: int, blocks: tuple):
    """The probe's forward pass, recording every layer: (recorder, f, ProbeStats, expand). Embeddings fed a batch
    of 1 (transformers' position ids) get one row per sample only where that leaves f as it is: else (an error,
    or another f) the pass is run again without, and those layers' rows then do not lead with the samples."""
    for expand in (True, False):
        stats = ProbeStats(m, tokens(x), len(blocks) + 2, spec.precision)
        box: list[Recorder] = []
        try:
            rec, f = forward(spec, Chain(blocks, None, expand), x, [], m, probe=True,
                             saved=stats.hooks(lambda box=box: box[0].segment if box else 0), recorder_out=box)
        except NTKError:
            raise
        except Exception:
            if not expand:
                raise
            continue
        if not (expand and rec.expanded) or _same_as_plain(spec, x, f):
            return rec, f, stats, expand
    raise AssertionError("unreachable")


def _same_as_plain(spec: Spec, x, f: torch.Tensor) -> bool:
    """Whether f equals the model's own output without the engine's hooks (to the precision's tolerance)."""
    with torch.no_grad(), forward_mode(spec.precision, spec.device):
        plain = call(spec.model, x, spec.output)
    plain = plain if plain.dim() == 2 else plain[:, None]
    if plain.shape != f.shape:
        return False
    scale = max(plain.abs().max().item(), 1e-30)
    return (plain.double() - f.detach().double()).abs().max().item() <= spec.tol * scale


def _refuse_reentrant(f: torch.Tensor) -> None:
    """NTKError if f's autograd graph holds a reentrant activation checkpoint (its forward ran without a graph,
    so layer outputs inside it cannot be differentiated by torch.autograd.grad)."""
    todo, seen = [f.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "CheckpointFunctionBackward":
            raise NTKError(REENTRANT)
        todo.extend(n for n, _ in node.next_functions)


def _segment_flops(rec: Recorder, m: int, L: int) -> tuple[float, ...]:
    """Forward flops per sample of the linear layers, per segment (0 before the blocks, k + 1 in block k, ...)."""
    flops = [0.0] * (L + 2)
    for _, mod, k in rec.seen:
        key = (id(mod), k)
        if kind(mod) in (LINEAR, CONV1D) and key in rec.outputs:
            flops[rec.segment_of[key]] += 2.0 * rec.outputs[key].numel() / m * rec.inputs[key].shape[-1]
    return tuple(flops)


def probe_fits(spec: Spec, X: Inputs, budget: int, margin: float, lengths: tuple[int, ...] = (64, 128, 256)) -> None:
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
            with forward_mode(spec.precision, spec.device), torch.enable_grad(), \
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                call(spec.model, take(cut, [0], spec.device), spec.output)
        except Exception:
            return
        sizes.append(saved[0])
    coef = torch.linalg.solve(torch.tensor([[1.0, t, t * t] for t in lengths], dtype=torch.float64),
                              torch.tensor(sizes, dtype=torch.float64))
    need = float(coef @ torch.tensor([1.0, T, T * T], dtype=torch.float64))
    m = len(probe_rows(spec.model, X))
    if margin * m * need > budget:
        raise NTKError(
            f"one sample of length T={T} needs ~{need / 2**30:.1f} GiB for its forward/backward pass (fitted from "
            f"T={', '.join(map(str, lengths))}); the probe's {m} samples need ~{margin * m * need / 2**30:.1f} GiB, "
            f"over the memory budget of {budget / 2**30:.1f} GiB: shorten the inputs or raise max_memory"
        )
