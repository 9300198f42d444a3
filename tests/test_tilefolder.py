"""The tile folder (minintk.tilefolder): fingerprints that see every bit, damaged tiles found by their checksums
and computed again, folders of another model, data or settings refused with what changed."""

import shutil

import pytest
import torch
from conftest import TILE, TILES, sidecars

from minintk.distributed import tiled_ntk
from minintk.sources import load_model
from minintk.tilefolder import TileRunError, assemble, tensor_digest
from minintk.tileprogress import status

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete the tile", "garble the sidecar"])
def test_damaged_tile_is_detected_and_recomputed(tmp_path, tiled_reference, damage):
    model, X, K, ref_out = tiled_reference
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
    sides = sidecars(out)
    assert sides["tile_0001_0003"]["launch"] == 2 and sides["tile_0001_0003"]["recomputed"]
    assert all(s["launch"] == 1 for k, s in sides.items() if k != "tile_0001_0003")
    assert status(out)["recomputed"] == 1


def test_changed_model_data_or_settings_is_refused(tmp_path, tiled_reference):
    model, X, K, ref_out = tiled_reference
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
