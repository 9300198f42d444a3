"""The probe's checks: which selected parameters the layer algebra covers, and whether the block chain can be run
in pieces. Each check says why, in words the fallback warning repeats. docs/theory.md section 2.5."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .blocks import forward
from .capture import Capture, boundary_grads, capture_chunks, factors
from .errors import CONTRACTED
from .layers import CONV1D, EMBED, LINEAR, NORM, Use, kind, known_forwards, layer_issue, layer_params, storage
from .recorder import Recorder
from .spec import Spec
from .structure import Chain, Structure


def structural_reasons(spec: Spec) -> dict[int, str]:
    """{id(parameter): why} for the selected parameters of layers layer_issue refuses (NTKError for max_norm)."""
    sel, known, reasons = {id(p) for _, p in spec.selected}, known_forwards(), {}
    for name, mod in spec.model.named_modules():
        if kind(mod) is None:
            continue
        ps = [p for p in layer_params(mod) if id(p) in sel]
        why = layer_issue(name, mod, known) if ps else None
        for p in ps if why else []:
            reasons.setdefault(id(p), why)
    return reasons


def layout_reasons(spec: Spec, rec: Recorder, f: torch.Tensor, m: int) -> dict[int, str]:
    """{id(parameter): why} for selected parameters of layer calls whose rows are not one block per sample: the
    call's tensors do not lead with the samples (rec.misfit), or the gradient of one sample's outputs reaches
    rows of another sample's block (a (T, n, ...) layout flattened, or samples mixed), for any probe sample."""
    sel = {id(p) for _, p in spec.selected}
    why = dict(rec.misfit)
    calls = [(name, mod, k) for name, mod, k in rec.seen if (id(mod), k) in rec.outputs]
    calls = [c for c in calls if any(id(p) in sel for p in layer_params(c[1]))]
    outs = [rec.outputs[(id(mod), k)] for _, mod, k in calls]
    live = [i for i, o in enumerate(outs) if o.requires_grad]
    for j in range(m) if live and m > 1 else []:
        gs = torch.autograd.grad(f[j].sum(), [outs[i] for i in live], retain_graph=True, allow_unused=True)
        for i, g in zip(live, gs):
            name, mod, k = calls[i]
            if g is not None and torch.cat([g.reshape(m, -1)[:j], g.reshape(m, -1)[j + 1 :]]).any():
                why.setdefault((id(mod), k), f"{name} does not keep each sample's rows apart (output "
                                             f"{tuple(g.shape)} for {m} samples)")
    mods = {(id(mod), k): mod for _, mod, k in rec.seen}
    return {id(p): text for key, text in why.items() for p in layer_params(mods[key]) if id(p) in sel}


def make_uses(spec: Spec, rec: Recorder, m: int, routed: set) -> list[Use]:
    """The probe's record as uses of the selected, not routed parameters, in call order."""
    sel = {id(p) for _, p in spec.selected}
    uses, first_x = [], {}
    for name, mod, k in rec.seen:
        if (id(mod), k) in rec.misfit:
            continue
        w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
        w = w if isinstance(w, nn.Parameter) and id(w) in sel and id(w) not in routed else None
        b = b if isinstance(b, nn.Parameter) and id(b) in sel and id(b) not in routed else None
        if w is None and b is None:
            continue
        xin, out = rec.inputs[(id(mod), k)], rec.outputs[(id(mod), k)]
        kd = kind(mod)
        width = math.prod(mod.normalized_shape) if kd == NORM else out.shape[-1]
        label, shares = (name if k == 0 else f"{name}#{k}"), ""
        if w is not None and kd in (LINEAR, CONV1D):  # layers fed the same tensor store it once
            shares = first_x.setdefault(storage(xin), label)
        uses.append(Use(name, mod, k, kd, w, b, float(getattr(mod, "w_mult", 1.0)), float(getattr(mod, "b_mult", 1.0)),
                        T=out.numel() // (m * width), d_in=1 if kd == EMBED else xin.shape[-1], d_out=width,
                        segment=rec.segment_of[(id(mod), k)], shares_x="" if shares == label else shares))
    return uses


def without(uses: list[Use], routed: set) -> list[Use]:
    """The uses with routed parameters removed (and uses left with none dropped)."""
    kept = []
    for u in uses:
        u = dataclasses.replace(u, weight=None if u.weight is not None and id(u.weight) in routed else u.weight,
                                bias=None if u.bias is not None and id(u.bias) in routed else u.bias)
        if u.weight is not None or u.bias is not None:
            kept.append(u)
    return kept


def gradient_reasons(spec: Spec, rec: Recorder, uses: list[Use], f: torch.Tensor, m: int) -> dict[int, str]:
    """{id(p): why} for selected parameters with no contracted use, or whose implied gradient of a random
    combination of all outputs differs from autograd's on the probe's samples (implied_matches)."""
    r = torch.randn(f.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fr = (f * r.to(f.device, f.dtype)).sum(1, keepdim=True)
    params = [p for _, p in spec.selected]
    grads = torch.autograd.grad(fr.sum(), params, allow_unused=True, retain_graph=True)
    cap = factors(spec, rec, uses, fr, m, columns=[0], magnitudes=True)
    reasons = {}
    for (name, p), g in zip(spec.selected, grads):
        mine = [u for u in uses if p is u.weight or p is u.bias]
        if not mine:
            reasons[id(p)] = f"{name} is not a parameter of a layer the engine contracts ({CONTRACTED})"
            continue
        implied, magnitude = implied_gradient(mine, cap, p)
        ref = torch.zeros_like(implied) if g is None else g.double()
        if not implied_matches(implied, magnitude, ref, spec.tol):
            reasons[id(p)] = f"{name} is also used outside its layer"
    return reasons


def implied_matches(implied: torch.Tensor, magnitude: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    """Whether the layers' implied gradient equals autograd's `ref` to tol relative to the sum of the terms'
    magnitudes (the scale of a sum's rounding error): a gradient that cancels to zero (a key-projection bias,
    which softmax ignores) passes, a parameter also used outside its layers fails by O(1)."""
    scale = max(magnitude.max().item() + ref.abs().max().item(), 1e-300)
    return (implied - ref).abs().max().item() <= tol * scale


def implied_gradient(uses: list[Use], cap: Capture, p: nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i G_i of parameter p over its uses, fp64 in its layout, and the same sum of |terms|."""
    implied = torch.zeros(p.shape, dtype=torch.float64, device=p.device)
    magnitude = torch.zeros_like(implied)
    for u in uses:
        if u.weight is p and u.kind != NORM:
            implied += weight_sum(u, cap).reshape(p.shape)
            magnitude += weight_sum(u, cap, absolute=True).reshape(p.shape)
        for q, key in ((u.bias, "bias"), (u.weight if u.kind == NORM else None, "weight")):
            if q is p:
                implied += cap.vec[(u.label, key)].double().sum(0).reshape(p.shape)
                magnitude += cap.vec_abs[(u.label, key)].double().sum(0).reshape(p.shape)
    return implied, magnitude


def weight_sum(u: Use, cap: Capture, absolute: bool = False) -> torch.Tensor:
    """sum_i G_i of a use's weight, fp64, in the parameter's layout; absolute: the sum of |terms|."""
    mag = torch.abs if absolute else (lambda t: t)
    mult = abs(u.w_mult) if absolute else u.w_mult
    if u.kind == EMBED:
        tok, D = cap.tok[u.label], mag(cap.B[u.label].double())
        G = torch.zeros(u.weight.shape, dtype=torch.float64, device=D.device)
        G.index_add_(0, tok.reshape(-1), D.reshape(-1, D.shape[-1]))
        return mult * G
    return mult * torch.einsum("mtr,mtc->rc", mag(cap.A[u.label].double()), mag(cap.B[u.label].double()))


def chain_of(rec: Recorder, blocks: tuple, m: int, cap_dtype: torch.dtype, expand: bool):
    """(Chain, h_bytes, h_full): the blocks, if the probe ran them once each, in order, as a chain of hidden
    states (else no blocks), with the bytes per sample of the hidden state at each boundary."""
    ev, forms = rec.events, rec.forms
    form = next(iter(forms)) if len(forms) == 1 else None  # None: runs cannot skip blocks
    L = len(blocks)
    want = [(k_, k) for k in range(L) for k_ in ("pre", "post")]
    ok = L > 0 and [(k_, k) for k_, k, _ in ev] == want and all(h is not None and h.shape[0] == m for *_, h in ev)
    ok = ok and all(ev[2 * k + 1][2] is ev[2 * k + 2][2] for k in range(L - 1))
    if not ok:
        return Chain((), form, expand), (), ()
    hs = [ev[2 * k][2] for k in range(L)] + [ev[-1][2]]  # boundary e: input of block e; L: the last output
    h_bytes = tuple(h.numel() / m * min(h.element_size(), cap_dtype.itemsize) for h in hs)
    return Chain(blocks, form, expand), h_bytes, tuple(h.numel() / m * h.element_size() for h in hs)


def segmented_ok(spec: Spec, st: Structure, x, m: int) -> tuple[bool, bool]:
    """(whether runs of segments from cached boundary gradients reproduce the full pass's factors, whether they
    also do so starting from cached hidden states)."""
    uses = list(st.uses)
    rec, f = forward(spec, st.chain, x, uses, m)
    full = factors(spec, rec, uses, f, m)
    del rec, f
    L = st.chain.L
    segs = sorted({u.segment for u in uses})
    E, H = [s for s in segs if s <= L], [s - 1 for s in segs if s >= 1]
    for skip in ([True, False] if st.chain.out_form is not None else [False]):
        try:
            grads, hidden = boundary_grads(spec, st, x, m, E, m, H if skip else ())
            same = all(same_factors(full, capture_chunks(spec, st, x, 0, m, [u for u in uses if u.segment == s], m,
                                                         (s, s), grads, hidden), spec.tol) for s in segs)
        except Exception:  # a model that reads more than the hidden state of a skipped block's output
            if not skip:
                raise
            same = False
        if same:
            return True, skip
    return False, False


def same_factors(full: Capture, part: Capture, tol: float) -> bool:
    """part's factors equal full's (same keys) to tol relative to each factor's largest entry."""
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
