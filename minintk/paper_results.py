"""The record of a paper run: its results dict, rewritten to results.json after every unit of work (so a run
cut short keeps its results), its notes, its clock and its time budget."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .files import write_json
from .paper_config import PaperConfig


class Run:
    """The results dict of a run, its folder, its clock and budget. save() rewrites results.json."""

    def __init__(self, cfg: PaperConfig, out: Path):
        self.cfg, self.out, self.t0 = cfg, out, time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        self.results: dict = {"config": jsonable(asdict(cfg)), "phases": {}, "notes": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        """Seconds left of the budget (inf without one)."""
        b = self.cfg.budget_min
        return math.inf if b is None else b * 60 - self.elapsed()

    def note(self, text: str) -> None:
        self.results["notes"].append(text)
        print(f"  note: {text}")

    def phase(self, name: str, t_start: float) -> None:
        self.results["phases"][name] = round(time.perf_counter() - t_start, 2)
        self.save()

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 2)
        write_json(self.out / "results.json", jsonable(self.results))


def jsonable(x):
    """x with dicts, lists, numpy numbers and arrays as JSON values; floats to 6 significant digits, NaN and inf
    as None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return None if not math.isfinite(v) else float(f"{v:.6g}")
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    return x
