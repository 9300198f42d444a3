"""CUDA graphs of small Grams: a call repeated with inputs of one shape replays the recorded kernels of its capture
and contraction instead of running ~1,000 launches from Python (small Grams are bound by those launches).

The replay is the same computation as the eager engine's, with two differences that keep it exact for any data:
time steps without gradient are not dropped (they add zeros), and f's finiteness is checked on K after the replay
(a NaN or inf in f reaches K). A graph is recorded for one model state: its parameters (values may change in
place; a new tensor, dtype or device starts over), its modules' settings (attributes, train/eval, hooks), the
selected parameters, the output function, the input shapes and the options. Anything else starts over.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .errors import NTKError
from .inputs import Inputs
from .plan import Plan
from .spec import Spec
from .structure import Structure

MODES = ("auto", True, False)

# model -> {key: (_Graph, or the number of eager calls seen, or None (not recordable); the key's attribute values)}
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    X: Inputs  # static inputs the graph reads
    X2: Inputs | None
    K: torch.Tensor  # static output the graph writes


def release() -> None:
    """Drop every recorded graph, and the device memory it holds."""
    _GRAPHS.clear()


def eligible(spec: Spec, st: Structure, p: Plan, mode) -> bool:
    """Whether a call may be graphed: on CUDA, one layer group and one sample tile, no segmented plan, nothing on
    the reference path; for mode "auto" also a working set below 1/8 of the device's memory (a graph keeps its
    memory between calls)."""
    if mode is False or spec.device.type != "cuda" or st.fallback or p.segmented or len(p.groups) != 1 \
            or spec.variant is not None:
        return False
    if p.block < max(p.n, p.n2):
        return False
    total = torch.cuda.get_device_properties(spec.device).total_memory
    return mode is True or p.bytes_captures + p.bytes_graph_chunk <= total / 8


def graphed_gram(spec: Spec, st: Structure, p: Plan, X: Inputs, X2: Inputs | None, mode, options: tuple,
                 run: Callable[[Spec, Inputs, Inputs | None], torch.Tensor]) -> tuple[torch.Tensor | None, str]:
    """(K, "graph replay") from this call's graph, or (K, "graph record") on the call that records it (the second
    eager call for "auto", the first for True), or (None, "") when the caller should run eagerly. run(spec, X, X2)
    is the eager Gram (tiles.gram with its options)."""
    per_model = _GRAPHS.setdefault(spec.model, {})
    state, values = _fingerprint(spec)
    key = (state, _signature(X), _signature(X2), options)
    got, _ = per_model.get(key, (0, None))
    if got is None:
        return None, ""
    if isinstance(got, _Graph):
        _copy_into(got.X, X)
        if X2 is not None:
            _copy_into(got.X2, X2)
        got.graph.replay()
        return _finite(got.K.clone()), "graph replay"
    per_model.clear()  # one graph per model (its memory is held): another state's or shape's is dropped
    if mode == "auto" and got < 1:
        per_model[key] = (got + 1, values)
        return None, ""
    K, graph = _record(spec, X, X2, run)
    per_model[key] = (graph, values)
    return _finite(K), "graph record"


def _record(spec: Spec, X: Inputs, X2: Inputs | None, run) -> tuple[torch.Tensor, _Graph | None]:
    """One eager run on a side stream with host syncs forbidden (its K is this call's result; it also warms up
    cuBLAS and autograd), then the capture of the same run. A sync (a model that reads values on the host) would
    break the capture and leave CUDA's generators mid-capture, so it is found in the eager run: then (K of a
    plain eager run, None) with a warning naming it; else (K, the graph)."""
    g = replace(spec, graph=True)
    Xs, X2s = _static(X, spec.device), _static(X2, spec.device)
    side = torch.cuda.Stream(spec.device)
    side.wait_stream(torch.cuda.current_stream(spec.device))
    try:
        with torch.cuda.stream(side), _no_syncs():
            K = run(g, Xs, X2s)
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        at = traceback.extract_tb(e.__traceback__)[-1]
        warnings.warn(f"minintk: this Gram is not recorded as a CUDA graph: the model synchronizes with the host at "
                      f"{at.filename}:{at.lineno} ({at.line}); calls with these shapes run eagerly", stacklevel=5)
        torch.cuda.current_stream(spec.device).wait_stream(side)
        return run(spec, X, X2), None
    torch.cuda.current_stream(spec.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            Ks = run(g, Xs, X2s)
    except Exception as e:  # noqa: BLE001 - this call's K is already exact; the capture is an optimization
        warnings.warn(f"minintk: recording this Gram as a CUDA graph failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0]}); calls with these shapes run eagerly. A failed capture can leave "
                      "CUDA's random generators unusable in this process: pass cuda_graph=False for this model",
                      stacklevel=5)
        return K, None
    return K, _Graph(graph, Xs, X2s, Ks)


@contextlib.contextmanager
def _no_syncs():
    """Host syncs raise RuntimeError (torch.cuda.set_sync_debug_mode), as they would break a capture."""
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def _finite(K: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(K).all():
        raise NTKError("the model's output holds NaN or inf for these inputs (or its Gram overflows)")
    return K


def _static(X: Inputs | None, device: torch.device) -> Inputs | None:
    if X is None:
        return None
    if isinstance(X, torch.Tensor):
        return X.to(device, copy=True)
    return {k: v.to(device, copy=True) for k, v in X.items()}


def _copy_into(static: Inputs, X: Inputs) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(X, non_blocking=True)
    else:
        for k, v in static.items():
            v.copy_(X[k], non_blocking=True)


def _signature(X: Inputs | None) -> tuple:
    if X is None:
        return ()
    items = [("", X)] if isinstance(X, torch.Tensor) else sorted(X.items())
    return tuple((k, v.dtype, tuple(v.shape), v.device) for k, v in items)


def _fingerprint(spec: Spec) -> tuple[tuple, list]:
    """What the recorded kernels depend on beyond the inputs, as (key, values): parameter and buffer storage, the
    modules' public attributes (by identity: a changed setting is a new object; `values` keeps them alive with
    the graph, so no identity is reused while it is), hooks, the selected parameters, the output function,
    precision and layout."""
    m = spec.model
    tensors = tuple((t.data_ptr(), t.dtype, t.shape) for t in [*m.parameters(), *m.buffers()])
    values = [v for mod in m.modules() for k, v in vars(mod).items() if k[0] != "_"]
    hooks = tuple((len(mod._forward_hooks), len(mod._forward_pre_hooks)) for mod in m.modules())
    key = (tensors, tuple(map(id, values)), hooks, tuple(id(p) for _, p in spec.selected), spec.output,
           spec.precision, spec.outputs)
    return key, values
