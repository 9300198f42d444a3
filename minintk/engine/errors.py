"""The engine's error type, its warnings (pointing at the caller's line), and torch's errors said in its terms."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterable

CONTRACTED = "torch.nn Linear, Embedding and LayerNorm, transformers' Conv1D, minintk's Linear and Embedding"


class NTKError(ValueError):
    """The NTK cannot be computed for this model, input or setting; the message says what to change."""


def warn(message: str) -> None:
    """warnings.warn pointing at the first caller outside minintk."""
    frame, level = sys._getframe(1), 2
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    while frame is not None and frame.f_code.co_filename.startswith(here):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def warn_fallback(reasons: Iterable[str]) -> None:
    warn("the engine cannot contract some parameters layer by layer; their part of K comes from per-sample "
         "gradients of the whole model (exact, slower): " + "; ".join(reasons))


REENTRANT = (
    "the model uses reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True), which "
    "torch.autograd.grad cannot differentiate; use use_reentrant=False (transformers: "
    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})), or turn it off "
    "(transformers checkpoints only in training mode: model.eval())"
)


@contextlib.contextmanager
def torch_errors():
    """torch's errors for reentrant activation checkpointing and for allocations that fail, as one NTKError."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if "use_reentrant=True" in text or "incompatible with .grad()" in text:
            raise NTKError(REENTRANT) from e
        if isinstance(e, torch_oom()) or "can't allocate memory" in text:
            raise NTKError(
                f"out of memory ({text.splitlines()[0][:200]}); pass a smaller max_memory, fewer params, shorter "
                f"inputs, or precision='bf16'"
            ) from e
        raise


def torch_oom() -> type[BaseException]:
    import torch

    return torch.OutOfMemoryError
