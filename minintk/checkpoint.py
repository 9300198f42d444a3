"""Where a model's files are, the same way for every source: a folder, a weights file (.safetensors or .bin, single
or one shard's index), a Hugging Face cache snapshot, or a hub id (downloaded when online, found in the cache
offline). Weights are read without running pickled code: safetensors, or .bin through torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "tokenizer.model")
# The weight layouts of a folder, in the order they are preferred: (file or index, format).
LAYOUTS = (("model.safetensors", "safetensors"), ("model.safetensors.index.json", "safetensors"),
           ("pytorch_model.bin", "bin"), ("pytorch_model.bin.index.json", "bin"))


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded: missing files, an unknown layout or architecture, tensors that do not fit."""


@dataclass(frozen=True)
class Checkpoint:
    """A resolved source: its folder (config.json, tokenizer files), the weight files to read and their format."""

    folder: Path
    weights: tuple[Path, ...]
    format: str  # "safetensors" or "bin"

    @property
    def config(self) -> Path:
        return self.folder / "config.json"

    def read_config(self) -> dict:
        if not self.config.exists():
            raise CheckpointError(f"{self.folder} has no config.json; a model folder holds config.json and weights")
        try:
            return json.loads(self.config.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{self.config} is not valid JSON: {e}") from e

    def read_state(self) -> dict[str, torch.Tensor]:
        """Every tensor of the weight files, by checkpoint name."""
        state: dict[str, torch.Tensor] = {}
        for f in self.weights:
            state.update(_read_safetensors(f) if self.format == "safetensors" else _read_bin(f))
        return state

    def tokenizer_folder(self) -> Path | None:
        return self.folder if any((self.folder / f).exists() for f in TOKENIZER_FILES) else None


def resolve(source: str | os.PathLike, weights: bool = True) -> Checkpoint:
    """The Checkpoint of a folder, a weights file (.safetensors, .bin, or a shard index), a cache snapshot folder or
    a hub id. weights=False: only the folder is needed (a tokenizer). Raises CheckpointError naming what is
    missing and what is accepted."""
    path = Path(source)
    if path.is_dir():
        if weights and not (path / "config.json").exists():
            raise CheckpointError(f"{path} has no config.json; a model folder holds config.json and weights")
        return Checkpoint(path, *(_folder_weights(path) if weights else ((), "")))
    if path.is_file():
        if not weights:  # a tokenizer's files sit beside any file of the checkpoint
            return Checkpoint(path.parent, (), "")
        if path.name.endswith(".index.json"):
            return Checkpoint(path.parent, _shards(path), "bin" if ".bin." in path.name else "safetensors")
        if path.suffix in (".safetensors", ".bin"):
            return Checkpoint(path.parent, (path,), path.suffix.lstrip("."))
        raise CheckpointError(f"{path}: expected a model folder, a .safetensors or .bin file, or a shard index")
    if str(source).count("/") > 1 or str(source).startswith((".", "/", "~")) or not str(source).strip():
        raise CheckpointError(f"no such file or folder: {source}")
    return resolve(_snapshot(str(source), weights), weights)


def _folder_weights(folder: Path) -> tuple[tuple[Path, ...], str]:
    for name, fmt in LAYOUTS:
        if (folder / name).exists():
            return (_shards(folder / name) if name.endswith(".index.json") else (folder / name,)), fmt
    raise CheckpointError(f"{folder} has no weights: expected one of {', '.join(n for n, _ in LAYOUTS)}")


def _shards(index: Path) -> tuple[Path, ...]:
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a shard index (a JSON object with a weight_map): {e}") from e
    missing = [f for f in files if not (index.parent / f).exists()]
    if missing:
        raise CheckpointError(f"{index} names shards that are not there: {', '.join(missing[:4])}")
    return tuple(index.parent / f for f in files)


def _snapshot(repo_id: str, weights: bool) -> Path:
    """The local snapshot of a hub repository: downloaded (config, tokenizer, and safetensors or else .bin
    weights), or found in the Hugging Face cache when offline (HF_HUB_OFFLINE=1)."""
    try:
        from huggingface_hub import snapshot_download

        small = ["config.json", "*.txt", "*.model", "tokenizer*", "vocab*", "merges*", "special_tokens*"]
        folder = Path(snapshot_download(repo_id, allow_patterns=small + (["*.safetensors", "*.safetensors.index.json"]
                                                                           if weights else [])))
        if weights and not any((folder / n).exists() for n, _ in LAYOUTS):
            folder = Path(snapshot_download(repo_id, allow_patterns=small + ["*.bin", "*.bin.index.json"]))
        return folder
    except Exception as e:  # offline and not cached, unknown repo, no permission: one message that says what to do
        raise CheckpointError(
            f"could not get {repo_id!r} from the hub or its cache ({type(e).__name__}: {' '.join(str(e).split())}). "
            f"Offline, pass a local folder instead: one made by `save_pretrained`, e.g. `hf download {repo_id} "
            f"--local-dir ./{repo_id.split('/')[-1]}` on a machine online."
        ) from e


def _read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f} is not a complete safetensors file (truncated or corrupt?): {e}") from e


def _read_bin(f: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code in it lands here: weights_only refuses to run it
        raise CheckpointError(f"{f} is not a loadable weights-only file (pickled code is never run): "
                              f"{' '.join(str(e).split())[:300]}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{f} does not hold a dict of tensors (a state dict)")
    return state
