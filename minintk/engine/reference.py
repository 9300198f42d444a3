"""Per-sample gradients of the whole model: the reference strategies ("loop": one backward pass per sample and
output; "func": torch.func vmap of jacrev), and the path of the parameters the layer algebra does not cover."""

from __future__ import annotations

import sys
from collections.abc import Mapping

import torch

from .errors import NTKError, warn
from .inputs import Inputs, rows
from .outputs import call, call_functional
from .precision import forward_mode
from .spec import Spec
from .variants import reference_columns


def loop_jacobian(spec: Spec, X: Inputs, lo: int, hi: int, named, progress: bool = False) -> torch.Tensor:
    """Per-sample gradients (m C, P) of the parameters `named` for samples lo:hi, one sample and output at a time."""
    params = [p for _, p in named]
    out = []
    for i in _bar(range(lo, hi), progress and hi - lo > 16):
        with forward_mode(spec.precision, spec.device):
            f = call(spec.model, rows(X, i, i + 1, spec.device), spec.output).reshape(-1)
        for c in range(f.shape[0]):
            gs = torch.autograd.grad(f[c], params, retain_graph=c < f.shape[0] - 1, allow_unused=True)
            out.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)]))
    return torch.stack(out)


def func_jacobian(spec: Spec, X: Inputs, lo: int, hi: int, named, chunk: int) -> torch.Tensor:
    """Per-sample gradients (m C, P) of the parameters `named` via torch.func (vmap of jacrev), in chunks."""
    from torch.func import jacrev, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = [n for n, _ in named]
    fixed = {n: p.detach() for n, p in spec.model.named_parameters()}
    buffers = dict(spec.model.named_buffers())

    def f_one(ps, x):
        xb = {k: v[None] for k, v in x.items()} if isinstance(x, Mapping) else x[None]
        return call_functional(spec.model, {**fixed, **ps, **buffers}, xb, spec.output).reshape(-1)

    out = []
    ps = {n: p.detach() for n, p in named}
    for a in range(lo, hi, chunk):
        # attention's math kernel: vmap has batching rules for its ops, not for the fused kernels
        with forward_mode(spec.precision, spec.device), sdpa_kernel(SDPBackend.MATH):
            jac = vmap(jacrev(f_one), in_dims=(None, 0))(ps, rows(X, a, min(hi, a + chunk), spec.device))
        out.append(torch.cat([jac[n].reshape(jac[n].shape[0] * jac[n].shape[1], -1) for n in names], 1))
    return torch.cat(out)


class FallbackJacobian:
    """Per-sample gradients of the fallback parameters: torch.func where it can run the model, else one backward
    pass per sample and output (data-dependent control flow such as transformers' padding-mask checks,
    activation checkpointing), said once in a warning. The way is chosen on the first chunk of the call."""

    def __init__(self, spec: Spec, named, progress: bool = False):
        self.spec, self.named, self.progress = spec, named, progress
        self.by_loop: bool | None = None

    def __call__(self, X: Inputs, lo: int, hi: int, chunk: int) -> torch.Tensor:
        if self.by_loop is None:
            try:
                first = func_jacobian(self.spec, X, lo, min(hi, lo + chunk), self.named, chunk)
            except RuntimeError as e:
                self.by_loop = True
                warn(f"torch.func cannot run this model ({str(e).splitlines()[0][:160]}); the fallback parameters' "
                     f"per-sample gradients come from one backward pass per sample and output instead")
            else:
                self.by_loop = False
                rest = func_jacobian(self.spec, X, lo + chunk, hi, self.named, chunk) if hi > lo + chunk else None
                return first if rest is None else torch.cat([first, rest])
        if self.by_loop:
            return loop_jacobian(self.spec, X, lo, hi, self.named, self.progress)
        return func_jacobian(self.spec, X, lo, hi, self.named, chunk)


def reference_gram(spec: Spec, X: Inputs, X2: Inputs | None, n: int, n2: int, strategy: str,
                   progress: bool = False) -> tuple[torch.Tensor, int, bool]:
    """(K (n C, n2 C) fp64, C, scalar output) by the peers: "loop" or "func" (chunks of 8)."""
    with torch.no_grad():
        probe = call(spec.model, rows(X, 0, 1, spec.device), spec.output)

    def jac(Xs, m):
        if strategy == "loop":
            return loop_jacobian(spec, Xs, 0, m, spec.selected, progress)
        try:
            return func_jacobian(spec, Xs, 0, m, spec.selected, 8)
        except RuntimeError as e:
            raise NTKError(f"strategy='func': torch.func cannot run this model ({str(e).splitlines()[0][:160]}); "
                           f"strategy='loop' computes the same reference one backward pass at a time") from e

    J = jac(X, n)
    J2 = J if X2 is None else jac(X2, n2)
    if spec.variant is not None:  # another optimizer's kernel: phi on the second argument's gradients
        J2 = reference_columns(spec.variant, J2, spec.selected, spec.weights)
    acc = torch.float64 if spec.precision == "fp64" else torch.float32
    K = (J.to(acc) @ J2.to(acc).T).double()
    return K, 1 if probe.dim() == 1 else probe.shape[1], probe.dim() == 1


def _bar(it, show: bool):
    from tqdm.auto import tqdm

    return tqdm(it, desc="NTK samples", disable=not show, file=sys.stderr, leave=False)
