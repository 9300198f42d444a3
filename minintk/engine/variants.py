"""Kernels of other optimizers: K(x, x') = <g(x), phi(g(x'))> with g the per-sample gradient of f w.r.t. the
selected parameters and phi elementwise (docs/theory.md section 2.7; Malladi et al., ICML 2023):

- "sgd": phi = identity, the empirical NTK (the engine's default path, not this file);
- "signgd": phi = sign, the kernel of sign gradient descent, which describes Adam's early steps; asymmetric;
- adam(v, eps): phi(g) = g / (sqrt(v) + eps), a fixed diagonal preconditioner from a second-moment estimate v
  per parameter; symmetric.

An elementwise phi of the gradient has no ghost form, so each parameter's per-sample gradients (summed over its
uses: a tied embedding and LM head are one parameter) are formed in slices of rows, true multipliers applied,
and contracted as G1 phi(G2)^T in fp32 (fp64 in fp64 mode).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..kernels import embedding_grad_slice, grad_slice
from ..kernels._common import mm_fp32
from .capture import Capture
from .contract import _sum
from .errors import NTKError
from .layers import EMBED, NORM, Use

KERNELS = ("sgd", "signgd", "adam")


@dataclass(frozen=True)
class Variant:
    """A kernel other than the eNTK: its name ("signgd" or "adam"), and for "adam" the second-moment estimates
    by parameter name and eps. Build with signgd() or adam(...)."""

    name: str
    second_moment: Mapping[str, torch.Tensor] = field(default_factory=dict)
    eps: float = 1e-8

    @property
    def symmetric(self) -> bool:
        return self.name == "adam"


def signgd() -> Variant:
    """The SignGD kernel <g(x), sign(g(x'))> (asymmetric: K[i, j] pairs x_i's gradient with x_j's sign)."""
    return Variant("signgd")


def adam(second_moment: Mapping[str, torch.Tensor], eps: float = 1e-8) -> Variant:
    """The Adam-preconditioned kernel <g(x), g(x') / (sqrt(v) + eps)>: v = second_moment[name] (the parameter's
    shape, finite, >= 0) for every selected parameter, by name. From a torch.optim.Adam after `step` steps:
    {name: opt.state[p]["exp_avg_sq"] / (1 - beta2**step) for name, p in model.named_parameters()} (the
    bias-corrected estimate Adam divides by). NTKError for a non-mapping, non-finite entries or eps <= 0; missing
    names and shapes are checked against the selected parameters by ntk."""
    if not (eps > 0 and math.isfinite(eps)):
        raise NTKError(f"adam kernel: eps={eps}; expected a finite number > 0")
    if not isinstance(second_moment, Mapping):
        raise NTKError(f"adam kernel: second_moment must be a dict {{parameter name: tensor}}, got "
                       f"{type(second_moment).__name__}")
    v = {name: torch.as_tensor(t) for name, t in second_moment.items()}
    bad = [name for name, t in v.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise NTKError(f"adam kernel: the second moments of {bad[:6]} hold NaN or inf")
    return Variant("adam", v, float(eps))


def as_variant(kernel) -> Variant | None:
    """None for the eNTK ("sgd"), else the Variant; NTKError naming what is accepted."""
    if isinstance(kernel, Variant):
        return kernel
    if kernel == "sgd":
        return None
    if kernel == "signgd":
        return signgd()
    if kernel == "adam":
        raise NTKError("kernel='adam' needs the second moments: pass kernel=adam(second_moment, eps)")
    if kernel is signgd or kernel is adam:
        raise NTKError(f"kernel={kernel.__name__} is the function: pass kernel={kernel.__name__}(...) (or 'signgd')")
    raise NTKError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)} (adam as adam(v, eps))")


def weights(variant: Variant, selected, device: torch.device, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """For "adam": {id(parameter): 1 / (sqrt(v) + eps)} in `dtype` on `device`; NTKError for a missing name, a
    wrong shape or a negative entry. {} for other variants."""
    if variant.name != "adam":
        return {}
    v = variant.second_moment
    missing = [n for n, _ in selected if n not in v]
    if missing:
        raise NTKError(f"adam kernel: no second moment for {missing[:6]}{' ...' if len(missing) > 6 else ''}; "
                       "give one per selected parameter (by name)")
    out = {}
    for name, p in selected:
        t = torch.as_tensor(v[name])
        if tuple(t.shape) != tuple(p.shape):
            raise NTKError(f"adam kernel: second moment of {name} has shape {tuple(t.shape)}, the parameter "
                           f"{tuple(p.shape)}")
        if bool((t < 0).any()):
            raise NTKError(f"adam kernel: second moment of {name} has negative entries")
        out[id(p)] = (1.0 / (t.to(device, torch.float64).sqrt() + variant.eps)).to(dtype)
    return out


def phi(variant: Variant, G: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """The variant's elementwise map of gradient slices G (m, k): sign, or times the flattened weights w (k,)."""
    return torch.sign(G) if variant.name == "signgd" else G * w.to(G.dtype)


def reference_columns(variant: Variant, J: torch.Tensor, selected, w: dict[int, torch.Tensor]) -> torch.Tensor:
    """phi applied to per-sample Jacobians J (m, P) whose columns are the selected parameters in order."""
    if variant.name == "signgd":
        return torch.sign(J)
    return J * torch.cat([w[id(p)].reshape(-1) for _, p in selected]).to(J.dtype)


def contract_variant(variant: Variant, uses: list[Use], cI: Capture, cJ: Capture, w: dict[int, torch.Tensor],
                     budget: int) -> torch.Tensor | None:
    """sum over the parameters of `uses` of G_I phi(G_J)^T, fp64 (rows and columns: virtual samples); None if
    no use. Parameters are whole: every use of one is summed before phi."""
    K = None
    for p, us in _by_parameter(uses).items():
        for GI, GJ, flat in _slices(p, us, cI, cJ, budget):
            t = mm_fp32(GI, phi(variant, GJ, w[id(p)].reshape(-1)[flat] if w else None).T).double()
            K = t if K is None else K.add_(t)
    return K


def _by_parameter(uses: list[Use]) -> dict[torch.nn.Parameter, list[tuple[Use, str]]]:
    out: dict = {}
    for u in uses:
        for p, key in ((u.weight, "weight"), (u.bias, "bias")):
            if p is not None:
                out.setdefault(p, []).append((u, key))
    return out


def _slices(p: torch.nn.Parameter, us: list[tuple[Use, str]], cI: Capture, cJ: Capture, budget: int):
    """(G_I, G_J, the flat range of p they cover) per slice of p's rows, flattened row-major, summed over the
    uses."""
    if p.dim() == 1 or any(u.kind == NORM or key == "bias" for u, key in us):
        yield _vector(us, cI), _vector(us, cJ), slice(0, p.numel())
        return
    R, per_row = p.shape[0], p[0].numel()
    m = _rows_of(us[0][0], cI) + _rows_of(us[0][0], cJ)
    step = max(1, min(R, budget // max(1, m * per_row)))
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        yield _matrix(us, cI, r0, r1), _matrix(us, cJ, r0, r1), slice(r0 * per_row, r1 * per_row)


def _rows_of(u: Use, cap: Capture) -> int:
    return (cap.tok if u.kind == EMBED else cap.A)[u.label].shape[0]


def _vector(us, cap: Capture) -> torch.Tensor:
    return _sum([cap.vec[(u.label, key)] for u, key in us])


def _matrix(us, cap: Capture, r0: int, r1: int) -> torch.Tensor:
    """Per-sample gradients of weight rows r0:r1 summed over the uses, each with its multiplier."""
    parts = []
    for u, _ in us:
        if u.kind == EMBED:
            g = embedding_grad_slice(cap.tok[u.label], cap.B[u.label], r0, r1)
        else:  # A spans the weight's rows (D for Linear, X for Conv1D): G = A^T B
            A, B = cap.A[u.label], cap.B[u.label]
            g = grad_slice(B, A, r0, r1, torch.promote_types(A.dtype, B.dtype))
        parts.append(g if u.w_mult == 1.0 else g * u.w_mult)
    return _sum(parts)

