"""DecoderConfig: every architectural choice of the decoder in one validated dataclass (docs/theory.md section 1)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

ATTN_SCALES = ("1/d", "1/sqrt(d)", "none")
PARAMETERIZATIONS = ("standard", "ntk")
ACTIVATIONS = ("gelu_new", "gelu", "relu", "tanh")
HEADS = ("lm", "scalar", "classes", "label_words")
POOLS = ("last", "mean")


class ConfigError(ValueError):
    """A DecoderConfig field has a value the decoder cannot build."""


@dataclass
class DecoderConfig:
    """A pre-LN transformer decoder, the paper's theory model or a faithful GPT-Neo.

    attn_scale: factor s in softmax(s Q K^T): "1/d" is 1/d_head (Yang; the paper's), "1/sqrt(d)" the usual
    1/sqrt(d_head), "none" is GPT-Neo's own (s = 1). attention_windows is a per-layer pattern, cycled over
    depth: None is global causal attention, an int w lets token i see j with i - w < j <= i.
    parameterization "ntk" stores omega ~ N(0, 1) and multiplies by sigma_w / sqrt(fan_in) (biases by
    sigma_b) in the forward pass; "standard" stores W ~ N(0, sigma_w^2 / fan_in), b ~ N(0, sigma_b^2).
    head: "lm" (logits (n, T, V)), "scalar" (n,), "classes" (n, C), "label_words" (logits of label_ids at the
    pooled position (n, k), or their difference (n,)). tie_lm_head: the LM head's weight is the token
    embedding's (GPT-Neo's default), or a parameter of its own (tie_word_embeddings=False checkpoints).
    Attention scores are computed in the wider of the model's dtype and fp32: bf16 models score in fp32 as
    GPT-Neo does, fp64 models stay fp64 throughout (GPT-Neo itself narrows them to fp32).
    """

    vocab_size: int = 256
    n_positions: int | None = 64
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    mlp_ratio: float = 4.0
    activation: str = "gelu_new"
    ln_eps: float = 1e-5
    attn_scale: str = "1/sqrt(d)"
    attention_windows: tuple[int | None, ...] = (None,)
    qkv_bias: bool = False
    parameterization: str = "standard"
    sigma_w: float = 1.0
    sigma_b: float = 0.0
    head: str = "scalar"
    pool: str = "last"
    n_classes: int = 2
    label_ids: tuple[int, ...] = field(default_factory=tuple)
    label_diff: bool = False
    tie_lm_head: bool = True

    def __post_init__(self) -> None:
        self.attention_windows = tuple(self.attention_windows)
        self.label_ids = tuple(int(i) for i in self.label_ids)
        for name in ("vocab_size", "d_model", "n_layer", "n_head"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_positions is not None and (not isinstance(self.n_positions, int) or self.n_positions < 1):
            raise ConfigError(f"n_positions must be a positive integer or None, got {self.n_positions!r}")
        if self.d_model % self.n_head:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                f"pick n_head among the divisors of d_model"
            )
        if not (self.mlp_ratio > 0 and math.isfinite(self.mlp_ratio)) or self.d_mlp < 1:
            raise ConfigError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")
        self._choice("attn_scale", ATTN_SCALES)
        self._choice("parameterization", PARAMETERIZATIONS)
        self._choice("activation", ACTIVATIONS)
        self._choice("head", HEADS)
        self._choice("pool", POOLS)
        if not self.attention_windows:
            raise ConfigError("attention_windows must hold at least one entry (None = global attention)")
        for w in self.attention_windows:
            if w is not None and (not isinstance(w, int) or w < 1):
                raise ConfigError(f"attention window must be None (global) or a positive int, got {w!r}")
        if not (self.ln_eps > 0):
            raise ConfigError(f"ln_eps must be positive, got {self.ln_eps!r}")
        if not (self.sigma_w > 0) or not (self.sigma_b >= 0):
            raise ConfigError(f"need sigma_w > 0 and sigma_b >= 0, got {self.sigma_w!r}, {self.sigma_b!r}")
        if self.head == "classes" and self.n_classes < 2:
            raise ConfigError(f"head 'classes' needs n_classes >= 2, got {self.n_classes}")
        if self.head == "label_words":
            if not self.label_ids:
                raise ConfigError("head 'label_words' needs label_ids, the token ids of the label words")
            bad = [i for i in self.label_ids if not 0 <= i < self.vocab_size]
            if bad:
                raise ConfigError(f"label_ids {bad} are outside the vocabulary [0, {self.vocab_size})")
            if self.label_diff and len(self.label_ids) != 2:
                raise ConfigError(f"label_diff needs exactly 2 label_ids, got {len(self.label_ids)}")

    def _choice(self, name: str, allowed: tuple[str, ...]) -> None:
        if getattr(self, name) not in allowed:
            raise ConfigError(f"unknown {name} {getattr(self, name)!r}; expected one of {', '.join(allowed)}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def d_mlp(self) -> int:
        return int(round(self.mlp_ratio * self.d_model))

    @property
    def n_outputs(self) -> int:
        """Outputs per sample of the head (the C of docs/theory.md section 2); 0 for the LM head."""
        if self.head == "scalar" or (self.head == "label_words" and self.label_diff):
            return 1
        return {"classes": self.n_classes, "label_words": len(self.label_ids), "lm": 0}[self.head]

    def window(self, layer: int) -> int | None:
        """Attention window of a layer: None for global."""
        return self.attention_windows[layer % len(self.attention_windows)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DecoderConfig:
        known = set(cls.__dataclass_fields__)
        d = {k: v for k, v in d.items() if k != "attn_scores_fp32"}  # retired: scores only ever widen now
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown DecoderConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


# Built-in architecture names (CLI and minintk ntk sources) -> gpt_neo_config sizes.
BUILTIN = {"tiny": "tiny", "gpt-neo-125M": "125M", "gpt-neo-1.3B": "1.3B", "gpt-neo-2.7B": "2.7B"}


def gpt_neo_config(size: str = "125M", **overrides) -> DecoderConfig:
    """The GPT-Neo architectures ("125M", "1.3B", or "tiny" for tests) as a DecoderConfig."""
    sizes = {
        "tiny": dict(d_model=64, n_layer=2, n_head=4, vocab_size=512, n_positions=128),
        "125M": dict(d_model=768, n_layer=12, n_head=12),
        "1.3B": dict(d_model=2048, n_layer=24, n_head=16),
        "2.7B": dict(d_model=2560, n_layer=32, n_head=20),
    }
    if size not in sizes:
        raise ConfigError(f"unknown GPT-Neo size {size!r}; expected one of {', '.join(sizes)}")
    base = dict(
        vocab_size=50257,
        n_positions=2048,
        mlp_ratio=4.0,
        activation="gelu_new",
        ln_eps=1e-5,
        attn_scale="none",
        attention_windows=(None, 256),
        qkv_bias=False,
        head="lm",
    )
    base.update(sizes[size])
    base.update(overrides)
    return DecoderConfig(**base)
