"""The function f whose Jacobian is taken: the model's output, or `output` applied to it (label_words for LMs)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from .errors import NTKError
from .inputs import Inputs


def label_words(ids: Iterable[int], diff: bool = False, position: int | str = "last") -> Callable:
    """Output f for an LM: logits of token `ids` at `position` (n, k), or logit[ids[1]] - logit[ids[0]] (n,).

    position "last": each sample's last attended token (the last 1 of its attention_mask, so right, left and no
    padding all read the sample's own last token; the last position without a mask); an int: that position.
    Works on a (n, T, V) logits tensor or any model output with a `.logits` field (transformers). The engine
    passes the inputs as the second argument (f.takes_inputs); called by hand, pass them too, f(out, inputs): without
    them "last" is position T - 1, padding included. Raises NTKError for a bad diff or position.
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
        z = torch.stack([z[:, i] for i in ids], 1)  # not z[:, ids]: a list index is copied to the device (a sync)
        return z[:, 1] - z[:, 0] if diff else z

    f.takes_inputs = True
    return f


def apply_output(output: Callable | None, out, x: Inputs) -> torch.Tensor:
    """f of the model's output `out` on inputs x: output(out[, x]), or out itself; NTKError if not a tensor."""
    f = out if output is None else output(out, x) if getattr(output, "takes_inputs", False) else output(out)
    if isinstance(f, torch.Tensor):
        return f
    raise NTKError(
        f"the model returned {type(f).__name__}, not a tensor of outputs; pass output=..., e.g. "
        f"minintk.label_words([id0, id1], diff=True) for an LM"
    )


def call(model: nn.Module, x: Inputs, output: Callable | None) -> torch.Tensor:
    """f(x) of a batch: the model run on x (a dict goes as keyword arguments), then the output function."""
    out = model(**x) if isinstance(x, Mapping) else model(x)
    return apply_output(output, out, x)


def call_functional(model: nn.Module, state: dict, x: Inputs, output: Callable | None) -> torch.Tensor:
    """call() through torch.func.functional_call with the parameters and buffers in `state`."""
    from torch.func import functional_call

    out = functional_call(model, state, (), x) if isinstance(x, Mapping) else functional_call(model, state, (x,))
    return apply_output(output, out, x)
