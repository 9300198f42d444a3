"""The NTK Gram over many GPUs and many launches, tile by tile (docs/theory.md section 2, blockwise).

The symmetric Gram K (n, n) is cut into tiles of `tile` samples; only the upper triangle (i <= j) is computed,
diagonal tiles as ntk(model, X[I]) and the others as ntk(model, X[I], X[J]). The tiles are dealt to the ranks
of torch.distributed (or to the one process), written to the result folder as they finish and assembled when all
are done (the folder, its checksums and fingerprints: tilefolder.py); a restart computes only what is missing. A
tile is computed the same way whatever the number of ranks, so the Gram is bit-identical across world sizes (at
the same memory budget: pin it with max_memory).
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .engine import PRECISIONS, default_budget, ntk
from .files import json_digest
from .tilefolder import (
    Inputs,
    Tile,
    TileRunError,
    assemble,
    asymmetric,
    begin_launch,
    end_launch,
    fingerprint_data,
    fingerprint_model,
    manifest,
    num_samples,
    run_key,
    tile_grid,
    write_tile,
)


def assign(tiles: Sequence[Tile], world_size: int) -> list[list[Tile]]:
    """Deal tiles to ranks: cross tiles first, then diagonal ones, round-robin in one cycle.

    Deterministic; the ranks' tile counts differ by at most one and their costs by at most one cross tile.
    """
    order = sorted(tiles, key=lambda t: (-t.cost, t.i, t.j))
    return [order[r::world_size] for r in range(world_size)]


def _rows(X: Inputs, lo: int, hi: int) -> Inputs:
    return X[lo:hi] if isinstance(X, torch.Tensor) else {k: v[lo:hi] for k, v in X.items()}


# ----------------------------------------------------------------------------------------------- ranks


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj) -> list:
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _on_rank0(fn: Callable):
    """fn() on rank 0; its result, or its error, on every rank."""
    rank, world = _rank_world()
    if world == 1:
        return fn()
    box = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:
            box[0] = ("error", f"{type(e).__name__}: {e}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        raise TileRunError(f"rank 0 failed: {box[0][1]}")
    return box[0][1]


def _barrier() -> None:
    if _rank_world()[1] > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _device_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


# ----------------------------------------------------------------------------------------------- the run


def _settings(tile: int, precision: str, params, output, output_name: str | None, kernel: str = "sgd") -> dict:
    if kernel not in ("sgd", "signgd"):
        raise TileRunError(f"kernel {kernel!r}: a tiled run takes 'sgd' or 'signgd' (an Adam kernel's second "
                           "moments are not part of its fingerprint: call ntk(..., kernel=adam(v)) instead)")
    if precision not in PRECISIONS:
        raise TileRunError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if not (params is None or isinstance(params, str) or (isinstance(params, (list, tuple)) and params
                                                           and all(isinstance(p, str) for p in params))):
        raise TileRunError(
            f"params must be None or glob pattern(s) for a resumable run (they enter the settings fingerprint); "
            f"got {params!r}. Turn modules into patterns, e.g. minintk.last_blocks(model, k)"
        )
    if output is not None and not output_name:
        raise TileRunError("output=... needs output_name=, a string naming it (it enters the settings fingerprint)")
    return {
        "precision": precision,
        "params": params if params is None or isinstance(params, str) else list(params),
        "output": output_name if output is not None else "model output",
        "tile": tile,
        **({"kernel": kernel} if kernel != "sgd" else {}),  # eNTK runs keep their earlier fingerprint
    }


def _compute(model: nn.Module, X: Inputs, t: Tile, budget: int, **opts) -> torch.Tensor:
    """One tile on the model's device, returned on the CPU: ntk(model, X[I]) or ntk(model, X[I], X[J])."""
    if t.diagonal:
        return ntk(model, _rows(X, t.a, t.b), max_memory=budget, progress=False, **opts).cpu()
    return ntk(model, _rows(X, t.a, t.b), _rows(X, t.c, t.d), max_memory=budget, progress=False, **opts).cpu()


def tiled_ntk(
    model: nn.Module,
    X: Inputs,
    out: str | os.PathLike,
    *,
    tile: int = 256,
    precision: str = "fp32",
    params=None,
    output: Callable | None = None,
    output_name: str | None = None,
    max_memory: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    kernel: str = "sgd",
) -> torch.Tensor | None:
    """The Gram ntk(model, X) (n, n), or (n, n, C, C), computed tile by tile into the folder `out`, resumably.

    Every rank of torch.distributed (when initialized; else the one process) calls this with the same model
    and X (n, T) ids or a dict of ids and masks; each computes its share of the upper-triangle tiles of `tile`
    samples on its model's device. Restarting skips finished tiles; a folder of another model, data or
    settings (precision, params: None or glob patterns, output_name, tile) is refused unless overwrite=True.
    max_memory: bytes for one tile's working set (default minintk.engine.default_budget: 90% of the free GPU
    memory, the smallest over ranks). Under NCCL, call torch.cuda.set_device(local_rank) first (process_group does).
    Returns K on rank 0 (fp64 for precision="fp64", else fp32), also saved as out/gram.safetensors; None on the
    other ranks. kernel: "sgd" (the eNTK) or "signgd" (asymmetric: every tile, none mirrored). Raises
    TileRunError for bad settings, another run's folder, or ranks that disagree.
    """
    out = Path(out)
    rank, world = _rank_world()
    n = num_samples(X)
    settings = _settings(tile, precision, params, output, output_name, kernel)
    grid = tile_grid(n, tile, full=asymmetric(settings))
    device = next(model.parameters()).device
    fingerprints = {"model": fingerprint_model(model), "data": fingerprint_data(X), "settings": json_digest(settings)}
    views = _all_gather({"fingerprints": fingerprints, "budget": max_memory or default_budget(device)})
    differ = [r for r, v in enumerate(views) if v["fingerprints"] != views[0]["fingerprints"]]
    if differ:
        raise TileRunError(f"ranks {differ} hold another model, data or settings than rank 0; every rank must "
                           f"build the same model (same seed) and data")
    budget = min(v["budget"] for v in views)
    record = manifest(model, X, settings, tile, fingerprints)
    info = {"world_size": world, "device": _device_name(device), "host": socket.gethostname(), "budget_bytes": budget}
    launch = _on_rank0(lambda: begin_launch(out, record, overwrite, info))
    if precision == "fp64" and next(model.parameters()).dtype != torch.float64:
        model = copy.deepcopy(model).to(torch.float64)  # once here, not once per tile inside ntk
    done = set(launch.done)
    mine = assign([t for t in grid if t.name not in done], world)[rank]
    if rank == 0 and progress:
        print(f"minintk ntk: {len(grid)} tiles of {tile} samples (n={n}); {len(done)} done, "
              f"{len(grid) - len(done)} to compute on {world} rank(s); budget {budget / 2**30:.1f} GiB per tile",
              file=sys.stderr)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), desc=f"tiles of rank 0 (of {world})", disable=not progress or rank != 0,
               file=sys.stderr)
    key = run_key(fingerprints)
    for t in mine:
        start = time.perf_counter()
        K = _compute(model, X, t, budget, precision=precision, params=params, output=output, kernel=kernel)
        write_tile(out, t, K, run=key, launch=launch, rank=rank, world_size=world,
                   seconds=time.perf_counter() - start)
        bar.update(1)
    bar.close()
    _barrier()
    if rank != 0:
        return None
    K = assemble(out)
    end_launch(out)
    return K


# ----------------------------------------------------------------------------------------------- launching


@contextlib.contextmanager
def process_group(device: str | None = None):
    """The device this process computes on (default cuda if available), inside the torch.distributed group that
    torchrun asks for (WORLD_SIZE set: NCCL with one GPU per rank, gloo on CPU), left at exit."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TileRunError(f"--device {device} but torch sees no CUDA GPU here; pass --device cpu")
    started = False
    if "WORLD_SIZE" in os.environ and dist.is_available() and not dist.is_initialized():
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        # Ranks wait for each other at the end for up to one tile; tiles of large models take minutes.
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(hours=3))
        started = True
    try:
        yield dev
    finally:
        if started:
            dist.destroy_process_group()


def is_rank0() -> bool:
    """Whether this process is rank 0 of torch.distributed, or the one process."""
    return _rank_world()[0] == 0
