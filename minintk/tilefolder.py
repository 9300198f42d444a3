"""The result folder of a tiled NTK Gram: its tiles, their checksums, the run's fingerprints (its progress:
tileprogress.py).

The Gram K (n, n) is cut into tiles of `tile` samples; of a symmetric one only the upper triangle (i <= j) is
stored, of an asymmetric one (settings "kernel": "signgd") every tile. A tile
counts as done once its file and its JSON sidecar (holding the file's sha256) are both in place; the manifest holds
the fingerprints of the model, the data and the settings, so that a restart skips the finished, intact tiles and
refuses a folder of another model, data or setting. Which rank computes which tile is distributed.py's business.

    out/manifest.json                     fingerprints, descriptions, one entry per launch (written by rank 0)
    out/tiles/tile_IIII_JJJJ.safetensors  K[I, J] under key "K": (m, m2) or (m, m2, C, C)
    out/tiles/tile_IIII_JJJJ.json         sha256 of that file, seconds, rank, launch (written by its rank)
    out/gram.safetensors                  the assembled K under key "K", when every tile is done
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .files import json_digest, write_atomic, write_json

FORMAT = "minintk-tiles/1"
Inputs = torch.Tensor | Mapping[str, torch.Tensor]


class TileRunError(ValueError):
    """A tiled run that cannot start or resume: another run's folder, damaged tiles, bad data; says what to do."""


# ----------------------------------------------------------------------------------------------- tiles


@dataclass(frozen=True)
class Tile:
    """Block (i, j) of the Gram (i <= j for a symmetric one): rows a:b and columns c:d, in samples."""

    i: int
    j: int
    a: int
    b: int
    c: int
    d: int

    @property
    def name(self) -> str:
        return f"tile_{self.i:04d}_{self.j:04d}"

    @property
    def diagonal(self) -> bool:
        return self.i == self.j

    @property
    def cost(self) -> int:
        """Relative cost: a diagonal tile captures one block of samples, a cross tile two."""
        return 1 if self.diagonal else 2


def tile_grid(n: int, tile: int, full: bool = False) -> list[Tile]:
    """The upper-triangle tiles (i <= j; every tile if full, for an asymmetric kernel) of an (n, n) Gram cut into
    blocks of `tile` samples, row-major."""
    if not (isinstance(tile, int) and tile >= 1):
        raise TileRunError(f"tile must be a positive number of samples, got {tile!r}")
    edges = [(a, min(n, a + tile)) for a in range(0, n, tile)]
    return [Tile(i, j, *edges[i], *edges[j]) for i in range(len(edges))
            for j in range(0 if full else i, len(edges))]


def asymmetric(settings: Mapping) -> bool:
    """Whether a run's kernel is asymmetric (every tile computed, none mirrored): the SignGD kernel."""
    return settings.get("kernel", "sgd") == "signgd"


def grid_of(m: Mapping) -> list[Tile]:
    """The tiles of the run a manifest (or its record before the first launch) describes."""
    return tile_grid(m["n"], m["tile"], full=asymmetric(m["settings"]))


# ----------------------------------------------------------------------------------------------- fingerprints

# Odd 64-bit constants (the golden ratio's and Knuth's LCG increment), for position-dependent multipliers.
_K1, _K2 = -7046029254386353131, 1442695040888963407
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_digest(t: torch.Tensor, chunk: int = 1 << 24) -> int:
    """sum_k bits_k * m_k mod 2^64 over the raw bits of t, m_k = (k K1 + K2) | 1, on t's device.

    Any change of one element changes the digest (an odd m_k is invertible mod 2^64); a GPU sums a billion
    elements in well under a second. It guards against mistakes, not adversaries (it is not cryptographic).
    """
    flat = t.detach().contiguous().reshape(-1)
    bits = flat.view(_INT_OF_SIZE.get(flat.element_size(), torch.uint8))
    acc = torch.zeros((), dtype=torch.int64, device=t.device)
    for s in range(0, bits.numel(), chunk):
        w = bits[s : s + chunk].to(torch.int64)
        m = torch.arange(s, s + w.numel(), dtype=torch.int64, device=t.device) * _K1 + _K2
        acc += (w * (m | 1)).sum()
    return int(acc) & (2**64 - 1)


def _describe_model(model: nn.Module) -> dict:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg) if cfg is not None else {}
    params = list(model.parameters())
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": json.loads(json.dumps(cfg, sort_keys=True, default=str)),
        "dtype": str(params[0].dtype) if params else None,
        "parameters": sum(p.numel() for p in params),
    }


def fingerprint_model(model: nn.Module) -> str:
    """sha256 (hex) of the model's class and config and of every parameter and buffer: name, shape, dtype,
    requires_grad and bits (tensor_digest, computed where the model lives). Changes if any weight changes."""
    tensors = [
        [name, str(t.dtype), list(t.shape), bool(t.requires_grad), f"{tensor_digest(t):016x}"]
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    ]
    return json_digest({"model": _describe_model(model), "tensors": tensors})


def _items(X: Inputs) -> list[tuple[str, torch.Tensor]]:
    if isinstance(X, torch.Tensor):
        return [("", X)]
    if isinstance(X, Mapping) and X and all(isinstance(v, torch.Tensor) for v in X.values()):
        return sorted(X.items())
    raise TileRunError(f"X must be a tensor (n, T) or a dict of tensors (ids and masks), got {type(X).__name__}")


def fingerprint_data(X: Inputs) -> str:
    """sha256 (hex) of the inputs: key names, shapes and values (integers as int64, so int32 ids hash alike)."""
    h = hashlib.sha256()
    for key, t in _items(X):
        t = t.detach().cpu()
        if not (t.is_floating_point() or t.is_complex()):
            t = t.to(torch.int64)
        h.update(json.dumps([key, list(t.shape), str(t.dtype)]).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def num_samples(X: Inputs) -> int:
    """n, the leading dimension shared by the tensor X or by every tensor of the dict X; TileRunError if none."""
    sizes = {t.shape[0] if t.dim() else 0 for _, t in _items(X)}
    if len(sizes) != 1 or 0 in sizes:
        raise TileRunError(f"X needs one leading sample dimension shared by its tensors, got sizes {sorted(sizes)}")
    return sizes.pop()


def manifest(model: nn.Module, X: Inputs, settings: dict, tile: int, fingerprints: dict) -> dict:
    """The manifest of a run before its first launch: format, the fingerprints {"model", "data", "settings"} and
    what they describe, n, the tile size and the number of tiles."""
    n = num_samples(X)
    return {"format": FORMAT, "fingerprints": fingerprints, "model": _describe_model(model),
            "data": {"shapes": {k or "ids": list(t.shape) for k, t in _items(X)}}, "settings": settings, "n": n,
            "tile": tile, "tiles_total": len(tile_grid(n, tile, full=asymmetric(settings))), "launches": []}


def run_key(fingerprints: dict) -> str:
    """The run's key (sha256 hex of its fingerprints), written into every sidecar and tile of the run."""
    return json_digest(fingerprints)


# ----------------------------------------------------------------------------------------------- the folder


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(out: Path) -> dict:
    """out/manifest.json; TileRunError if the folder holds none, a damaged one or one of another format."""
    path = out / "manifest.json"
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise TileRunError(f"{out} holds no manifest.json: not a minintk tile folder (or not started yet)") from None
    except json.JSONDecodeError as e:
        raise TileRunError(f"{path} is damaged ({e}); start a new folder or pass --overwrite") from None
    if m.get("format") != FORMAT:
        raise TileRunError(f"{path} has format {m.get('format')!r}, this minintk reads {FORMAT!r}")
    return m


def _read_tile(out: Path, tile: Tile, key: str) -> tuple[str | None, dict | None, bytes | None]:
    """(why the tile is not usable or None, its sidecar, its file's bytes). Why is "missing" if never finished."""
    side = out / "tiles" / f"{tile.name}.json"
    if not side.exists():
        return "missing", None, None
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return "sidecar unreadable", None, None
    if meta.get("run") != key:
        return "sidecar of another run", meta, None
    try:
        data = (out / "tiles" / f"{tile.name}.safetensors").read_bytes()
    except FileNotFoundError:
        return "tile file missing", meta, None
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        return "checksum mismatch", meta, None
    return None, meta, data


def _scan(out: Path, grid: list[Tile], key: str) -> tuple[list[str], dict[str, str]]:
    """(names of finished intact tiles, {name: why} of finished tiles that are damaged or stale)."""
    done, stale = [], {}
    for t in grid:
        why, _, _ = _read_tile(out, t, key)
        if why is None:
            done.append(t.name)
        elif why != "missing":
            stale[t.name] = why
    return done, stale


def _mismatch(old: dict, new: dict, out: Path) -> str | None:
    """Why a folder's run differs from this one, naming each fingerprint that changed; None if the same."""
    reasons = []
    if old["fingerprints"]["model"] != new["fingerprints"]["model"]:
        a, b = old["model"], new["model"]
        fields = sorted(k for k in set(a["config"]) | set(b["config"]) if a["config"].get(k) != b["config"].get(k))
        if a["class"] != b["class"]:
            what = f"class {a['class']} -> {b['class']}"
        elif fields:
            what = "config " + ", ".join(f"{k} {a['config'].get(k)!r} -> {b['config'].get(k)!r}" for k in fields)
        elif a["dtype"] != b["dtype"]:
            what = f"dtype {a['dtype']} -> {b['dtype']}"
        else:
            what = "same architecture, different weights (random weights also change with --seed or the device)"
        reasons.append(f"the model changed ({what})")
    if old["fingerprints"]["data"] != new["fingerprints"]["data"]:
        a, b = old["data"]["shapes"], new["data"]["shapes"]
        reasons.append(f"the data changed ({f'shapes {a} -> {b}' if a != b else 'same shapes, other token ids/masks'})")
    if old["fingerprints"]["settings"] != new["fingerprints"]["settings"]:
        a, b = ({"kernel": "sgd", **s} for s in (old["settings"], new["settings"]))  # eNTK runs omit the key
        diff = ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        reasons.append(f"the settings changed ({diff})")
    if not reasons:
        return None
    return (
        f"{out} holds tiles of another run: {'; '.join(reasons)}. Resume with the original model, data and settings, "
        f"write to a new folder, or pass --overwrite (overwrite=True) to delete the old tiles"
    )


def _clear(out: Path) -> None:
    """Delete what a run writes (manifest, tiles/, gram) and nothing else."""
    shutil.rmtree(out / "tiles", ignore_errors=True)
    for name in ("manifest.json", "gram.safetensors"):
        (out / name).unlink(missing_ok=True)


class Launch(NamedTuple):
    """One launch of a run: its number (1, 2, ...), the names of the tiles already done, {name: why} of the
    finished tiles that were found damaged or stale (to compute again)."""

    number: int
    done: list[str]
    stale: dict[str, str]


def begin_launch(out: Path, record: dict, overwrite: bool, launch_info: dict) -> Launch:
    """Rank 0: check or create the manifest (record: `manifest`'s), clean temporary files, find the finished
    tiles, log the launch with launch_info. TileRunError if the folder holds another run (unless overwrite)."""
    if overwrite:
        _clear(out)
    if (out / "manifest.json").exists():
        old = read_manifest(out)
        why = _mismatch(old, record, out)
        if why:
            raise TileRunError(why)
        record["launches"] = old.get("launches", [])
    (out / "tiles").mkdir(parents=True, exist_ok=True)
    for p in (out / "tiles").glob("*.tmp-*"):  # left by a process killed mid-write
        p.unlink(missing_ok=True)
    grid = grid_of(record)
    done, stale = _scan(out, grid, run_key(record["fingerprints"]))
    launch = len(record["launches"]) + 1
    record["launches"].append(
        {"launch": launch, "started": _now(), **launch_info, "tiles_done_at_start": len(done),
         "tiles_to_compute": len(grid) - len(done), "stale_tiles": stale}
    )
    write_json(out / "manifest.json", record)
    return Launch(launch, done, stale)


def write_tile(out: Path, tile: Tile, K: torch.Tensor, *, run: str, launch: Launch, rank: int, world_size: int,
               seconds: float) -> None:
    """The tile file K (m, m2) or (m, m2, C, C), then its sidecar with the file's sha256: a tile counts as done
    once both are in place. run: run_key of the run; seconds: the time its computation took."""
    from safetensors.torch import save

    sidecar = {
        "tile": [tile.i, tile.j], "rows": [tile.a, tile.b], "cols": [tile.c, tile.d],
        "kind": "diagonal" if tile.diagonal else "cross", "shape": list(K.shape), "dtype": str(K.dtype), "run": run,
        "launch": launch.number, "rank": rank, "world_size": world_size, "seconds": seconds, "finished": _now(),
        "recomputed": launch.stale.get(tile.name),  # why the finished tile it replaces was unusable
    }
    data = save({"K": K.contiguous()}, metadata={"run": run})
    write_atomic(out / "tiles" / f"{tile.name}.safetensors", data)
    write_json(out / "tiles" / f"{tile.name}.json", {**sidecar, "sha256": hashlib.sha256(data).hexdigest()})


def end_launch(out: Path) -> None:
    """Rank 0, after the Gram is assembled: the time the last launch finished, in the manifest."""
    m = read_manifest(out)
    m["launches"][-1]["finished"] = _now()
    write_json(out / "manifest.json", m)


def assemble(out: str | os.PathLike) -> torch.Tensor:
    """The Gram (n, n) or (n, n, C, C) of a finished folder, every tile's checksum verified; writes gram.safetensors."""
    from safetensors.torch import load, save

    out = Path(out)
    m = read_manifest(out)
    key, n = run_key(m["fingerprints"]), m["n"]
    K, bad = None, {}
    mirror = not asymmetric(m["settings"])
    for t in grid_of(m):
        why, _, data = _read_tile(out, t, key)
        if why:
            bad[t.name] = why
            continue
        block = load(data)["K"]
        if K is None:
            K = torch.empty((n, n, *block.shape[2:]), dtype=block.dtype)
        K[t.a : t.b, t.c : t.d] = block
        if mirror and not t.diagonal:  # K[j, i] = K[i, j]^T, outputs swapped too for a multi-output Gram
            K[t.c : t.d, t.a : t.b] = block.transpose(0, 1).transpose(2, 3) if block.dim() == 4 else block.T
    if bad:
        shown = ", ".join(f"{k} ({v})" for k, v in list(bad.items())[:6])
        raise TileRunError(
            f"{out}: {len(bad)} tile(s) not finished or damaged: {shown}{' ...' if len(bad) > 6 else ''}. Run the "
            f"same command again to compute them (all ranks must write to one shared folder)"
        )
    write_atomic(out / "gram.safetensors", save({"K": K}, metadata={"fingerprints": json.dumps(m["fingerprints"])}))
    return K
