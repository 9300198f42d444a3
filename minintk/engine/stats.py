"""Stats: where one ntk() call spent its time and memory, filled in when a Stats is passed (ntk(stats=...))."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class Stats:
    """seconds per phase ("setup", "boundary", "capture", "contract", "fallback"; or the whole Gram as "graph
    record" or "graph replay" when a CUDA graph is recorded or replayed: engine/graphs.py); the allocator's peak
    since the caller's last reset and the phase that reached it (CUDA); the contraction form chosen per layer and tile
    ("vector", "embedding", "tied-cross", "ghost", "materialized"); with time_forms=True, the seconds per form
    (synchronizing after each layer: slower); and the plan used."""

    time_forms: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    peak_bytes: int = 0
    peak_phase: str = ""
    forms: dict[str, int] = field(default_factory=dict)
    form_seconds: dict[str, float] = field(default_factory=dict)
    plan: object = None

    def tick(self, phase: str, t0: float, device: torch.device) -> float:
        """Add the seconds since t0 to `phase` (the GPU synchronized, so that they are real); note a new peak."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            if peak > self.peak_bytes:
                self.peak_bytes, self.peak_phase = peak, phase
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - t0
        return now

    def count(self, form: str) -> None:
        self.forms[form] = self.forms.get(form, 0) + 1

    def time_form(self, form: str, t0: float, device: torch.device) -> None:
        if self.time_forms:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.form_seconds[form] = self.form_seconds.get(form, 0.0) + time.perf_counter() - t0
