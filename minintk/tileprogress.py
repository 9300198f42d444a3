"""Progress of a tiled NTK run's folder (tilefolder.py): tiles done and left, per launch what it computed and
recomputed, and the estimated seconds left from the steady-state tile times. Read-only: checksums are verified
on resume and assembly, not here."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .tilefolder import Tile, grid_of, read_manifest, run_key


def status(out: str | os.PathLike) -> dict:
    """Progress of a folder from its manifest and sidecars (checksums are verified on resume and assembly):
    tiles done/total, per launch the tiles computed and recomputed, and the estimated seconds left."""
    out = Path(out)
    m = read_manifest(out)
    key = run_key(m["fingerprints"])
    grid = grid_of(m)
    sides = {}
    for t in grid:
        try:
            meta = json.loads((out / "tiles" / f"{t.name}.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("run") == key:
            sides[t.name] = meta
    left = [t for t in grid if t.name not in sides]
    launches = []
    for entry in m.get("launches", []):
        mine = [s for s in sides.values() if s.get("launch") == entry["launch"]]
        launches.append({**entry, "tiles_computed": len(mine), "recomputed": sum(bool(s["recomputed"]) for s in mine),
                         "tile_seconds": sum(s["seconds"] for s in mine)})
    world = launches[-1]["world_size"] if launches else 1
    return {
        "out": str(out), "n": m["n"], "tile": m["tile"], "settings": m["settings"], "model": m["model"],
        "data": m["data"], "tiles_total": len(grid), "tiles_done": len(sides), "tiles_left": len(left),
        "recomputed": sum(bool(s["recomputed"]) for s in sides.values()), "launches": launches,
        "eta_s": _eta(list(sides.values()), left, world),
        "gram": str(out / "gram.safetensors") if (out / "gram.safetensors").exists() and not left else None,
    }


def _steady(sides: list[dict]) -> list[dict]:
    """The tiles timed in steady state: without each (launch, rank)'s first tile, which also paid the model's
    discovery and the kernels' warm-up (all of them where a launch and rank has finished one tile only)."""
    first: dict[tuple, dict] = {}
    for s in sides:
        key = (s.get("launch"), s.get("rank"))
        if key not in first or s.get("finished", "") < first[key].get("finished", ""):
            first[key] = s
    rest = [s for s in sides if all(s is not f for f in first.values())]
    return rest or sides


def _eta(sides: list[dict], left: list[Tile], world: int) -> float | None:
    """Seconds for the tiles left on `world` ranks: the steady-state mean time of each kind so far (the other
    kind by cost)."""
    if not left:
        return 0.0
    if not sides:
        return None
    sides = _steady(sides)
    cost = {"diagonal": 1, "cross": 2}
    per_unit = sum(s["seconds"] for s in sides) / sum(cost[s["kind"]] for s in sides)
    mean = {}
    for kind in cost:
        secs = [s["seconds"] for s in sides if s["kind"] == kind]
        mean[kind] = sum(secs) / len(secs) if secs else per_unit * cost[kind]
    return sum(mean["diagonal" if t.diagonal else "cross"] for t in left) / world
