"""The layers the engine contracts and what a call of one keeps: their kinds, the structural rules that send a
layer's parameters to the reference path, and Use, one call of a layer. docs/theory.md sections 2.3-2.5."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import NTKError

LINEAR, CONV1D, EMBED, NORM = "linear", "conv1d", "embedding", "layernorm"


def kind(m: nn.Module) -> str | None:
    """The layer kind of a module (LINEAR, CONV1D, EMBED, NORM), or None for anything else."""
    if isinstance(m, nn.Linear):
        return LINEAR
    if is_conv1d(m):
        return CONV1D
    if isinstance(m, nn.Embedding):
        return EMBED
    if isinstance(m, nn.LayerNorm):
        return NORM
    return None


def is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 style y = x W + b), not torch.nn.Conv1d."""
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers") and hasattr(m, "nf")


def layer_params(m: nn.Module) -> list[nn.Parameter]:
    """A supported layer's weight and bias, where they are Parameters."""
    return [p for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(p, nn.Parameter)]


def known_forwards() -> set:
    """forward functions whose per-sample gradients are the layer algebra (ours multiply by w_mult / b_mult,
    which the engine reads)."""
    from .. import model as ours

    return {nn.Linear.forward, nn.Embedding.forward, nn.LayerNorm.forward, ours.Linear.forward,
            ours.Embedding.forward}


def layer_issue(name: str, m: nn.Module, known: set) -> str | None:
    """Why the parameters of a supported layer cannot be contracted layer by layer (they then come from
    per-sample gradients of the whole model), or None. Decided from the module's structure, never from a probe
    of a few samples. Raises NTKError for an Embedding with max_norm, whose forward rewrites its own weight."""
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
    if type(m).forward not in known and not is_conv1d(m):
        return f"{where} is a {type(m).__qualname__}, whose forward overrides its base class's"
    if m._forward_hooks or m._forward_pre_hooks:
        return f"{where} has forward hooks, which may change what it computes"
    return None


@dataclass(frozen=True)
class Use:
    """One call of a supported layer whose parameters are selected, as the probe saw it. Shapes are per
    (virtual) sample: T rows of d_in inputs and d_out outputs (d_in = 1 for embeddings)."""

    name: str
    module: nn.Module | None
    call: int
    kind: str
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    w_mult: float = 1.0
    b_mult: float = 1.0
    T: int = 0
    d_in: int = 0
    d_out: int = 0
    segment: int = 0  # 0 before the first block, k + 1 inside block k, L + 1 after the last (blocks.find_blocks)
    shares_x: str = ""  # label of an earlier use with the same input tensor (q/k/v projections): X stored once

    @property
    def label(self) -> str:
        return self.name if self.call == 0 else f"{self.name}#{self.call}"

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def bytes_per_sample(self, elem: int, C: int, with_x: bool = True, x_per_output: bool = True) -> int:
        """Bytes a capture keeps per sample: the factors (the input once, or once per output for the full
        multi-output kernel; the output-gradient per output), or for LayerNorm its summed vector gradients."""
        if self.kind == NORM:
            return C * ((self.weight is not None) + (self.bias is not None)) * self.d_out * max(elem, 4)
        x = self.T * (self.d_in if self.kind != EMBED else 1) * (8 if self.kind == EMBED else elem)
        return (C if x_per_output else 1) * x * with_x + C * self.T * self.d_out * elem


def capture_bytes(uses: list[Use], elem: int, C: int, x_per_output: bool = True) -> int:
    """Capture bytes per sample of a set of uses, counting an input shared by several of them once."""
    labels = {u.label for u in uses}
    return sum(u.bytes_per_sample(elem, C, u.shares_x not in labels, x_per_output) for u in uses)


def storage(t: torch.Tensor) -> tuple:
    """What makes two tensors the same values: memory, layout and dtype."""
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


def norm_hat(mod: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the normalized dimensions, in at least fp32 (one fused kernel)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.layer_norm(xf, mod.normalized_shape, eps=mod.eps)
