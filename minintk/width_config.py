"""The settings of a width scan (width.py): the variants compared (parameterization, attention scaling, start),
the widths, seeds, task and times of a scan, and its presets."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from .config import ATTN_SCALES, PARAMETERIZATIONS

STARTS = ("random", "pretrained", "linear_head")


class WidthScanError(ValueError):
    """A width-scan setting, task or run that cannot be used; the message says what would be accepted."""


@dataclass(frozen=True)
class Variant:
    """One line of the scan: parameterization ("ntk" | "standard"), attention scaling ("1/d" | "1/sqrt(d)"),
    start ("random" | "pretrained" | "linear_head")."""

    parameterization: str = "ntk"
    attn_scale: str = "1/d"
    start: str = "random"

    def __post_init__(self) -> None:
        for name, allowed in (("parameterization", PARAMETERIZATIONS), ("attn_scale", ATTN_SCALES[:2]),
                              ("start", STARTS)):
            if getattr(self, name) not in allowed:
                raise WidthScanError(f"unknown {name} {getattr(self, name)!r}; expected one of {', '.join(allowed)}")

    @property
    def key(self) -> str:
        return f"{self.parameterization}|{self.attn_scale}|{self.start}"

    @classmethod
    def from_key(cls, key: str) -> Variant:
        parts = key.split("|")
        if len(parts) != 3:
            raise WidthScanError(f"variant key must be 'parameterization|attn_scale|start', got {key!r}")
        return cls(*parts)


def star(parameterizations=("ntk",), attn_scales=("1/d",), starts=("random",), product: bool = False):
    """Variants around the first value of each list, one factor changed at a time (or the full product)."""
    lists = [tuple(dict.fromkeys(v)) for v in (parameterizations, attn_scales, starts)]
    if any(not v for v in lists):
        raise WidthScanError("every variant list needs at least one value")
    if product:
        return tuple(Variant(p, a, s) for p in lists[0] for a in lists[1] for s in lists[2])
    base = [v[0] for v in lists]
    out = [Variant(*base)]
    for i, values in enumerate(lists):
        for v in values[1:]:
            out.append(Variant(*(base[:i] + [v] + base[i + 1 :])))
    return tuple(out)


ALL_VARIANTS = star(("ntk", "standard"), ("1/d", "1/sqrt(d)"), ("random", "pretrained", "linear_head"))


@dataclass
class ScanConfig:
    """A width scan. Widths are d_model (n_head fixed, d_mlp = mlp_ratio d); times are eta t = lr * steps
    (multiples of lr); the teacher is a random scalar decoder of teacher_width (targets standardized, plus
    noise); data: an .npz/.safetensors task file instead of the teacher. budget_s: start no width whose
    estimated cost would end the scan past this many seconds (None: no limit)."""

    widths: tuple[int, ...] = (32, 64, 128, 256, 512)
    seeds: int = 4
    variants: tuple[Variant, ...] = ALL_VARIANTS
    n_layer: int = 1
    n_head: int = 4
    mlp_ratio: float = 4.0
    vocab_size: int = 32
    seq_len: int = 8
    n_train: int = 16
    n_test: int = 16
    noise: float = 0.1
    lr: float = 0.25
    times: tuple[float, ...] = (2.5, 5.0, 10.0)
    pretrain_time: float = 20.0
    teacher_width: int = 32
    data: str | None = None
    data_seed: int = 0
    device: str = "cpu"
    budget_s: float | None = None
    curve_points: int = 60
    level: float = 0.95

    def __post_init__(self) -> None:
        self.widths = tuple(sorted(set(self.widths)))
        self.times = tuple(float(t) for t in self.times)
        self.variants = tuple(v if isinstance(v, Variant) else Variant.from_key(v) for v in self.variants)
        if not self.widths or any(not isinstance(w, int) or w < 1 or w % self.n_head for w in self.widths):
            raise WidthScanError(f"widths must be positive multiples of n_head={self.n_head}, got {self.widths}")
        if len(self.widths) < 2 or self.seeds < 2:
            raise WidthScanError(f"a scan needs >= 2 widths and >= 2 seeds (spread and slopes), got "
                                 f"{len(self.widths)} widths, {self.seeds} seeds")
        if not self.variants:
            raise WidthScanError("a scan needs at least one variant")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise WidthScanError(f"lr must be a positive number, got {self.lr}")
        steps = list(self.steps)
        if (not self.times or any(s < 1 or abs(s * self.lr - t) > 1e-9 * t for s, t in zip(steps, self.times))
                or steps != sorted(set(steps))):
            raise WidthScanError(f"times must be increasing positive multiples of lr={self.lr}, got {self.times}")
        if self.pretrain_time < self.lr:
            raise WidthScanError(f"pretrain_time must be >= lr={self.lr}, got {self.pretrain_time}")
        for name in ("n_train", "n_test", "seq_len", "vocab_size", "teacher_width", "n_layer", "curve_points"):
            if getattr(self, name) < 1:
                raise WidthScanError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.teacher_width % self.n_head:
            raise WidthScanError(f"teacher_width={self.teacher_width} must be a multiple of n_head={self.n_head}")
        if not 0 < self.level < 1:
            raise WidthScanError(f"level must be in (0, 1), got {self.level}")

    @property
    def steps(self) -> tuple[int, ...]:
        """Gradient-descent steps at each time of `times` (eta t / lr)."""
        return tuple(round(t / self.lr) for t in self.times)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["variants"] = [v.key for v in self.variants]
        return d

    def fingerprint(self) -> dict:
        """The settings a run's numbers depend on (not which widths, seeds, variants, nor the budget)."""
        d = {k: v for k, v in self.to_dict().items() if k not in ("widths", "seeds", "variants", "budget_s",
                                                                  "curve_points", "level", "device", "data")}
        d["data_sha256"] = hashlib.sha256(Path(self.data).read_bytes()).hexdigest() if self.data else None
        return json.loads(json.dumps(d))


PRESETS = {
    "cpu": dict(),
    # GPT-Neo-1.3B's width is 2048. The budget keeps the command within ~8 minutes on one H100: a width whose
    # estimated cost would end the scan past it (4096, if the GPU is slower than estimated) is not started.
    "gpu": dict(widths=(256, 512, 1024, 2048, 4096), seeds=3, n_layer=2, n_train=64, n_test=64, seq_len=16,
                vocab_size=64, device="cuda", budget_s=400.0),
}


def preset(name: str, **overrides) -> ScanConfig:
    """ScanConfig of a preset ("cpu": widths 32..512, ~2 minutes on one core; "gpu": widths 256..4096, one H100)."""
    if name not in PRESETS:
        raise WidthScanError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return ScanConfig(**(PRESETS[name] | {k: v for k, v in overrides.items() if v is not None}))
