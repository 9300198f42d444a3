"""What the command line reads: a model by name or path, token-id files, text files through a tokenizer, label
words, and byte sizes. Each raises SourceError with one line that names the bad value and what is accepted."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


class SourceError(ValueError):
    """A model, data, text, tokenizer or label given on the command line cannot be used; the message says why."""


def parse_bytes(text: str | int | None) -> int | None:
    """'40GiB', '512MiB', '8G' or a plain number of bytes -> bytes (None stays None)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"([0-9.]+)\s*([kmgt]?)(i?b)?", str(text).strip().lower())
    if not m or m.group(1).count(".") > 1:
        raise SourceError(f"--max-memory must be bytes or a size like 40GiB, 512MiB; got {text!r}")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def _builtin(source: str) -> str | None:
    from .config import BUILTIN

    return BUILTIN[source] if source in BUILTIN and not Path(source).exists() else None


def model_vocab(source: str) -> int:
    """The vocabulary size of a built-in architecture or of a GPT-Neo folder / file's config.json."""
    from .config import gpt_neo_config

    size = _builtin(source)
    if size is not None:
        return gpt_neo_config(size).vocab_size
    path = Path(source)
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg.is_file():
        raise SourceError(f"{source}: no config.json to read the vocabulary from (a GPT-Neo folder, or a built-in)")
    return int(json.loads(cfg.read_text())["vocab_size"])


def load_model(
    source: str, labels: Sequence[int], diff: bool = False, seed: int = 0, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A Decoder whose output is the logits of token ids `labels` at each sample's last attended token (n, k), or
    with diff their difference (n,): a built-in architecture ("tiny", "gpt-neo-125M", "gpt-neo-1.3B",
    "gpt-neo-2.7B") with random weights drawn on `device` from `seed`, or a GPT-Neo folder / .safetensors / hub
    id (load_gpt_neo)."""
    from .config import gpt_neo_config
    from .gptneo import load_gpt_neo
    from .model import Decoder

    head = {"head": "label_words", "label_ids": tuple(int(i) for i in labels), "label_diff": diff}
    if not head["label_ids"]:
        raise SourceError("the NTK needs a per-sample output: give label words or token ids, e.g. "
                          "--labels ' negative, positive' --diff")
    size = _builtin(source)
    if size is not None:
        torch.manual_seed(seed)
        with torch.device(device):
            model = Decoder(gpt_neo_config(size, **head))
    else:
        model = load_gpt_neo(source, **head).to(device)
    return model.to(dtype).eval()


def load_tokens(spec: str, vocab: int) -> Inputs:
    """Token ids (n, T) int64, or {"idx": ids, "attention_mask": mask}, from `spec`: random:N:T[:vocab][:seed],
    or a .npy file of ids, or a .pt / .safetensors file of ids (a lone tensor, or "input_ids" [+ "attention_mask"])."""
    if spec.startswith("random:"):
        try:
            nums = [int(v) for v in spec.split(":")[1:]]
        except ValueError:
            nums = []
        if not 2 <= len(nums) <= 4 or min(nums[:3]) < 1 or (len(nums) > 2 and nums[2] > vocab):
            raise SourceError(f"bad data {spec!r}: expected random:N:T[:vocab][:seed] with N, T >= 1 and "
                              f"1 <= vocab <= {vocab} (the model's vocabulary)")
        n, T = nums[:2]
        v = nums[2] if len(nums) > 2 else vocab
        seed = nums[3] if len(nums) > 3 else 0
        return torch.randint(0, v, (n, T), generator=torch.Generator().manual_seed(seed))
    path = Path(spec)
    if not path.is_file():
        raise SourceError(f"{spec}: no such token file; give .npy/.pt/.safetensors ids (n, T), random:N:T, or "
                          f"--text FILE")
    found = _read_tensors(path)
    if isinstance(found, torch.Tensor):
        found = {"input_ids": found}
    if not isinstance(found, dict) or "input_ids" not in found and len(found) != 1:
        raise SourceError(f"{spec}: expected a tensor of ids or keys 'input_ids' [+ 'attention_mask'], got "
                          f"{sorted(found) if isinstance(found, dict) else type(found).__name__}")
    ids = found.get("input_ids", next(iter(found.values())))
    mask = found.get("attention_mask")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise SourceError(f"{spec}: token ids must be an integer array (n, T), got {got}")
    if mask is not None and mask.shape != ids.shape:
        raise SourceError(f"{spec}: attention_mask {tuple(mask.shape)} must match the ids {tuple(ids.shape)}")
    return ids.long() if mask is None else {"idx": ids.long(), "attention_mask": mask}


def _read_tensors(path: Path):
    if path.suffix == ".npy":
        import numpy as np

        return {"input_ids": torch.from_numpy(np.load(path, allow_pickle=False))}
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    raise SourceError(f"{path}: unknown token file type {path.suffix!r}; give .npy, .pt or .safetensors")


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """Examples of a text file: one per non-empty line (.txt and others), or the `field` of each JSON object of a
    .jsonl file."""
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"{path}: no such text file")
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if p.suffix != ".jsonl":
        texts = lines
    else:
        texts = []
        for k, line in enumerate(lines, 1):
            try:
                texts.append(str(json.loads(line)[field]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SourceError(f"{path}, line {k}: expected a JSON object with a {field!r} field") from None
    if not texts:
        raise SourceError(f"{path}: no examples (one per line, or JSONL with a {field!r} field)")
    return texts


def tokenizer_for(source: str, spec: str | None, texts: Sequence[str], words: Sequence[str], vocab: int):
    """The tokenizer for text input: spec (a folder, a file in it, a cache snapshot or a hub id, as load_tokenizer
    resolves them), else the model's own; spec "fallback" trains a byte-level BPE on the texts (label words as
    single tokens), for random-weight built-ins. No tokenizer and no fallback asked for: SourceError."""
    from .gptneo import CheckpointError, load_tokenizer
    from .tokenization import train_tokenizer

    if spec == "fallback":
        return train_tokenizer(texts, vocab_size=min(vocab, 4096), extra_words=tuple(words))
    where = spec or (None if _builtin(source) else source)
    try:
        tok = None if where is None else load_tokenizer(where)
    except CheckpointError as e:
        raise SourceError(str(e)) from None
    if tok is None:
        raise SourceError(f"{where or source} has no tokenizer (tokenizer.json / vocab.json); pass --tokenizer "
                          f"FOLDER, or --tokenizer fallback for a random-weight model")
    return tok


def encode_texts(texts: Sequence[str], tokenizer, max_len: int | None) -> dict[str, torch.Tensor]:
    """{"idx": (n, T) ids, "attention_mask": (n, T)}: the texts tokenized, padded on the tokenizer's side (right
    unless it says left) to the longest, cut to max_len tokens (the model's position limit)."""
    enc = tokenizer(list(texts), padding=True, truncation=max_len is not None, max_length=max_len,
                    return_tensors="pt")
    return {"idx": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def resolve_labels(spec: str | Sequence[int] | None, tokenizer=None) -> list[int]:
    """Label token ids from "352,2089" (ids) or " negative, positive" (words, each one token of the tokenizer)."""
    if spec is None or isinstance(spec, (list, tuple)):
        return [int(i) for i in spec or ()]
    parts = [p for p in spec.split(",") if p.strip()]
    if all(p.strip().lstrip("-").isdigit() for p in parts):
        return [int(p) for p in parts]
    if tokenizer is None:
        raise SourceError(f"--labels {spec!r} are words: they need a tokenizer (--text input, or --tokenizer); "
                          f"or give token ids, e.g. 352,2089")
    from .tokenization import label_ids

    return list(label_ids(tokenizer, parts))
