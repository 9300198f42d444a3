"""Tiled, resumable, multi-rank Grams (minintk.distributed) against the single-process and the one-call Gram.

The reference is a world-size-1 run of tiled_ntk in this process (one thread, as the subprocesses have). A tile
is computed by the same call whatever the world size, so ranks and restarts must reproduce it bit for bit at
fp64. One `ntk(model, X)` call plans its blocks and layer groups for the whole n, so it is compared with a
tolerance: equal by the mathematics, not by construction.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TILE, TILE_DATA, TILES, sidecars
from safetensors.torch import load_file

from minintk.distributed import assign, tiled_ntk
from minintk.engine import ntk
from minintk.sources import load_model, load_tokens
from minintk.tilefolder import tile_grid
from minintk.tileprogress import status

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["ntk", "tiny", TILE_DATA, "--labels", "3,7", "--diff", "--tile", str(TILE), "--precision", "fp64",
        "--device", "cpu"]
# A CLI whose tiles each take 0.3 s longer, so that the test can kill it between tiles (patched in the child only).
SLOW_CLI = (
    "import sys, time; import minintk.distributed as distributed; f = distributed.ntk; "
    "distributed.ntk = lambda *a, **k: (time.sleep(0.3), f(*a, **k))[1]; "
    "from minintk.cli import main; sys.exit(main(sys.argv[1:]))"
)
# Two ranks that build the tiny decoder from different seeds: each must refuse to compute.
DISAGREEING_RANKS = """
import sys, torch, torch.distributed as dist
from minintk.distributed import process_group, tiled_ntk
from minintk.sources import load_model, load_tokens
from minintk.tilefolder import TileRunError

with process_group("cpu"):
    model = load_model("tiny", (3, 7), diff=True, seed=dist.get_rank(), device="cpu", dtype=torch.float64)
    try:
        tiled_ntk(model, load_tokens(sys.argv[2], 512), sys.argv[1], tile=4, precision="fp64", progress=False)
    except TileRunError as e:
        print(f"rank {dist.get_rank()}: {e}\\n", end="", flush=True)  # one write: the ranks share stdout
        dist.barrier()  # both ranks have said it before either exits (torchrun then stops the other)
        sys.exit(3)
"""

pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict:
    # conftest's offline flags are in os.environ; one thread, as torchrun gives each rank.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def _gram(out: Path) -> torch.Tensor:
    return load_file(out / "gram.safetensors")["K"]


def test_tiled_gram_equals_one_ntk_call(tiled_reference):
    model, X, K, out = tiled_reference
    assert K.shape == (24, 24) and K.dtype == torch.float64
    assert torch.equal(K, K.T), "assembled Gram is not symmetric"
    ref = ntk(model, X, precision="fp64", progress=False)
    err = ((K - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-12, f"tiled Gram differs from ntk(model, X) by {err:.2e} (relative to its largest entry)"
    assert torch.equal(_gram(out), K)


def test_two_ranks_under_torchrun_bit_identical_to_one(tmp_path, tiled_reference):
    out = tmp_path / "w2"
    r = subprocess.run(_torchrun("-m", "minintk.cli", *ARGS, "--out", str(out)), env=_env(), capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    K2 = _gram(out)
    diff = (K2 - tiled_reference[2]).abs().max().item()
    assert torch.equal(K2, tiled_reference[2]), f"world size 2 differs from world size 1 by {diff:.3e} at fp64"
    sides = sidecars(out)
    per_rank = [sum(s["rank"] == r for s in sides.values()) for r in (0, 1)]
    assert len(sides) == TILES and sorted(per_rank) == [10, 11], f"tiles per rank {per_rank}"
    assert "21 / 21 done" in r.stdout


def test_ranks_with_different_models_are_refused(tmp_path):
    script = tmp_path / "disagree.py"
    script.write_text(DISAGREEING_RANKS)
    out = tmp_path / "x"
    r = subprocess.run(_torchrun(str(script), str(out), TILE_DATA), env=_env(), capture_output=True, text=True,
                       timeout=180)
    assert r.returncode != 0, "ranks holding different models computed a Gram"
    said = sorted(line[:7] for line in r.stdout.splitlines() if "ranks [1] hold another model" in line)
    assert said == ["rank 0:", "rank 1:"], r.stdout[-2000:] + r.stderr[-3000:]
    assert not (out / "manifest.json").exists(), "a refused run wrote a manifest"


def test_killed_run_resumes_without_recomputing_finished_tiles(tmp_path, tiled_reference):
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *ARGS, "--out", str(out)], env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(sidecars(out)) < 3:
        assert p.poll() is None, f"the run ended (code {p.returncode}) before the test could kill it"
        assert time.monotonic() < deadline, "no tile finished in 120 s"
        time.sleep(0.02)
    p.kill()
    p.wait()
    before = sidecars(out)
    assert 3 <= len(before) < TILES and not (out / "gram.safetensors").exists(), f"{len(before)} tiles at the kill"

    r = subprocess.run([sys.executable, "-m", "minintk.cli", *ARGS, "--out", str(out)], env=_env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    after = sidecars(out)
    changed = [k for k, v in before.items() if after[k] != v]
    assert not changed, f"finished tiles were recomputed: {changed}"
    st = status(out)
    assert [e["tiles_computed"] for e in st["launches"]] == [len(before), TILES - len(before)]
    assert st["recomputed"] == 0 and st["tiles_left"] == 0
    assert torch.equal(_gram(out), tiled_reference[2]), "the resumed Gram differs from the uninterrupted one"


def test_multi_output_masked_uneven_tiles_match_ntk(tmp_path):
    model = load_model("tiny", (3, 7, 11), device="cpu", dtype=torch.float64)
    ids = torch.randint(0, 512, (7, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    torch.save({"input_ids": ids.int(), "attention_mask": mask}, tmp_path / "tokens.pt")
    X = load_tokens(str(tmp_path / "tokens.pt"), 512)
    K = tiled_ntk(model, X, tmp_path / "out", tile=3, precision="fp64", progress=False)  # blocks 3, 3, 1
    ref = ntk(model, X, precision="fp64", progress=False)
    assert K.shape == ref.shape == (7, 7, 3, 3)
    err = ((K - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-12, f"multi-output tiled Gram differs from ntk by {err:.2e}"


def test_signgd_tiles_are_all_computed_none_mirrored(tmp_path):
    """The asymmetric SignGD kernel: every tile (3 x 3 for blocks 3, 3, 1), assembled without mirroring, equals
    one ntk call; the folder says its kernel, and an Adam kernel (moments outside the fingerprint) is refused."""
    from minintk.tilefolder import TileRunError

    model = load_model("tiny", (3, 7, 11), device="cpu", dtype=torch.float64)
    X = torch.randint(0, 512, (7, 6), generator=torch.Generator().manual_seed(2))
    K = tiled_ntk(model, X, tmp_path / "out", tile=3, precision="fp64", kernel="signgd", progress=False)
    ref = ntk(model, X, precision="fp64", kernel="signgd", progress=False)
    assert K.shape == ref.shape == (7, 7, 3, 3) and not torch.allclose(ref, ref.transpose(0, 1).transpose(2, 3))
    err = ((K - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-12, f"tiled SignGD kernel differs from ntk by {err:.2e}"
    st = status(tmp_path / "out")
    assert st["tiles_total"] == st["tiles_done"] == 9 and st["settings"]["kernel"] == "signgd"
    with pytest.raises(TileRunError, match="kernel 'adam': a tiled run takes 'sgd' or 'signgd'"):
        tiled_ntk(model, X, tmp_path / "adam", tile=3, kernel="adam", progress=False)


@pytest.mark.parametrize("n_blocks", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_assignment_is_a_balanced_deterministic_partition(n_blocks, world):
    grid = tile_grid(n_blocks * 3 - 1, 3)
    for tiles in (grid, grid[::2]):  # a fresh run, and what is left on a resume
        shares = assign(tiles, world)
        names = sorted(t.name for s in shares for t in s)
        assert names == sorted(t.name for t in tiles), "tiles lost or dealt twice"
        counts, costs = [len(s) for s in shares], [sum(t.cost for t in s) for s in shares]
        assert max(counts) - min(counts) <= 1 and max(costs) - min(costs) <= 2, f"counts {counts}, costs {costs}"
        assert [[t.name for t in s] for s in assign(list(reversed(tiles)), world)] == [[t.name for t in s]
                                                                                         for s in shares]
