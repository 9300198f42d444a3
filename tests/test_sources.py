"""What the command line reads (minintk.sources): token-id files and byte sizes, with errors that say what is
accepted."""

import pytest
import torch
from safetensors.torch import save_file

from minintk.sources import SourceError, load_tokens, parse_bytes


def test_float_token_ids_are_refused(tmp_path):
    save_file({"input_ids": torch.zeros(3, 4)}, tmp_path / "float.safetensors")
    with pytest.raises(SourceError, match="integer array"):
        load_tokens(str(tmp_path / "float.safetensors"), 512)


def test_parse_bytes():
    assert parse_bytes("40GiB") == 40 << 30 and parse_bytes("512 MiB") == 512 << 20 and parse_bytes("1000") == 1000
    with pytest.raises(SourceError, match="40GiB"):
        parse_bytes("lots")
