"""Capture hooks: what one forward pass records of the layers (inputs, and outputs as autograd edges), and, in
the probe, which parameters are read outside their layers. Opacus' capture hooks, apart from the layer math."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from .errors import CONTRACTED, NTKError
from .layers import Use, layer_params


@dataclass
class Out:
    """A recorded layer output, held as its autograd edge: the gradient w.r.t. it can be asked for while its memory
    goes back as soon as the graph frees it (holding the tensors kept every layer's output alive at the peak)."""

    edge: object
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


class Recorder:
    """Forward hooks that keep the inputs and outputs of the layers in `uses` for one forward pass of m samples of
    T tokens (every supported layer, with tensors for outputs, in the probe)."""

    def __init__(self, uses: list[Use], m: int, probe: bool = False, T: int = 0, expand: bool = True):
        self.m, self.probe, self.T, self.expand = m, probe, T, expand
        self.by_module: dict[int, dict[int, Use]] = {}
        for u in uses:
            self.by_module.setdefault(id(u.module), {})[u.call] = u
        self.calls: dict[int, int] = {}
        self.inputs: dict[tuple[int, int], torch.Tensor] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor | Out] = {}
        self.handles: list = []
        self.expanded = False  # an Embedding's batch-1 input was given one row per sample
        self.scalar_output = False  # f returned (m,) rather than (m, C)
        self.taps: dict[int, torch.Tensor] = {}  # block-boundary hidden states (blocks.forward's taps)
        # the probe's record: layer calls in order, the segment each ran in, block events and output forms,
        # calls whose rows are not one block per sample, parameters read outside their layers
        self.stack: list[int] = []
        self.seen: list[tuple[str, nn.Module, int]] = []
        self.segment = 0
        self.segment_of: dict[tuple[int, int], int] = {}
        self.events: list[tuple[str, int, torch.Tensor | None]] = []
        self.forms: set[int | None] = set()
        self.misfit: dict[tuple[int, int], str] = {}
        self.outside: dict[int, str] = {}

    def attach(self, modules: Iterable[tuple[str, nn.Module]]) -> Recorder:
        for name, mod in modules:
            self.handles.append(mod.register_forward_pre_hook(self._pre))
            self.handles.append(mod.register_forward_hook(self._make_post(name)))
        return self

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

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

    def _make_post(self, name: str):
        def post(mod, args, out):
            k = self.calls.get(id(mod), 0)
            self.calls[id(mod)] = k + 1
            if self.probe:
                if self.stack and self.stack[-1] == id(mod):
                    self.stack.pop()
                self.seen.append((name, mod, k))
                self.segment_of[(id(mod), k)] = self.segment
            elif self.by_module.get(id(mod), {}).get(k) is None:
                return
            self._keep(name, mod, k, args, out)

        return post

    def _keep(self, name: str, mod: nn.Module, k: int, args: tuple, out) -> None:
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
            self.outputs[key] = Out(get_gradient_edge(out), out.shape, out.dtype, out.device)


# Tensor methods that read metadata, not values: a parameter passed to them is not "used".
_METADATA = {"size", "dim", "numel", "nelement", "ndimension", "is_floating_point", "is_complex", "element_size",
             "stride", "storage_offset", "is_contiguous", "data_ptr", "get_device", "untyped_storage", "detach",
             "__len__", "__format__", "__repr__", "__hash__", "__bool__"}


class ParamUses(torch.overrides.TorchFunctionMode):
    """During the probe's forward: selected parameters that an operation reads anywhere but inside the forward of
    a layer holding them (F.linear(x, mod.weight) elsewhere, torch.where(mask, p, ...), ...), whatever the data:
    rec.outside = {id(p): why}. Metadata (shape, dtype, device) and detached reads do not count."""

    def __init__(self, selected, layers, rec: Recorder):
        super().__init__()
        self.names = {id(p): n for n, p in selected}
        self.owners: dict[int, set[int]] = {}
        for _, mod in layers:
            for p in layer_params(mod):
                self.owners.setdefault(id(p), set()).add(id(mod))
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in _METADATA and not name.endswith("__get__"):
            here = self.rec.stack[-1] if self.rec.stack else None
            for a in _leaves((args, kwargs)):
                if isinstance(a, nn.Parameter) and id(a) in self.names and here not in self.owners.get(id(a), ()):
                    why = ("is read outside its layer" if id(a) in self.owners else
                           f"is not a parameter of a layer the engine contracts ({CONTRACTED}); it is read")
                    self.rec.outside.setdefault(id(a), f"{self.names[id(a)]} {why} by {name}")
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
