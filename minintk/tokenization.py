"""Prompts as token ids: the fallback tokenizer (byte-level BPE trained here), label words as single tokens, and the
encoding of a task's prompts into padded ids and attention masks (the inputs of finetune.Packed and of the NTK)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .data import DataError, Task


def train_tokenizer(texts, vocab_size: int = 4096, extra_words: tuple[str, ...] = ()):
    """Fallback tokenizer: byte-level BPE trained on `texts` with `tokenizers`, as a transformers fast tokenizer.

    Byte-level, so every string encodes (no unknown token). extra_words (e.g. the label words " positive") are
    added as single tokens, so a label word is one id as it is in GPT-2's vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    new = [w for w in extra_words if len(fast.encode(w, add_special_tokens=False)) != 1]
    if new:
        fast.add_tokens(new)
    return fast


def label_ids(tokenizer, words) -> tuple[int, ...]:
    """Token ids of label words (a sequence of strings), each a single token of the tokenizer and all distinct;
    DataError naming the word otherwise."""
    ids = []
    for w in words:
        enc = tokenizer.encode(w, add_special_tokens=False)
        if len(enc) != 1:
            raise DataError(f"label word {w!r} is {len(enc)} tokens {enc} for this tokenizer; each label must be one "
                            f"token (GPT-2-style tokenizers usually need a leading space: ' positive'; the fallback "
                            f"tokenizer adds its label words)")
        ids.append(enc[0])
    if len(set(ids)) != len(ids):
        raise DataError(f"label words {tuple(words)} map to the same token(s) {ids}")
    return tuple(ids)


@dataclass
class Encoded:
    """Token ids (n, T) int64, right-padded with 0, and the attention mask (n, T) int64 (1 = real token)."""

    ids: torch.Tensor
    mask: torch.Tensor

    def packed(self) -> torch.Tensor:
        """(n, 2, T): ids and mask in one tensor, the single input of finetune.Packed."""
        return torch.stack([self.ids, self.mask], 1)


def encode(task: Task, idx, tokenizer, max_len: int = 64) -> Encoded:
    """Prompts of examples idx as ids (n, T <= max_len). Long fields are cut (each to an equal share of the
    tokens the template leaves free), never the template, so the prompt always ends with its answer cue."""
    idx = np.asarray(idx).reshape(-1)
    n_fields = len(task.fields[0]) if task.fields else 1
    frame = len(tokenizer.encode(task.template.format(*([""] * n_fields)), add_special_tokens=False))
    budget = max_len - frame
    if budget < n_fields:
        raise DataError(f"max_len={max_len} leaves no room for the fields of template {task.template!r} "
                        f"({frame} tokens); raise max_len")
    rows = []
    for i in idx:
        f = task.fields[i]
        ids = task.template.format(*f)
        enc = tokenizer.encode(ids, add_special_tokens=False)
        if len(enc) > max_len:
            share, cut = budget // n_fields, []
            for s in f:
                e = tokenizer.encode(s, add_special_tokens=False)
                cut.append(tokenizer.decode(e[:share]))
            enc = tokenizer.encode(task.template.format(*cut), add_special_tokens=False)[:max_len]
        rows.append(enc)
    T = max(len(r) for r in rows)
    out = torch.zeros(len(rows), T, dtype=torch.int64)
    mask = torch.zeros(len(rows), T, dtype=torch.int64)
    for k, r in enumerate(rows):
        out[k, : len(r)] = torch.tensor(r, dtype=torch.int64)
        mask[k, : len(r)] = 1
    return Encoded(out, mask)
