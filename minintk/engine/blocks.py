"""The block chain: one forward pass of the model that records layers and can run only some of its blocks.

A run of segments (s0, s1) records autograd only from segment s0 on, stops at the end of s1 and leaves the
hidden state there in rec.taps[s1]; it can start from a cached hidden state instead of recomputing the blocks
before s0. Segments and boundaries: structure.Structure."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import NTKError
from .inputs import Inputs, tokens
from .layers import Use, kind
from .outputs import call
from .precision import forward_mode
from .recorder import ParamUses, Recorder
from .spec import Spec
from .structure import Chain


def find_blocks(model: nn.Module) -> tuple[nn.Module, ...]:
    """The model's stack of transformer blocks: its longest ModuleList of one module type holding layers."""
    best = None
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(c) for c in mod}) == 1:
            if any(kind(s) is not None for s in mod[0].modules()) and (best is None or len(mod) > len(best)):
                best = mod
    return tuple(best) if best is not None else ()


def hidden_in(args: tuple, kwargs: dict) -> torch.Tensor | None:
    h = args[0] if args else kwargs.get("hidden_states")
    return h if isinstance(h, torch.Tensor) else None


def hidden_out(out) -> torch.Tensor | None:
    h = out if isinstance(out, torch.Tensor) else (out[0] if isinstance(out, (tuple, list)) and out else None)
    return h if isinstance(h, torch.Tensor) else None


def out_form(out) -> int | None:
    """How a block returns its hidden state: 0 as a tensor, k as a k-tuple (h, ...), None otherwise."""
    if isinstance(out, torch.Tensor):
        return 0
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return len(out)
    return None


def with_hidden(form: int, h: torch.Tensor):
    """A skipped block's output of the given form (see out_form): h, or (h, None, ...) (transformers' blocks also
    return attention weights, which their models read only when asked to output attentions)."""
    return h if form == 0 else (h,) + (None,) * (form - 1)


def _grad_on(*_) -> None:
    torch.set_grad_enabled(True)


class _Stop(Exception):
    """Raised by a hook to end a forward pass at the end of a run of blocks."""


class BlockHooks:
    """The hooks one pass puts on the blocks; removed, and skipped blocks given their forward back, on exit."""

    def __init__(self, chain: Chain, rec: Recorder):
        self.blocks, self.form, self.rec = chain.blocks, chain.out_form, rec
        self.handles: list = []
        self.skipped: list[tuple[nn.Module, object]] = []
        self.grad_from_start = True

    def __enter__(self) -> BlockHooks:
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        for blk, fwd in self.skipped:
            if fwd is None:
                del blk.forward
            else:
                blk.forward = fwd

    def pre(self, k: int, fn) -> None:
        self.handles.append(self.blocks[k].register_forward_pre_hook(fn, with_kwargs=True))

    def post(self, k: int, fn) -> None:
        self.handles.append(self.blocks[k].register_forward_hook(fn))

    def log(self) -> None:
        """Probe: log block entries/exits with their hidden states and output forms; track the running segment."""
        rec = self.rec
        for k in range(len(self.blocks)):

            def enter(mod, args, kwargs, k=k):
                rec.events.append(("pre", k, hidden_in(args, kwargs)))
                rec.segment = k + 1

            def leave(mod, args, out, k=k):
                rec.events.append(("post", k, hidden_out(out)))
                rec.forms.add(out_form(out))
                rec.segment = k + 2

            self.pre(k, enter)
            self.post(k, leave)

    def tap(self, e: int, stop: bool = False) -> None:
        """Keep the hidden state at boundary e in rec.taps[e] (and end the pass there if stop)."""
        rec, L = self.rec, len(self.blocks)

        def keep(h):
            rec.taps[e] = h
            if stop:
                raise _Stop

        if e < L:
            self.pre(e, lambda mod, args, kwargs: keep(hidden_in(args, kwargs)))
        else:
            self.post(L - 1, lambda mod, args, out: keep(hidden_out(out)))

    def run(self, run: tuple[int, int], start: torch.Tensor | None) -> None:
        """Graph from segment s0 on (from `start` at boundary s0 - 1 when given: the blocks before it return their
        input), to the end of segment s1."""
        s0, s1 = run
        L = len(self.blocks)
        if s0 > 0:
            self.grad_from_start = False
            if start is not None:
                self._start_from(s0, start)
            elif s0 <= L:
                self.pre(s0 - 1, _grad_on)
            else:
                self.post(L - 1, _grad_on)
        if s1 <= L:
            self.tap(s1, stop=True)

    def _start_from(self, s0: int, start: torch.Tensor) -> None:
        form, L = self.form, len(self.blocks)
        for k in range(min(s0 - 1, L)):
            self.skipped.append((self.blocks[k], self.blocks[k].__dict__.get("forward")))
            self.blocks[k].forward = lambda *a, **kw: with_hidden(form, hidden_in(a, kw))

        def inject_in(mod, args, kwargs):
            torch.set_grad_enabled(True)
            return ((start,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": start})

        def inject_out(mod, args, out):
            torch.set_grad_enabled(True)
            return with_hidden(form, start)

        if s0 <= L:
            self.pre(s0 - 1, inject_in)
        else:
            self.post(L - 1, inject_out)


def forward(spec: Spec, chain: Chain, x: Inputs, uses: list[Use], m: int, *, probe: bool = False, saved=None,
            run: tuple[int, int] | None = None, taps=(), start: torch.Tensor | None = None,
            recorder_out: list | None = None):
    """One forward pass of m samples recording the layers of `uses` (every supported layer when probing):
    (recorder, f (m, C)), or (recorder, None) for a run that ends before the output. run, start: see BlockHooks;
    taps: boundaries whose hidden states go to rec.taps. saved: saved-tensor hooks (the probe's measurements,
    which read the recorder, appended to recorder_out, during the pass)."""
    rec = Recorder(uses, m, probe, tokens(x), chain.expand_batch1)
    if recorder_out is not None:
        recorder_out.append(rec)
    layers = [(n, mod) for n, mod in spec.model.named_modules() if kind(mod) is not None]
    if not probe:
        want = {id(u.module) for u in uses}
        layers = [(n, mod) for n, mod in layers if id(mod) in want]
    rec.attach(layers)
    f = None
    try:
        with BlockHooks(chain, rec) as hooks:
            if probe:
                hooks.log()
            if run is not None:
                hooks.run(run, start)
            for e in taps:
                hooks.tap(e)
            with forward_mode(spec.precision, spec.device, cache=not spec.graph), contextlib.ExitStack() as ctx:
                if saved:
                    ctx.enter_context(torch.autograd.graph.saved_tensors_hooks(*saved))
                if probe:
                    ctx.enter_context(ParamUses(spec.selected, layers, rec))
                ctx.enter_context(torch.set_grad_enabled(hooks.grad_from_start))
                f = call(spec.model, x, spec.output)
    except _Stop:
        pass
    finally:
        rec.close()
    if f is None:
        return rec, None
    rec.scalar_output = f.dim() == 1
    return rec, _checked(f, m, finite=not spec.graph)


def _checked(f: torch.Tensor, m: int, finite: bool = True) -> torch.Tensor:
    """f as (m, C); NTKError for another shape or (if finite) non-finite values."""
    if f.dim() not in (1, 2) or f.shape[0] != m:
        raise NTKError(f"output must return one value (m,) or C values (m, C) per sample; for {m} samples it "
                       f"returned shape {tuple(f.shape)}")
    if finite and not torch.isfinite(f).all():
        raise NTKError("the model's output holds NaN or inf for these inputs")
    return f if f.dim() == 2 else f[:, None]
