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


# the reading of results.json shared by the report and its figures


def fmt(x, nd: int = 3) -> str:
    """A number for a table: nd decimals, integers as they are, an em dash for None and non-finite."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, (int, np.integer)):
        return str(x)
    return f"{x:.{nd}f}"


def floats(vals) -> np.ndarray:
    """JSON numbers (None for NaN) as a float array."""
    return np.array([np.nan if v is None else v for v in vals], dtype=float)


def metric(kind: str) -> tuple[str, str]:
    """(key in a run's test metrics, axis label) of a task kind."""
    return ("mse", "test MSE (label units)") if kind == "regression" else ("accuracy", "test accuracy")


def curve_stats(res: dict, task: str, method: str, key: str) -> tuple[list, list, list]:
    """(sizes, mean, sd over seeds) of one task's learning curve for a method and metric key."""
    by_n: dict = {}
    for r in res.get("curves", []):
        if r["task"] == task and r["method"] == method and r["test"] is not None:
            by_n.setdefault(r["n"], []).append(r["test"][key])
    ns = sorted(by_n)
    return ns, [float(np.mean(by_n[n])) for n in ns], [float(np.std(by_n[n])) for n in ns]

