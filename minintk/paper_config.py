"""The settings of a paper run (paper.py): every choice as a field of PaperConfig, and the presets (quick, default,
gpu) that `minintk paper` starts from."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .data import HUB_TASKS, OFFLINE_TASKS
from .planted_check import CheckConfig


class PaperError(ValueError):
    """A pipeline setting that cannot run; the message says what would."""


@dataclass
class PaperConfig:
    """Every choice of a run. model None: the small decoder (d_model, n_layer, n_head) pretrained for
    pretrain_steps on the packaged text; "random:125M" (or another GPT-Neo size): that architecture with GPT-Neo's
    random initialisation; else a GPT-Neo checkpoint (folder, weight file, cache snapshot or hub id, as
    load_gpt_neo reads it). pretrain_steps applies to every model (0: none). tokenizer "model": the checkpoint's
    own (PaperError if it has none); "fallback": a byte-level BPE trained on the corpus and the lexicons (its ids
    mean nothing to a trained checkpoint; the built-in and random: models always use it)."""

    preset: str = "default"
    tasks: tuple[str, ...] = OFFLINE_TASKS
    model: str | None = None
    tokenizer: str = "model"
    device: str = "cpu"
    threads: int = 0  # 0: the idle cores (cores minus the 1-minute load average), at least 1
    data_dir: str | None = None
    cache_dir: str | None = None
    # the small offline decoder and its pretraining
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    vocab_size: int = 4096
    pretrain_steps: int = 800
    pretrain_batch: int = 32
    pretrain_seq: int = 64
    pretrain_lr: float = 3e-3
    pretrain_max_min: float | None = None  # stop pretraining early after this many minutes
    # NTK Gram and its decay
    kernel_samples: int = 100
    kernel_draws: int = 3
    kernel_precision: str = "fp32"
    # data and fine-tuning
    n_val: int = 200
    n_test: int = 400
    max_len: int = 32
    sizes: tuple[int, ...] = (50, 100, 200, 500, 1000, 2000)
    seeds: tuple[int, ...] = (0, 1)
    methods: tuple[str, ...] = ("full", "probe")
    lr: dict = field(default_factory=lambda: {"full": 1e-3, "tangent": 3e-4, "probe": 1e-2})
    batch_size: int = 32
    max_steps: int = 1500
    eval_every: int = 20
    patience: int = 5
    # task vectors
    tv_size: int = 500
    tv_grid: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
    tangent: bool = True
    xi_alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5)
    xi_samples: int = 200
    budget_min: float | None = 28.0
    # planted tasks (planted_check.CheckConfig settings; planted False skips the phase)
    planted: bool = True
    planted_check: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tasks, self.sizes, self.seeds = tuple(self.tasks), tuple(sorted(self.sizes)), tuple(self.seeds)
        self.methods, self.tv_grid, self.xi_alphas = tuple(self.methods), tuple(self.tv_grid), tuple(self.xi_alphas)
        unknown = [t for t in self.tasks if t not in OFFLINE_TASKS and t not in HUB_TASKS]
        if unknown:
            raise PaperError(f"unknown tasks {unknown}; offline: {', '.join(OFFLINE_TASKS)}; "
                             f"online: {', '.join(HUB_TASKS)}")
        if not self.tasks or not self.sizes or not self.seeds:
            raise PaperError("need at least one task, one training size and one seed")
        if "full" not in self.methods:
            raise PaperError(f"methods must include 'full' (the paper's fine-tuning), got {self.methods}")
        if self.tv_size not in self.sizes:
            raise PaperError(f"tv_size={self.tv_size} must be one of the sizes {self.sizes}: the task vectors reuse "
                             f"those fine-tuning runs")
        if self.tokenizer not in ("model", "fallback"):
            raise PaperError(f"tokenizer={self.tokenizer!r}; expected 'model' (the checkpoint's own) or 'fallback'")
        try:
            CheckConfig(**self.planted_check)
        except (TypeError, ValueError) as e:
            raise PaperError(f"planted_check {self.planted_check}: {e}") from None
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise PaperError(f"device {self.device!r} requested but torch sees no CUDA device; use --device cpu")


PRESETS = {
    # about 2-3 minutes on 2 CPU cores (plus the install): 4 tasks, a tiny decoder, one seed
    "quick": dict(tasks=("vader", "afinn", "vader-sign", "afinn-sign"), d_model=64, n_layer=2, n_head=4,
                  vocab_size=2048, pretrain_steps=300, kernel_draws=1, sizes=(50, 200, 800), seeds=(0,),
                  tv_size=800, tangent=False, xi_alphas=(0.0, 1.0), budget_min=6.0,
                  planted_check=dict(sizes=(25, 50, 100), n_test=100, sample=100, k=8, seeds=2, net_sizes=(25,),
                                     net_steps=500)),
    # the committed CPU report: under 30 minutes on 2 cores
    "default": dict(planted_check=dict(k=10, net_sizes=(100,), net_steps=2000)),
    # one GPU, a GPT-Neo-125M-sized model: about 8 minutes, budget-guarded
    "gpu": dict(lr={"full": 5e-5, "tangent": 5e-5, "probe": 1e-3}, vocab_size=8192,
                pretrain_seq=128, pretrain_batch=32, pretrain_lr=6e-4, pretrain_max_min=1.5, budget_min=7.0,
                max_steps=1200, planted_check=dict(k=10, net_sizes=(200,), net_steps=3000)),
}


def config(preset: str = "default", **overrides) -> PaperConfig:
    """A PaperConfig from a preset (PRESETS) with overrides (None values are ignored)."""
    if preset not in PRESETS:
        raise PaperError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(PaperConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise PaperError(f"unknown settings {bad}; known: {sorted(known)}")
    kw = dict(PRESETS[preset], preset=preset)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return PaperConfig(**kw)
