"""Capture: the per-layer factors of a block of samples, from forward/backward passes in chunks.

A Linear's per-sample gradient is G_i = A_i^T B_i with A = D (output-gradients), B = X (inputs), token by
token (Conv1D: A = X, B = D); an Embedding keeps its tokens and D; biases and LayerNorm keep their per-sample
vector gradients. With C outputs, every sample becomes C virtual samples (rows i C + c), one backward pass per
output. docs/theory.md section 2.3."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .blocks import forward
from .inputs import Inputs, rows
from .layers import CONV1D, EMBED, LINEAR, NORM, Use, capture_bytes, norm_hat, storage
from .recorder import Out, Recorder
from .spec import Spec
from .structure import Structure, run_graph, runs


@dataclass
class Capture:
    """Per-use factors of m samples x C outputs, after time compression. Layout by Spec.outputs:
    "full": virtual samples (m C rows, i C + c), every factor; "diagonal": the per-output factor (D) and the
    vectors in virtual samples, the per-sample one (X, tokens) in m rows; "trace": m rows, the C outputs' D side
    by side (T, C d_out) and the vectors side by side (C numel), so that one Gram sums over outputs.

    Matrix weights: G = A^T B with A (rows, T, r), B (rows, T, c) (tokens (rows, T) instead of A for embeddings).
    Vectors: per-sample gradient of each vector parameter (rows, numel), multiplier applied.
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


def output_grads(rec: Recorder, uses: list[Use], f, columns: list[int], root=None) -> list[list[torch.Tensor]]:
    """Per use, the gradient of sum_i f_c(x_i) w.r.t. its output, for each c in columns (one backward pass each;
    the last frees the graph). root=(h, g): backpropagate from a boundary h with its cached gradient g (m, C, ...).
    Outputs f does not depend on get zeros."""
    outs = [rec.outputs[(id(u.module), u.call)] for u in uses]
    live = [i for i, o in enumerate(outs) if isinstance(o, Out) or o.requires_grad]
    refs = [outs[i].edge if isinstance(outs[i], Out) else outs[i] for i in live]
    Ds: list[list[torch.Tensor]] = [[] for _ in uses]
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
    return Ds


def factors(spec: Spec, rec: Recorder, uses: list[Use], f, m: int, columns=None, root=None,
            magnitudes: bool = False) -> Capture:
    """The factors of every use of one recorded pass (virtual samples ordered i C + c). columns: the outputs
    (default all); root: see output_grads; magnitudes: also Capture.vec_abs, for the probe's check."""
    columns = list(range(f.shape[1] if root is None else root[1].shape[1])) if columns is None else columns
    Ds = output_grads(rec, uses, f, columns, root)
    cap, C = Capture(), len(columns)
    xs: dict[tuple, torch.Tensor] = {}  # one stored copy of an input several layers read (q/k/v projections)
    for i, u in enumerate(uses):
        Dl, Ds[i] = Ds[i], None  # a layer's output-gradient is freed once its factors are stored
        Dl = [d.reshape(m, -1, u.d_out) for d in Dl]
        if C == 1:
            D = Dl[0]
        elif spec.outputs == "trace":  # the outputs side by side: (m, T, C d_out)
            D = torch.cat(Dl, -1)
        else:  # virtual samples: (m C, T, d_out)
            D = torch.stack(Dl, 1).reshape(m * C, -1, u.d_out)
        del Dl
        _store(spec, cap, u, rec.inputs[(id(u.module), u.call)], D, m, C, xs, magnitudes)
    return cap


def _store(spec: Spec, cap: Capture, u: Use, x: torch.Tensor, D: torch.Tensor, m: int, C: int, xs: dict,
           magnitudes: bool) -> None:
    """One use's factors into cap: D (mC, T, d_out), x the layer's recorded input."""
    dt, vt = spec.cap_dtype, spec.vec_dtype
    full = spec.outputs == "full"

    def per_virtual(t):  # (m, ...) -> (m C, ...), each sample repeated for its C outputs
        return t if C == 1 else t[:, None].expand(m, C, *t.shape[1:]).reshape(m * C, *t.shape[1:])

    def like_d(t):  # a per-sample (m, T, d) factor laid out as D is, for elementwise products with it
        return t.repeat(1, 1, C) if spec.outputs == "trace" and C > 1 else per_virtual(t)

    if u.kind == EMBED:
        tok = x.reshape(m, -1)
        if u.module.padding_idx is not None:  # torch gives the padding row no gradient
            pad = (tok == u.module.padding_idx)[..., None]
            D = D.masked_fill(pad if spec.outputs == "trace" else per_virtual(pad), 0)
        if u.weight is not None:
            cap.tok[u.label], cap.B[u.label] = (per_virtual(tok) if full else tok), D.to(dt)
        return
    if u.kind == NORM and u.weight is not None:
        terms = D.to(vt) * like_d(norm_hat(u.module, x).reshape(m, -1, u.d_out)).to(vt)
        cap.vec[(u.label, "weight")] = terms.sum(1)
        if magnitudes:
            cap.vec_abs[(u.label, "weight")] = terms.abs().sum(1)
    elif u.kind != NORM and u.weight is not None:
        sig = storage(x)
        if sig not in xs:
            X = x.reshape(m, -1, x.shape[-1])
            xs[sig] = (per_virtual(X) if full else X).to(dt)
        # Row factor A spans the weight's first dimension: D for Linear (out, in), X for Conv1D (in, out).
        A, B = (D.to(dt), xs[sig]) if u.kind == LINEAR else (xs[sig], D.to(dt))
        cap.A[u.label], cap.B[u.label] = A, B
    if u.bias is not None:
        g = D.sum(1, dtype=vt)
        cap.vec[(u.label, "bias")] = g if u.b_mult == 1.0 else g.mul_(u.b_mult)
        if magnitudes:
            cap.vec_abs[(u.label, "bias")] = D.abs().sum(1, dtype=vt) * abs(u.b_mult)


def capture_chunks(spec: Spec, st: Structure, X: Inputs, lo: int, hi: int, uses: list[Use], chunk: int, run=None,
                   grads=None, hidden=None) -> Capture:
    """Factors of samples lo:hi for `uses`, forward/backward in chunks (of a run of segments, see blocks.forward;
    grads, hidden: boundary_grads' caches, from which a run is rooted and started)."""
    cap, made = Capture(), None
    e = run[0] - 1 if run is not None else -1
    for a in range(lo, hi, chunk):
        b = min(hi, a + chunk)
        start = hidden[e][a:b].to(spec.device, non_blocking=True) if hidden and e in hidden else None
        rec, f = forward(spec, st.chain, rows(X, a, b, spec.device), uses, b - a, run=run, start=start)
        root = None
        if f is None:
            h = rec.taps[run[1]]
            root = (h, grads[run[1]][a:b].to(spec.device, non_blocking=True).to(h.dtype))
        part = factors(spec, rec, uses, f, b - a, root=root)
        del rec, f, root
        if made is None and b == hi:  # one chunk: its factors are the capture
            return part
        if made is None:  # the factors of all samples lo:hi, filled chunk by chunk; a shared factor, one buffer
            made = {}
            for name, key, v in part.items():  # rows per sample: C (virtual samples) or 1
                made.setdefault(id(v), v.new_empty(((hi - lo) * (v.shape[0] // (b - a)), *v.shape[1:])))
                getattr(cap, name)[key] = made[id(v)]
        done: set[int] = set()
        for name, key, v in part.items():
            if id(v) not in done:
                done.add(id(v))
                k = v.shape[0] // (b - a)
                getattr(cap, name)[key][(a - lo) * k : (b - lo) * k] = v
        del part
    return cap


def capture(spec: Spec, st: Structure, X: Inputs, lo: int, hi: int, uses: list[Use], chunk: int, *, grads=None,
            graph_budget: int = 0, hidden=None, margin: float = 1.5) -> Capture:
    """Factors of samples lo:hi for `uses`, with time steps that carry no gradient dropped. grads, hidden
    (boundary_grads of X): each run of segments is recomputed alone (from a cached hidden state where there is
    one) in chunks whose graph (x margin) and factors fit graph_budget bytes; otherwise full passes in chunks of
    `chunk` samples."""
    if grads is None:
        cap = capture_chunks(spec, st, X, lo, hi, uses, chunk)
    else:
        cap = Capture()
        for run, us in runs(uses):
            per = run_graph(st, run, margin) + capture_bytes(us, spec.cap_dtype.itemsize, st.C,
                                                             spec.outputs == "full")
            c = max(1, min(hi - lo, int(graph_budget // per)))
            for name, key, v in capture_chunks(spec, st, X, lo, hi, us, c, run, grads, hidden).items():
                getattr(cap, name)[key] = v
    return cap if spec.graph else drop_silent_steps(cap, uses, spec.device)


def drop_silent_steps(cap: Capture, uses: list[Use], device: torch.device) -> Capture:
    """Drop the tokens where a layer's output-gradient vanishes for every sample (LM logits but the last, say):
    exact, and the contractions get shorter. One sync for all layers."""
    mats = [u for u in uses if u.weight is not None and u.kind != NORM]
    # max |D| per step, over samples first (a coalesced reduction; one over (0, 2) at once was 10% of a small call)
    norms = [torch.linalg.vector_norm(cap.B[u.label] if u.kind in (EMBED, CONV1D) else cap.A[u.label],
                                      math.inf, dim=0).amax(-1) for u in mats]
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
        idx = torch.tensor(steps, dtype=torch.long, device=device)
        if u.kind == EMBED:
            cap.tok[u.label] = take(cap.tok[u.label], idx, steps)
        else:
            cap.A[u.label] = take(cap.A[u.label], idx, steps)
        cap.B[u.label] = take(cap.B[u.label], idx, steps)
    return cap


def boundary_grads(spec: Spec, st: Structure, X: Inputs, n: int, E, chunk: int, H=(), host: bool = False):
    """The boundary cache of a segmented plan, by full forward/backward passes in chunks: ({e: dF_c/dh_e (n, C,
    *h.shape[1:])} at the boundaries E, in h's dtype or the narrower capture dtype; {e: h_e (n, *h.shape[1:])} at
    the boundaries H, in their own dtype, so that a run starts from exactly the state the full pass had).
    host: both in pinned host memory, filled by asynchronous copies (capture_chunks copies each chunk's slice in)."""
    where = {"device": "cpu", "pin_memory": spec.device.type == "cuda"} if host else {}
    grads: dict[int, torch.Tensor] = {}
    hidden: dict[int, torch.Tensor] = {}
    E, H = list(E), list(H)
    if not E and not H:
        return grads, hidden
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        rec, f = forward(spec, st.chain, rows(X, a, b, spec.device), [], b - a, taps=sorted(set(E) | set(H)))
        for e in H:
            h = rec.taps[e]
            if e not in hidden:
                hidden[e] = torch.empty((n, *h.shape[1:]), dtype=h.dtype, **(where or {"device": h.device}))
            hidden[e][a:b].copy_(h.detach(), non_blocking=True)
        hs = [rec.taps[e] for e in E]
        for e, h, g in zip(E, hs, _boundary_columns(f, hs)):
            if e not in grads:  # 16-bit modes keep them in the capture dtype (half the memory)
                dt = spec.cap_dtype if spec.cap_dtype.itemsize < h.dtype.itemsize else h.dtype
                grads[e] = torch.empty((n, f.shape[1], *h.shape[1:]), dtype=dt, **(where or {"device": h.device}))
            # one contiguous slice per chunk (an asynchronous copy into pinned memory must not need a staging copy)
            grads[e][a:b].copy_(g, non_blocking=True)
        del rec, f, hs
    return grads, hidden


def _boundary_columns(f: torch.Tensor, hs: list[torch.Tensor]) -> Iterable[torch.Tensor]:
    """Per boundary state h (m, ...), dF_c/dh for every output c stacked (m, C, ...), one boundary at a time (the
    columns of each are freed as it is yielded); zeros where f does not depend on h."""
    C = f.shape[1]
    live = [i for i, h in enumerate(hs) if h.requires_grad]
    cols: list[list[torch.Tensor]] = [[] for _ in hs]
    for c in range(C if hs else 0):
        gs = torch.autograd.grad(f[:, c].sum(), [hs[i] for i in live], retain_graph=c < C - 1,
                                 allow_unused=True) if live else []
        got = dict(zip(live, gs))
        for i, h in enumerate(hs):
            g = got.get(i)
            cols[i].append(torch.zeros_like(h) if g is None else g)
    for gl in cols:
        yield torch.stack(gl, 1)
        gl.clear()
