"""What each precision means for the engine: dtypes of the model, of the captured factors and of the result;
matmul flags; autocast; and the tolerance of the probe's checks. docs/theory.md section 2.6."""

from __future__ import annotations

import contextlib
from types import MappingProxyType

import torch

PRECISIONS = ("fp64", "fp32", "tf32", "bf16")

# Relative tolerance of the probe's checks (layer factors against autograd's gradients, segmented against full
# passes): they catch structural misuse, whose error is O(1); rounding is ~1e-7 in fp32, ~1e-3 with TF32's
# 10-bit operands (which also enter the backward pass), ~1e-2 in bf16.
TOLERANCE = MappingProxyType({"fp64": 1e-9, "fp32": 1e-4, "tf32": 1e-2, "bf16": 5e-2})


def model_dtype(precision: str) -> torch.dtype:
    """The dtype the model's parameters are converted to (bf16 models stay bf16 in "bf16", see in_precision)."""
    return torch.float64 if precision == "fp64" else torch.float32


def capture_dtype(precision: str) -> torch.dtype:
    """The dtype of the captured factors (inputs and output-gradients of the layers)."""
    return {"fp64": torch.float64, "bf16": torch.bfloat16}.get(precision, torch.float32)


def vector_dtype(precision: str) -> torch.dtype:
    """The dtype of bias and LayerNorm per-sample gradients."""
    return torch.float64 if precision == "fp64" else torch.float32


def result_dtype(precision: str) -> torch.dtype:
    return torch.float64 if precision == "fp64" else torch.float32


@contextlib.contextmanager
def matmul_flags(precision: str):
    """fp32 matmuls as `precision` asks (TF32 only for "tf32"), whatever the caller's global flags."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old[0], old[1]
        torch.set_float32_matmul_precision(old[2])


@contextlib.contextmanager
def forward_mode(precision: str, device: torch.device, cache: bool = True):
    """The forward pass's mode on top of matmul_flags (which ntk and plan hold throughout): bf16 autocast (its
    cache of cast weights off for a CUDA graph's capture)."""
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache):
            yield
    else:
        yield
