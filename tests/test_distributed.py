"""Tiled, resumable, multi-rank Grams (minintk.distributed) against the single-process and the one-call Gram.

The reference is a world-size-1 run of tiled_ntk in this process (one thread, as the subprocesses have). A tile
is computed by the same call whatever the world size, so ranks and restarts must reproduce it bit for bit at
fp64. One `ntk(model, X)` call plans its blocks and layer groups for the whole n, so it is compared with a
tolerance: equal by the mathematics, not by construction.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minintk.cli import main
from minintk.distributed import (
    TileRunError,
    assemble,
    assign,
    status,
    tensor_digest,
    tile_grid,
    tiled_ntk,
)
from minintk.engine import ntk
from minintk.sources import SourceError, load_model, load_tokens, parse_bytes

ROOT = Path(__file__).resolve().parents[1]
DATA, TILE, TILES = "random:24:8:512:0", 4, 21  # 6 blocks of 4 samples: 21 upper-triangle tiles
ARGS = ["ntk", "tiny", DATA, "--labels", "3,7", "--diff", "--tile", str(TILE), "--precision", "fp64", "--device", "cpu"]
# A CLI whose tiles each take 0.3 s longer, so that the test can kill it between tiles (patched in the child only).
SLOW_CLI = (
    "import sys, time; import minintk.distributed as D; f = D.ntk; "
    "D.ntk = lambda *a, **k: (time.sleep(0.3), f(*a, **k))[1]; "
    "from minintk.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _env() -> dict:
    # conftest's offline flags are in os.environ; one thread, as torchrun gives each rank.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _sidecars(out: Path) -> dict[str, dict]:
    found = {}
    for p in (out / "tiles").glob("*.json"):
        try:
            found[p.stem] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):  # a sidecar being written right now
            pass
    return found


pytestmark = pytest.mark.usefixtures("one_thread")


def _gram(out: Path) -> torch.Tensor:
    return load_file(out / "gram.safetensors")["K"]




@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(model, X, K, folder) of an uninterrupted world-size-1 run, built as the CLI builds them."""
    model = load_model("tiny", (3, 7), diff=True, seed=0, device="cpu", dtype=torch.float64)
    X = load_tokens(DATA, model.cfg.vocab_size)
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        K = tiled_ntk(model, X, out, tile=TILE, precision="fp64", progress=False)
    finally:
        torch.set_num_threads(threads)
    return model, X, K, out


def test_tiled_gram_equals_one_ntk_call(reference):
    model, X, K, out = reference
    assert K.shape == (24, 24) and K.dtype == torch.float64
    assert torch.equal(K, K.T), "assembled Gram is not symmetric"
    ref = ntk(model, X, precision="fp64", progress=False)
    err = ((K - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-12, f"tiled Gram differs from ntk(model, X) by {err:.2e} (relative to its largest entry)"
    assert torch.equal(_gram(out), K)


def test_two_ranks_under_torchrun_bit_identical_to_one(tmp_path, reference):
    out = tmp_path / "w2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minintk.cli",
           *ARGS, "--out", str(out)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    K2 = _gram(out)
    diff = (K2 - reference[2]).abs().max().item()
    assert torch.equal(K2, reference[2]), f"world size 2 differs from world size 1 by {diff:.3e} at fp64"
    sides = _sidecars(out)
    per_rank = [sum(s["rank"] == r for s in sides.values()) for r in (0, 1)]
    assert len(sides) == TILES and sorted(per_rank) == [10, 11], f"tiles per rank {per_rank}"
    assert "21 / 21 done" in r.stdout


def test_killed_run_resumes_without_recomputing_finished_tiles(tmp_path, reference):
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *ARGS, "--out", str(out)], env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(_sidecars(out)) < 3:
        assert p.poll() is None, f"the run ended (code {p.returncode}) before the test could kill it"
        assert time.monotonic() < deadline, "no tile finished in 120 s"
        time.sleep(0.02)
    p.kill()
    p.wait()
    before = _sidecars(out)
    assert 3 <= len(before) < TILES and not (out / "gram.safetensors").exists(), f"{len(before)} tiles at the kill"

    r = subprocess.run([sys.executable, "-m", "minintk.cli", *ARGS, "--out", str(out)], env=_env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    after = _sidecars(out)
    changed = [k for k, v in before.items() if after[k] != v]
    assert not changed, f"finished tiles were recomputed: {changed}"
    st = status(out)
    assert [e["tiles_computed"] for e in st["launches"]] == [len(before), TILES - len(before)]
    assert st["recomputed"] == 0 and st["tiles_left"] == 0
    assert torch.equal(_gram(out), reference[2]), "the resumed Gram differs from the uninterrupted one"


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete the tile", "garble the sidecar"])
def test_damaged_tile_is_detected_and_recomputed(tmp_path, reference, damage):
    model, X, K, ref_out = reference
    out = tmp_path / "damaged"
    shutil.copytree(ref_out, out)
    tile, side = out / "tiles" / "tile_0001_0003.safetensors", out / "tiles" / "tile_0001_0003.json"
    data = bytearray(tile.read_bytes())
    if damage == "flip a byte":
        data[-5] ^= 0x10  # inside the tensor's bytes: the file still parses, only the checksum can tell
        tile.write_bytes(bytes(data))
    elif damage == "truncate":
        tile.write_bytes(bytes(data[:-8]))
    elif damage == "delete the tile":
        tile.unlink()
    else:
        side.write_text("{not json")
    with pytest.raises(TileRunError, match="tile_0001_0003"):
        assemble(out)
    K2 = tiled_ntk(model, X, out, tile=TILE, precision="fp64", progress=False)
    assert torch.equal(K2, K), "the Gram after recomputing the damaged tile differs"
    sides = _sidecars(out)
    assert sides["tile_0001_0003"]["launch"] == 2 and sides["tile_0001_0003"]["recomputed"]
    assert all(s["launch"] == 1 for k, s in sides.items() if k != "tile_0001_0003")
    assert status(out)["recomputed"] == 1


def test_changed_model_data_or_settings_is_refused(tmp_path, reference):
    model, X, K, ref_out = reference
    out = tmp_path / "mismatch"
    shutil.copytree(ref_out, out)
    manifest = (out / "manifest.json").read_text()
    other = load_model("tiny", (3, 7), diff=True, seed=0, device="cpu", dtype=torch.float64)
    with torch.no_grad():
        w = other.blocks[1].mlp.c_proj.weight
        w[5, 3] = torch.nextafter(w[5, 3], torch.tensor(1e9, dtype=w.dtype))  # one ulp of one weight
    X2 = X.clone()
    X2[7, 2] = (X2[7, 2] + 1) % 512
    cases = [
        (dict(model=other), "the model changed \\(same architecture, different weights"),
        (dict(X=X2), "the data changed \\(same shapes"),
        (dict(X=X[:20]), "the data changed \\(shapes"),
        (dict(precision="fp32"), "settings changed \\(precision 'fp64' -> 'fp32'"),
        (dict(tile=6), "settings changed \\(tile 4 -> 6"),
        (dict(params="blocks.*"), "settings changed \\(params None -> 'blocks.\\*'"),
    ]
    for change, message in cases:
        kw = {"model": model, "X": X, "precision": "fp64", "tile": TILE, **change}
        with pytest.raises(TileRunError, match=message + ".*--overwrite"):
            tiled_ntk(kw.pop("model"), kw.pop("X"), out, progress=False, **kw)
    assert (out / "manifest.json").read_text() == manifest, "a refused run touched the manifest"
    K2 = tiled_ntk(model, X2, out, tile=TILE, precision="fp64", overwrite=True, progress=False)
    assert status(out)["launches"][0]["tiles_computed"] == TILES and not torch.equal(K2, K)


def test_ranks_with_different_models_are_refused(tmp_path, reference, monkeypatch):
    import minintk.distributed as D

    model, X, _, _ = reference
    monkeypatch.setattr(D, "_all_gather", lambda obj: [obj, {**obj, "fingerprints": {}}])
    with pytest.raises(TileRunError, match="ranks \\[1\\] hold another model"):
        tiled_ntk(model, X, tmp_path / "x", tile=TILE, precision="fp64", progress=False)


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_tensor_digest_is_the_weighted_bit_sum_and_sees_every_element(dtype):
    t = (torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 100).to(dtype)
    bits = t.reshape(-1).view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])
    expect = sum(int(b) * (((k * -7046029254386353131 + 1442695040888963407) | 1) % 2**64) for k, b in
                 enumerate(bits.tolist())) % 2**64
    assert tensor_digest(t, chunk=8) == tensor_digest(t) == expect
    flat = t.reshape(-1)
    for k in range(flat.numel()):
        u = flat.clone()
        u.view(bits.dtype)[k] ^= 1  # flip the lowest bit of one element
        assert tensor_digest(u) != expect, f"digest blind to element {k}"


def test_status_and_cli_errors(reference, tmp_path, capsys):
    assert main(["ntk", "--status", str(reference[3])]) == 0
    text = capsys.readouterr().out
    assert "21 / 21 done, 0 left" in text and "recomputed tiles  0" in text and "gram.safetensors" in text
    assert main(["ntk", "tiny", "random:8", "--labels", "3", "--out", str(tmp_path / "a")]) == 2
    assert "random:N:T[:vocab][:seed]" in capsys.readouterr().err
    assert main(["ntk", "tiny", "random:8:4", "--out", str(tmp_path / "b")]) == 2
    assert "--labels" in capsys.readouterr().err
    assert main(["ntk", "--status", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    save_file({"input_ids": torch.zeros(3, 4)}, tmp_path / "float.safetensors")
    with pytest.raises(SourceError, match="integer array"):
        load_tokens(str(tmp_path / "float.safetensors"), 512)
    assert parse_bytes("40GiB") == 40 << 30 and parse_bytes("512 MiB") == 512 << 20 and parse_bytes("1000") == 1000
    with pytest.raises(SourceError, match="40GiB"):
        parse_bytes("lots")
