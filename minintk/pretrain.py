"""Language-model pretraining of a decoder on a token stream: what makes a small offline model "pretrained".

Next-token cross-entropy on random windows of the stream, AdamW with linear warmup and cosine decay, GPT-Neo's
initialisation (every weight N(0, 0.02^2), biases 0, LayerNorm 1/0). The last `val_fraction` of the stream is
held out, and its loss is measured before and after, so a report can say how far pretraining got.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .model import Decoder


class PretrainError(ValueError):
    """A pretraining setting or token stream that cannot be used."""


@dataclass
class PretrainConfig:
    """steps of batch_size windows of seq_len + 1 tokens; peak lr after `warmup` steps, cosine to lr / 10.
    max_seconds: stop early once training has run this long (None: never); the record says where it stopped."""

    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 64
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    val_fraction: float = 0.02
    seed: int = 0
    max_seconds: float | None = None


@torch.no_grad()
def gpt_init(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """GPT-Neo's initialisation, in place: weights N(0, std^2), biases 0, LayerNorm gain 1 and bias 0."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
    return model


def _windows(stream: torch.Tensor, starts: torch.Tensor, T: int) -> torch.Tensor:
    return stream[starts[:, None] + torch.arange(T + 1)]


def lm_loss(model: Decoder, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of windows batch (b, T + 1)."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(model: Decoder, stream: torch.Tensor, seq_len: int, max_windows: int = 64) -> float:
    """Mean next-token loss (nats) over up to max_windows disjoint windows of a held-out stream (N,)."""
    device = next(model.parameters()).device
    n = min(max_windows, (stream.numel() - 1) // (seq_len + 1))
    if n < 1:
        raise PretrainError(f"held-out stream of {stream.numel()} tokens is shorter than one window of {seq_len + 1}")
    starts = torch.arange(n) * (seq_len + 1)
    return float(lm_loss(model, _windows(stream, starts, seq_len).to(device)))


def pretrain(model: Decoder, stream: torch.Tensor, cfg: PretrainConfig, progress: bool = True) -> dict:
    """Train an LM-head Decoder (on its device) on the token stream (N,) int64. Returns a record: losses per step,
    held-out loss before and after (nats per token), steps done and tokens seen."""
    if model.cfg.head != "lm":
        raise PretrainError(f"pretraining needs the tied LM head (head='lm'), the model has {model.cfg.head!r}")
    if model.cfg.n_positions is not None and cfg.seq_len > model.cfg.n_positions:
        raise PretrainError(f"seq_len={cfg.seq_len} exceeds the model's n_positions={model.cfg.n_positions}")
    stream = stream.reshape(-1).long().cpu()
    n_val = int(stream.numel() * cfg.val_fraction)
    train, val = stream[: stream.numel() - n_val], stream[stream.numel() - n_val :]
    if train.numel() < 2 * (cfg.seq_len + 1):
        raise PretrainError(f"token stream of {train.numel()} training tokens is too short for seq_len={cfg.seq_len}")
    device = next(model.parameters()).device
    use_bf16 = device.type == "cuda"
    before = heldout_loss(model, val, cfg.seq_len) if n_val > cfg.seq_len else float("nan")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))

    def lr_at(t: int) -> float:
        if t < cfg.warmup:
            return cfg.lr * (t + 1) / cfg.warmup
        frac = (t - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress, mininterval=2.0)
    for t in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(t)
        starts = torch.randint(0, train.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=g)
        batch = _windows(train, starts, cfg.seq_len).to(device)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        with amp:
            loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if t % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if cfg.max_seconds is not None and time.perf_counter() - t0 > cfg.max_seconds:
            break
    after = heldout_loss(model, val, cfg.seq_len) if n_val > cfg.seq_len else float("nan")
    return {"losses": losses, "heldout_loss_before": before, "heldout_loss_after": after,
            "steps_done": len(losses), "tokens_seen": len(losses) * cfg.batch_size * cfg.seq_len,
            "train_tokens": int(train.numel()), "heldout_tokens": int(n_val)}
