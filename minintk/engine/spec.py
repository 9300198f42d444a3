"""Spec: what one call differentiates (f = output(model(x)) w.r.t. the selected parameters), at which precision,
on which device. Frozen: every step of the engine reads it, none changes it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .precision import TOLERANCE, capture_dtype, vector_dtype

# How the C outputs of a sample enter K: every pair (c, c') -> (n, n2, C, C); the trace over outputs (the
# mean, as neural-tangents and the loss (1/2n) sum ||f - y||^2 have it) -> (n, n2); the diagonal -> (n, n2, C).
OUTPUTS = ("full", "trace", "diagonal")


@dataclass(frozen=True)
class Spec:
    model: nn.Module
    output: Callable | None
    selected: tuple[tuple[str, nn.Parameter], ...]
    precision: str
    device: torch.device
    outputs: str = "full"  # "full" (every pair of outputs), "trace" or "diagonal" (same output only): OUTPUTS
    # captured into a CUDA graph (graphs.py): no host syncs and no shapes that depend on the data, so time steps
    # without gradient are kept (exact: they add zeros) and f's finiteness is checked on K after each replay
    graph: bool = False
    # a kernel other than the eNTK (variants.py: SignGD, Adam-preconditioned) and its weights by parameter
    variant: object = None
    weights: object = None


    @property
    def cap_dtype(self) -> torch.dtype:
        return capture_dtype(self.precision)

    @property
    def vec_dtype(self) -> torch.dtype:
        return vector_dtype(self.precision)

    @property
    def tol(self) -> float:
        return TOLERANCE[self.precision]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for _, p in self.selected)
