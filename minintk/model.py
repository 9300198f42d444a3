"""The decoder: embeddings, pre-LN blocks of causal (optionally local) attention and MLP, final LN, heads.

One file, nanoGPT style. The network knows nothing of the NTK; it only exposes, on every Linear and
Embedding, the multiplier `w_mult` (and `b_mult`) of the NTK parameterization (docs/theory.md section 1), so
that a parameter omega enters the forward pass as w_mult * omega.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig


class ModelInputError(ValueError):
    """The input ids (or mask) given to the decoder cannot be run."""


def _readable(t: torch.Tensor) -> bool:
    """Whether checks may read t's values: not under vmap (no values), not while a CUDA graph is recorded or its
    caller forbids host syncs (torch.cuda.set_sync_debug_mode("error"): minintk's engine, which has checked the
    ids and mask itself, records its graphs so)."""
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return False
    return not t.is_cuda or not (torch.cuda.is_current_stream_capturing() or torch.cuda.get_sync_debug_mode() == 2)


class Linear(nn.Linear):
    """y = x (w_mult W)^T + b_mult b. Standard parameterization has w_mult = b_mult = 1."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True, w_mult: float = 1.0, b_mult: float = 1.0):
        super().__init__(d_in, d_out, bias=bias)
        self.w_mult, self.b_mult = float(w_mult), float(b_mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.w_mult == 1.0 else self.weight * self.w_mult
        b = self.bias if (self.bias is None or self.b_mult == 1.0) else self.bias * self.b_mult
        return F.linear(x, w, b)


class Embedding(nn.Embedding):
    """Lookup of w_mult * W (an embedding is a linear map of one-hot inputs, fan_in = 1)."""

    def __init__(self, n: int, d: int, w_mult: float = 1.0):
        super().__init__(n, d)
        self.w_mult = float(w_mult)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out = super().forward(idx)
        return out if self.w_mult == 1.0 else out * self.w_mult


def _activation(name: str):
    return {
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu": F.gelu,
        "relu": F.relu,
        "tanh": torch.tanh,
    }[name]


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention, softmax(s Q K^T + mask) V, with an optional local window."""

    def __init__(self, cfg: DecoderConfig, window: int | None, mults: dict):
        super().__init__()
        d = cfg.d_model
        self.n_head, self.d_head, self.window = cfg.n_head, cfg.d_head, window
        self.scale = {"1/d": 1.0 / cfg.d_head, "1/sqrt(d)": 1.0 / math.sqrt(cfg.d_head), "none": 1.0}[cfg.attn_scale]
        self.q_proj = Linear(d, d, bias=cfg.qkv_bias, **mults)
        self.k_proj = Linear(d, d, bias=cfg.qkv_bias, **mults)
        self.v_proj = Linear(d, d, bias=cfg.qkv_bias, **mults)
        self.out_proj = Linear(d, d, bias=True, **mults)

    def allowed(self, T: int, device: torch.device) -> torch.Tensor:
        """(T, T) bool: query i may see key j (j <= i, and i - j < window for a local layer)."""
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(T, device=device)[None, :]
        ok = j <= i
        if self.window is not None:
            ok = ok & (i - j < self.window)
        return ok

    def scores(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention probabilities (n, H, T, T) of input x (n, T, d)."""
        n, T, _ = x.shape
        q = self.q_proj(x).view(n, T, self.n_head, self.d_head).transpose(1, 2)
        k = self.k_proj(x).view(n, T, self.n_head, self.d_head).transpose(1, 2)
        # Scores in at least fp32 (as GPT-Neo does, so bf16 runs do not saturate the softmax), and never narrower
        # than the model: an fp64 model stays fp64 throughout (GPT-Neo itself narrows fp64 to fp32 here).
        acc = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):  # under bf16 autocast too
            s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * self.scale
        ok = self.allowed(T, x.device)
        if key_mask is not None:
            ok = ok & key_mask[:, None, None, :].bool()
        s = torch.where(ok, s, torch.finfo(s.dtype).min)
        return torch.softmax(s, dim=-1).to(x.dtype)

    def mask(self, T: int, device: torch.device, key_mask: torch.Tensor | None) -> torch.Tensor | None:
        """scaled_dot_product_attention's boolean mask, (T, T) or (n, 1, T, T); None for plain causal attention.
        A query whose keys are all masked (a padding position) sees itself only, so it stays finite; no
        attended position reads it (its key is masked for them)."""
        if key_mask is None and (self.window is None or self.window >= T):
            return None
        ok = self.allowed(T, device)
        if key_mask is not None:
            ok = (ok & key_mask[:, None, None, :].bool()) | torch.eye(T, dtype=torch.bool, device=device)
        return ok

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fused attention (PyTorch's scaled_dot_product_attention: flash or memory-efficient kernels on CUDA,
        their exact math elsewhere); in 16-bit modes the scores and softmax are accumulated in fp32 by the kernel,
        as scores() does explicitly."""
        n, T, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, T, self.n_head, self.d_head).transpose(1, 2)

        mask = self.mask(T, x.device, key_mask)
        y = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                           attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return self.out_proj(y.transpose(1, 2).reshape(n, T, d))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig, mults_in: dict, mults_out: dict):
        super().__init__()
        self.c_fc = Linear(cfg.d_model, cfg.d_mlp, **mults_in)
        self.c_proj = Linear(cfg.d_mlp, cfg.d_model, **mults_out)
        self.act = _activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """x <- x + Attn(LN1(x)); x <- x + MLP(LN2(x))."""

    def __init__(self, cfg: DecoderConfig, layer: int, mults):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.attn = CausalSelfAttention(cfg, cfg.window(layer), mults(cfg.d_model))
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.mlp = MLP(cfg, mults(cfg.d_model), mults(cfg.d_mlp))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), key_mask)
        return x + self.mlp(self.ln_2(x))


class Decoder(nn.Module):
    """Decoder-only transformer. forward(idx (n, T) int64, attention_mask (n, T) | None) -> head output.

    Outputs by cfg.head: "lm" (n, T, V) logits; "scalar" (n,); "classes" (n, C); "label_words" (n, k), or
    (n,) = logit[label_ids[1]] - logit[label_ids[0]] with label_diff. There is no dropout anywhere, so
    train and eval modes give the same function.
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        ntk = cfg.parameterization == "ntk"

        def mults(fan_in: int) -> dict:
            if not ntk:
                return {}
            return {"w_mult": cfg.sigma_w / math.sqrt(fan_in), "b_mult": cfg.sigma_b}

        emb_mult = cfg.sigma_w if ntk else 1.0
        self.wte = Embedding(cfg.vocab_size, cfg.d_model, w_mult=emb_mult)
        self.wpe = Embedding(cfg.n_positions, cfg.d_model, w_mult=emb_mult) if cfg.n_positions else None
        self.blocks = nn.ModuleList(Block(cfg, i, mults) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        if cfg.head in ("lm", "label_words"):
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False, **mults(cfg.d_model))
            if cfg.tie_lm_head:  # the same Parameter, used by two modules
                self.lm_head.weight = self.wte.weight
            self.head = None
        else:
            self.lm_head = None
            d_out = 1 if cfg.head == "scalar" else cfg.n_classes
            self.head = Linear(cfg.d_model, d_out, bias=True, **mults(cfg.d_model))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Gaussian init (docs/theory.md section 1): W ~ N(0, sigma_w^2/fan_in) standard, omega ~ N(0, 1) NTK."""
        cfg, ntk = self.cfg, self.cfg.parameterization == "ntk"
        for m in self.modules():
            if isinstance(m, Embedding):
                m.weight.normal_(0.0, 1.0 if ntk else cfg.sigma_w, generator=generator)
            elif isinstance(m, Linear):
                if m is self.lm_head and cfg.tie_lm_head:
                    continue  # tied: initialised as the embedding
                m.weight.normal_(0.0, 1.0 if ntk else cfg.sigma_w / math.sqrt(m.in_features), generator=generator)
                if m.bias is not None:
                    std = 1.0 if ntk else cfg.sigma_b
                    m.bias.normal_(0.0, std, generator=generator) if std > 0 else m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()

    def check_input(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Raise ModelInputError naming the problem if idx (n, T) cannot be run."""
        if not isinstance(idx, torch.Tensor) or idx.dtype in (torch.bool,) or idx.is_floating_point():
            got = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ModelInputError(f"input ids must be an integer tensor (n, T), got {got}")
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ModelInputError(f"input ids must have shape (n, T) with T >= 1, got {tuple(idx.shape)}")
        T, V = idx.shape[1], self.cfg.vocab_size
        if self.cfg.n_positions is not None and T > self.cfg.n_positions:
            raise ModelInputError(
                f"sequence length {T} exceeds the model's n_positions={self.cfg.n_positions}; truncate the input"
            )
        if not _readable(idx):
            return
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= V):
            raise ModelInputError(f"token ids must lie in [0, {V}), got min {int(idx.min())}, max {int(idx.max())}")
        if attention_mask is not None and attention_mask.shape != idx.shape:
            raise ModelInputError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from the ids' {tuple(idx.shape)}"
            )
        if attention_mask is not None and _readable(attention_mask):
            empty = (~attention_mask.bool().any(1)).nonzero().flatten().tolist()
            if empty:
                raise ModelInputError(
                    f"attention_mask rows {empty[:8]} mask every token: such a sample has no output; drop it"
                )

    def hidden(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states after ln_f: (n, T, d)."""
        self.check_input(idx, attention_mask)
        x = self.wte(idx)
        if self.wpe is not None:
            pos = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
            x = x + self.wpe(pos)
        for block in self.blocks:
            x = block(x, attention_mask)
        return self.ln_f(x)

    def pool(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(n, T, d) -> (n, d): the last attended token, or the mean over attended tokens.

        "Last" is the last position whose mask is 1, so right padding, left padding (as batches are padded for
        generation) and no padding all pool the sample's own last token.
        """
        n, T, _ = h.shape
        if self.cfg.pool == "mean":
            if attention_mask is None:
                return h.mean(1)
            m = attention_mask.to(h.dtype)[..., None]
            return (h * m).sum(1) / m.sum(1).clamp_min(1)
        if attention_mask is None:
            return h[:, -1]
        positions = torch.arange(T, device=h.device).expand(n, T)
        last = torch.where(attention_mask.bool(), positions, -1).amax(1).clamp_min(0)
        return h[torch.arange(n, device=h.device), last]

    def forward(self, idx: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """idx (n, T) int64 (or input_ids=, as a tokenizer returns it), attention_mask (n, T) | None -> head output."""
        if (idx is None) == (input_ids is None):
            raise ModelInputError("give the token ids once, as idx or as input_ids")
        idx = input_ids if idx is None else idx
        h = self.hidden(idx, attention_mask)
        cfg = self.cfg
        if cfg.head == "lm":
            return self.lm_head(h)
        z = self.pool(h, attention_mask)
        if cfg.head == "label_words":
            full = self.lm_head(z)
            logits = torch.stack([full[:, i] for i in cfg.label_ids], 1)  # a list index would sync with the host
            return logits[:, 1] - logits[:, 0] if cfg.label_diff else logits
        out = self.head(z)
        return out[:, 0] if cfg.head == "scalar" else out

    def get_input_embeddings(self) -> Embedding:
        """The token embedding (as transformers models name it)."""
        return self.wte

    def attention_probs(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Attention probabilities of every layer, each (n, H, T, T)."""
        self.check_input(idx)
        probs = []
        with torch.no_grad():
            x = self.wte(idx)
            if self.wpe is not None:
                x = x + self.wpe(torch.arange(idx.shape[1], device=idx.device).expand_as(idx))
            for block in self.blocks:
                probs.append(block.attn.scores(block.ln_1(x)))
                x = block(x)
        return probs

    def multipliers(self) -> dict[str, float]:
        """NTK-parameterization multiplier of every parameter use, by module.parameter name."""
        out = {}
        for name, m in self.named_modules():
            if isinstance(m, (Linear, Embedding)):
                out[f"{name}.weight"] = m.w_mult
                if getattr(m, "bias", None) is not None:
                    out[f"{name}.bias"] = m.b_mult
        return out

    def param_groups(self) -> dict[str, int]:
        """Parameter count per group (embeddings, attention, mlp, layernorm, head); tied counted once."""
        groups: dict[str, int] = {}
        seen = set()
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            g = (
                "embeddings"
                if name.startswith(("wte", "wpe"))
                else "attention"
                if ".attn." in name
                else "mlp"
                if ".mlp." in name
                else "layernorm"
                if ".ln_" in name or name.startswith("ln_f")
                else "head"
            )
            groups[g] = groups.get(g, 0) + p.numel()
        return groups

    def describe(self) -> dict:
        """Architecture summary (`minintk info`): sizes, attention scaling, parameter counts per group."""
        cfg = self.cfg
        groups = self.param_groups()
        return {
            "d_model": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "d_head": cfg.d_head,
            "d_mlp": cfg.d_mlp,
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.n_positions,
            "attention_windows": [cfg.window(i) for i in range(cfg.n_layer)],
            "attn_scale": cfg.attn_scale,
            "attn_scale_value": self.blocks[0].attn.scale,
            "parameterization": cfg.parameterization,
            "head": cfg.head,
            "activation": cfg.activation,
            "parameters": groups,
            "total_parameters": sum(groups.values()),
        }
