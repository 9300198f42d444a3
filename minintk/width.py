"""Width-scaling checks of the NTK theory on the decoder (docs/theory.md section 6; paper Lemma 1, Theorem 1,
eq. 17-18).

For each embedding width d (heads and MLP ratio fixed), seed and variant, one run trains a student by full-batch
gradient descent on a regression task and measures, at fixed times eta t:
  spread     ||K_0^s - mean_s K_0||_F / ||mean_s K_0||_F over seeds s  (the NTK at the start concentrates)
  drift      ||K_t - K_0||_F / ||K_0||_F                              (the NTK stays put)
  movement   ||theta_t - theta_0|| / ||theta_0||                       (the weights move little)
  lin_error  RMS_test(f_t - f_lin,t) / RMS(y_test)                     (the network follows its linearization)
  loss_gap   |L_test(f_t) - L_test(f_lin,t)|, and both models' loss curves
and fits log(metric) = a + slope log(d) with a confidence interval, beside the theory's -1/2.
K is the exact empirical NTK (ntk.ntk) on the training inputs. f_lin,t is the closed form of gradient descent on
the linearized model (dynamics.gradient_descent_mse on K_0 and Theta_0(X_test, X)), which is what training
linearize.linearize's f_lin by the same steps gives (tests/test_width.py checks it against linearize.train).
Time eta t = lr t is in units where the kernel is O(1): the NTK parameterization steps by alpha = lr, the
standard one by alpha = lr / d (the paper normalizes its kernel by width, Theta / m; docs/theory.md section 1).
Starts: "random" (Gaussian init), "pretrained" (the same network trained by gradient descent on a source task, a
different teacher, for pretrain_time), "linear_head" (that pretrained backbone with a fresh random head, paper
section 5.1). Runs are recorded one by one, so an interrupted scan resumes where it stopped; width_report.py draws
the markdown tables and PNGs.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .config import ATTN_SCALES, PARAMETERIZATIONS, DecoderConfig
from .dynamics import gradient_descent_mse
from .engine import ntk
from .files import write_json
from .linearize import train
from .model import Decoder
from .spectrum import ols

STARTS = ("random", "pretrained", "linear_head")
METRICS = {  # name: (short label, definition, theory's slope against width; docs/theory.md section 6)
    "spread": ("K_0 spread", "||K_0^s - mean_s K_0||_F / ||mean_s K_0||_F across seeds s", -0.5),
    "drift": ("kernel drift", "||K_t - K_0||_F / ||K_0||_F", -0.5),
    "movement": ("weight movement", "||theta_t - theta_0|| / ||theta_0||", -0.5),
    "lin_error": ("linearization error", "RMS_test(f_t - f_lin,t) / RMS(y_test), held-out inputs", -0.5),
    "loss_gap": ("test-loss gap", "|L_test(f_t) - L_test(f_lin,t)|", None),  # theory: -> 0, no rate stated
    "pretrain_move": ("pretraining movement", "||theta_pre - theta_init|| / ||theta_init||", -0.5),
}


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


# ----------------------------------------------------------------------------------------------- tasks


class Task(NamedTuple):
    """Regression on token sequences: X (n, T) int64, y (n,) float32; X_test (m, T), y_test (m,)."""

    X: torch.Tensor
    y: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor


def check_task(task: Task, name: str = "task") -> Task:
    """Validate shapes and dtypes of a Task; returns it with y as float32."""
    X, y, Xt, yt = task
    for a, b, part in ((X, y, "train"), (Xt, yt, "test")):
        if not isinstance(a, torch.Tensor) or a.is_floating_point() or a.dim() != 2 or a.shape[0] < 1:
            raise WidthScanError(f"{name} {part} inputs must be integer token ids (n, T), got "
                                 f"{getattr(a, 'dtype', type(a).__name__)} {tuple(getattr(a, 'shape', ()))}")
        if not isinstance(b, torch.Tensor) or b.shape != (a.shape[0],) or not torch.isfinite(b.float()).all():
            raise WidthScanError(f"{name} {part} targets must be finite scalars (n,) = ({a.shape[0]},), got "
                                 f"{tuple(getattr(b, 'shape', ()))}; one target per sequence")
        if int(a.min()) < 0:
            raise WidthScanError(f"{name} {part} token ids must be >= 0, got {int(a.min())}")
    if X.shape[1] != Xt.shape[1]:
        raise WidthScanError(f"{name} train and test sequences differ in length: {X.shape[1]} vs {Xt.shape[1]}")
    return Task(X.long(), y.float(), Xt.long(), yt.float())


def teacher(vocab: int, seq_len: int, width: int, n_head: int, seed: int) -> Decoder:
    """A random scalar decoder (one block, 1/sqrt(d) attention, standard parameterization): the synthetic task."""
    cfg = DecoderConfig(vocab_size=vocab, n_positions=seq_len, d_model=width, n_layer=1, n_head=n_head,
                        attn_scale="1/sqrt(d)", head="scalar")
    model = Decoder(cfg)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model.eval()


def teacher_task(cfg: ScanConfig, seed: int, vocab: int | None = None, seq_len: int | None = None) -> Task:
    """n_train + n_test uniform token sequences labelled by teacher(seed), standardized over a pool of 1024
    sequences, plus N(0, noise^2). Same seed, same task."""
    vocab, seq_len = vocab or cfg.vocab_size, seq_len or cfg.seq_len
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, vocab, (1024 + cfg.n_train + cfg.n_test, seq_len), generator=g)
    with torch.no_grad():
        out = teacher(vocab, seq_len, cfg.teacher_width, cfg.n_head, seed)(X).double()
    z = (out - out[:1024].mean()) / out[:1024].std()
    y = (z + cfg.noise * torch.randn(z.shape, generator=g, dtype=torch.float64)).float()
    n = 1024 + cfg.n_train
    return Task(X[1024:n], y[1024:n], X[n:], y[n:])


def load_task(path: str | Path) -> Task:
    """A task file: .npz or .safetensors with X (n, T) int, y (n,), and optionally X_test, y_test (else the
    second half of the rows is held out)."""
    p = Path(path)
    if not p.is_file():
        raise WidthScanError(f"{path}: no such task file")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: torch.from_numpy(z[k]) for k in z.files}
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        arrays = load_file(p)
    else:
        raise WidthScanError(f"{path}: unknown task format {p.suffix!r}; give .npz or .safetensors (X, y[, X_test, "
                             f"y_test])")
    if "X" not in arrays or "y" not in arrays:
        raise WidthScanError(f"{path}: needs arrays 'X' (n, T) token ids and 'y' (n,) targets; it holds "
                             f"{sorted(arrays)}")
    X, y = arrays["X"], arrays["y"]
    if "X_test" in arrays and "y_test" in arrays:
        return check_task(Task(X, y, arrays["X_test"], arrays["y_test"]), str(path))
    if X.shape[0] < 2:
        raise WidthScanError(f"{path}: needs >= 2 rows to hold half out, or X_test and y_test")
    h = X.shape[0] // 2
    return check_task(Task(X[:h], y[:h], X[h:], y[h:]), str(path))


def tasks(cfg: ScanConfig) -> tuple[Task, Task, int]:
    """(target, source, vocab): the fine-tuning task, the pretraining task (a different teacher), the vocabulary."""
    if cfg.data:
        target = load_task(cfg.data)
        vocab = max(cfg.vocab_size, int(max(target.X.max(), target.X_test.max())) + 1)
        seq_len = target.X.shape[1]
    else:
        target = teacher_task(cfg, 2 * cfg.data_seed + 1)
        vocab, seq_len = cfg.vocab_size, cfg.seq_len
    return target, teacher_task(cfg, 2 * cfg.data_seed + 2, vocab, seq_len), vocab


# ----------------------------------------------------------------------------------------------- one run


def student(cfg: ScanConfig, variant: Variant, width: int, seed: int, vocab: int, seq_len: int) -> Decoder:
    """The scalar decoder of `width` at its seeded Gaussian init, fp32 on cfg.device. Parameters whose multiplier
    is 0 (NTK-parameterization biases with sigma_b = 0) do not enter f: they are frozen, outside theta."""
    dc = DecoderConfig(vocab_size=vocab, n_positions=seq_len, d_model=width, n_layer=cfg.n_layer,
                       n_head=cfg.n_head, mlp_ratio=cfg.mlp_ratio, attn_scale=variant.attn_scale,
                       parameterization=variant.parameterization, head="scalar")
    with torch.device(cfg.device):
        model = Decoder(dc)
        model.reset_parameters(torch.Generator(cfg.device).manual_seed(seed))
    for name, mult in model.multipliers().items():
        if mult == 0.0:
            model.get_parameter(name).requires_grad_(False)
    return model


def _theta(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def _norm(a: dict, b: dict | None = None, keys=None) -> float:
    """||a|| or ||a - b|| over the parameters `keys` (default all), accumulated in fp64."""
    keys = a.keys() if keys is None else keys
    return math.sqrt(sum(float(((a[k] - b[k] if b is not None else a[k]).double() ** 2).sum()) for k in keys))


def _load(model: torch.nn.Module, theta: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in theta.items():
            model.get_parameter(k).copy_(v)


def _group(name: str) -> str:
    if name.startswith(("wte.", "wpe.")):
        return "embeddings"
    if ".attn." in name:
        return "attention"
    return "mlp" if ".mlp." in name else "head" if name.startswith("head.") else "layernorm"


def step_size(cfg: ScanConfig, variant: Variant, width: int) -> float:
    """Gradient-descent step alpha: lr (NTK parameterization), lr / d (standard: kernel normalized by width)."""
    return cfg.lr / width if variant.parameterization == "standard" else cfg.lr


def pretrain(model: Decoder, source: Task, alpha: float, steps: int) -> tuple[dict, float]:
    """Full-batch gradient descent on the source task, in place. Returns (theta_pre, ||theta_pre - theta_init||
    / ||theta_init||)."""
    theta_init = _theta(model)
    run = train(model, source.X, source.y, lr=alpha, steps=steps)
    if not torch.isfinite(run.train_loss).all():
        raise WidthScanError(f"pretraining diverged (step alpha = {alpha:.3g}); lower lr")
    _load(model, run.params)
    return run.params, _norm(run.params, theta_init) / _norm(theta_init)


def fresh_head(model: Decoder, seed: int) -> None:
    """Replace the scalar head by a fresh Gaussian one (paper section 5.1), seeded."""
    g = torch.Generator(model.head.weight.device).manual_seed(seed)
    ntk_param = model.cfg.parameterization == "ntk"
    std_w = 1.0 if ntk_param else model.cfg.sigma_w / math.sqrt(model.cfg.d_model)
    std_b = 1.0 if ntk_param else model.cfg.sigma_b  # as Decoder.reset_parameters draws them
    with torch.no_grad():
        model.head.weight.normal_(0.0, std_w, generator=g)
        model.head.bias.normal_(0.0, std_b, generator=g) if std_b > 0 else model.head.bias.zero_()


def measure(model: Decoder, task: Task, alpha: float, steps: tuple[int, ...], curve_points: int = 60) -> dict:
    """Train the network by gradient descent (step alpha) and its linearization (closed form) from the model's
    current parameters; the metrics at each checkpoint of `steps`. The model ends at the last checkpoint.

    Returns a dict of lists over checkpoints (drift, movement, movement_by_group, lin_error, lin_error_train,
    loss_gap), K0 (n, n) on the training inputs, and loss curves (eta t, net/lin train/test) at <= curve_points
    steps plus the checkpoints.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    X, Xt = task.X.to(device), task.X_test.to(device)
    y, yt = task.y.to(device, dtype), task.y_test.to(device, dtype)
    n = X.shape[0]
    precision = "fp64" if dtype == torch.float64 else "fp32"  # the NTK in the model's own precision
    K_all = ntk(model, torch.cat([X, Xt]), precision=precision, progress=False).double().cpu()  # (n + m, n + m)
    K0, Kx = K_all[:n, :n], K_all[n:, :n]
    lmax = float(torch.linalg.eigvalsh(K0)[-1])
    if not alpha * lmax / n < 2:
        raise WidthScanError(f"gradient descent is unstable: alpha * lambda_max(K_0) / n = {alpha * lmax / n:.3g} "
                             f">= 2 (alpha = {alpha:.3g}); lower lr")
    with torch.no_grad():
        f0, f0t = model(X).double().cpu(), model(Xt).double().cpu()
    t_all = np.arange(steps[-1] + 1)
    u_lin, f_lin = gradient_descent_mse(K0, y, alpha)(t_all, u0=f0, K_test=Kx, f0_test=f0t)
    theta0 = _theta(model)
    norm0 = _norm(theta0)
    groups = {g: [k for k in theta0 if _group(k) == g] for g in sorted({_group(k) for k in theta0})}
    pred, pred_t = [f0.numpy()[None]], [f0t.numpy()[None]]
    rec = {k: [] for k in ("drift", "movement", "movement_by_group", "lin_error", "lin_error_train", "loss_gap")}
    y_np, yt_np = y.double().cpu().numpy(), yt.double().cpu().numpy()
    y_rms, done = float(np.sqrt(np.mean(yt_np**2))), 0
    for s in steps:
        run = train(model, X, y, lr=alpha, steps=s - done, X_test=Xt, y_test=yt)
        if not (torch.isfinite(run.train_loss).all() and torch.isfinite(run.test_loss).all()):
            raise WidthScanError(f"the network's training diverged before step {s} (alpha = {alpha:.3g}); lower lr")
        pred.append(run.train_pred[1:].double().cpu().numpy())
        pred_t.append(run.test_pred[1:].double().cpu().numpy())
        done = s
        _load(model, run.params)
        Kt = ntk(model, X, precision=precision, progress=False).double().cpu()
        theta = _theta(model)
        rec["drift"].append(float(torch.linalg.norm(Kt - K0) / torch.linalg.norm(K0)))
        rec["movement"].append(_norm(theta, theta0) / norm0)
        rec["movement_by_group"].append({g: _norm(theta, theta0, ks) / _norm(theta0, keys=ks)
                                         for g, ks in groups.items()})
        rec["lin_error"].append(float(np.sqrt(np.mean((pred_t[-1][-1] - f_lin[s]) ** 2))) / y_rms)
        rec["lin_error_train"].append(float(np.sqrt(np.mean((pred[-1][-1] - u_lin[s]) ** 2))) / y_rms)
    u_net, f_net = np.concatenate(pred), np.concatenate(pred_t)
    losses = {"net_train": 0.5 * np.mean((u_net - y_np) ** 2, 1), "net_test": 0.5 * np.mean((f_net - yt_np) ** 2, 1),
              "lin_train": 0.5 * np.mean((u_lin - y_np) ** 2, 1), "lin_test": 0.5 * np.mean((f_lin - yt_np) ** 2, 1)}
    rec["loss_gap"] = [float(abs(losses["net_test"][s] - losses["lin_test"][s])) for s in steps]
    idx = np.union1d(np.round(np.linspace(0, steps[-1], curve_points)).astype(int), steps)
    rec["curves"] = {"step": idx.tolist()} | {k: v[idx].tolist() for k, v in losses.items()}
    rec |= {"K0": [[float(f"{v:.8g}") for v in row] for row in K0.tolist()], "lambda_max_K0_over_n": lmax / n,
            "theta0_norm": norm0, "n_params": int(sum(v.numel() for v in theta0.values())), "y_test_rms": y_rms}
    return rec


def run_one(cfg: ScanConfig, variant: Variant, width: int, seed: int, target: Task, source: Task, vocab: int,
            cache: dict) -> dict:
    """One (variant, width, seed) run: build the start, measure. `cache` keeps the last pretrained weights so
    that the pretrained and linear_head variants of a (width, seed, parameterization, scaling) share them."""
    t0, c0 = time.perf_counter(), time.process_time()
    model = student(cfg, variant, width, seed, vocab, target.X.shape[1])
    alpha = step_size(cfg, variant, width)
    pre = None
    if variant.start != "random":
        key = (width, seed, variant.parameterization, variant.attn_scale)
        if key not in cache:
            cache.clear()  # one pretrained network in memory at a time
            cache[key] = pretrain(model, _to(source, cfg.device), alpha, round(cfg.pretrain_time / cfg.lr))
        theta_pre, pre = cache[key]
        _load(model, theta_pre)
        if variant.start == "linear_head":
            fresh_head(model, 10_000 + seed)
    rec = measure(model, target, alpha, cfg.steps, cfg.curve_points)
    rec |= {"variant": variant.key, "width": width, "seed": seed, "alpha": alpha, "times": list(cfg.times),
            "steps": list(cfg.steps), "pretrain_move": pre, "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0, "device": str(cfg.device)}
    return rec


def _to(task: Task, device: str) -> Task:
    return Task(*(t.to(device) for t in task))


def run_key(variant: Variant, width: int, seed: int) -> str:
    return f"{variant.key}|d={width}|seed={seed}"


# ----------------------------------------------------------------------------------------------- the scan


def scan(cfg: ScanConfig, runs: dict | None = None, on_run: Callable[[dict], None] | None = None,
         progress: bool = True) -> dict:
    """Every (width, seed, variant) run not already in `runs` (keyed by run_key), widths ascending so that a
    budget or an interruption cuts the widest. on_run(runs) is called after each run (to save). Returns runs,
    with "_stopped" set to a message if the budget stopped the scan early."""
    from tqdm.auto import tqdm

    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise WidthScanError(f"device {cfg.device!r} asked for, but torch sees no CUDA GPU; give --device cpu (and a "
                             f"smaller --widths list) or run on a GPU machine")
    runs = dict(runs or {})
    runs.pop("_stopped", None)
    target, source, vocab = tasks(cfg)
    keys = [(w, s, v) for w in cfg.widths for s in range(cfg.seeds) for v in cfg.variants]
    todo = [k for k in keys if run_key(k[2], k[0], k[1]) not in runs]
    bar = tqdm(total=len(keys), initial=len(keys) - len(todo), desc="width scan", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    start, cache, block = time.perf_counter(), {}, {}  # block: seconds spent per width in this call
    for w, s, v in todo:
        spent = time.perf_counter() - start
        if cfg.budget_s is not None and spent > cfg.budget_s:
            runs["_stopped"] = f"budget {cfg.budget_s:.0f} s spent: stopped before {run_key(v, w, s)}"
            break
        if cfg.budget_s is not None and block and w not in block:  # a new width: would it fit the budget?
            pw, sec = list(block.items())[-1]
            per_run = sec / sum(1 for k in todo if k[0] == pw)
            estimate = per_run * sum(1 for k in todo if k[0] == w) * (w / pw) ** 2  # cost ~ d^2 per run
            if spent + estimate > cfg.budget_s:
                runs["_stopped"] = (f"budget {cfg.budget_s:.0f} s: width {w} not started (estimated {estimate:.0f} s "
                                    f"after {spent:.0f} s)")
                break
        bar.set_postfix_str(f"d={w} seed={s} {v.key}")
        t0 = time.perf_counter()
        try:
            rec = run_one(cfg, v, w, s, target, source, vocab, cache)
        except WidthScanError as e:
            rec = {"variant": v.key, "width": w, "seed": s, "error": str(e)}
        except torch.cuda.OutOfMemoryError:  # not recorded: a resume on a larger GPU retries it
            cache.clear()
            torch.cuda.empty_cache()
            runs["_stopped"] = f"out of GPU memory at {run_key(v, w, s)}; wider widths not run"
            break
        block[w] = block.get(w, 0.0) + time.perf_counter() - t0
        runs[run_key(v, w, s)] = rec
        if on_run is not None:
            on_run(runs)
        bar.update(1)
    bar.close()
    return runs


# ----------------------------------------------------------------------------------------------- fits


class Slope(NamedTuple):
    """log(metric) = a + slope log(width), least squares over all (width, seed) points; ci at `level` (t)."""

    slope: float
    ci: tuple[float, float]
    se: float
    intercept: float
    r2: float
    n_points: int
    level: float


def fit_slope(widths, values, level: float = 0.95) -> Slope | None:
    """Fit values ~ C width^slope on log-log axes. widths, values: (N,) paired points (e.g. one per seed and
    width); non-positive or non-finite values are left out. None when fewer than 3 distinct widths remain: with
    two, the interval would measure only the spread over seeds, not the fit of a power law."""
    from scipy.stats import t as student_t

    w, v = np.asarray(widths, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if w.shape != v.shape or w.ndim != 1:
        raise WidthScanError(f"widths and values must be paired 1-D arrays, got {w.shape} and {v.shape}")
    ok = np.isfinite(v) & (v > 0) & np.isfinite(w) & (w > 0)
    w, v = w[ok], v[ok]
    if np.unique(w).size < 3:
        return None
    b, a, se, r2 = ols(np.log(w), np.log(v))
    q = float(student_t.ppf(0.5 + level / 2, df=w.size - 2))
    return Slope(b, (b - q * se, b + q * se), se, a, r2, int(w.size), level)


def verdict(fit: Slope | None, prediction: float | None) -> str:
    """Words for a fitted slope against the predicted one: matches / steeper / shallower / no decay / grows."""
    if fit is None:
        return "no fit"
    lo, hi = fit.ci
    if lo > 0:
        return "grows"
    if hi >= 0:
        return "no significant decay"
    if prediction is None:
        return "decays"
    return "matches" if lo <= prediction <= hi else "steeper" if hi < prediction else "shallower"


def spread(K0s: list) -> list[float]:
    """||K_s - mean K||_F / ||mean K||_F for each Gram of K0s, a list of (n, n) arrays from different seeds."""
    Ks = np.stack([np.asarray(K, dtype=np.float64) for K in K0s])
    mean = Ks.mean(0)
    return [float(np.linalg.norm(K - mean) / np.linalg.norm(mean)) for K in Ks]


def summarize(cfg: ScanConfig, runs: dict) -> dict:
    """Per variant and metric: values per width (over seeds), the fitted slope with its CI, the prediction and
    a verdict. Metrics at the last time; drift, movement and lin_error also at every time (by_time)."""
    mine = [runs[run_key(v, w, s)] for v in cfg.variants for w in cfg.widths for s in range(cfg.seeds)
            if run_key(v, w, s) in runs]
    out = {"config": cfg.to_dict(), "variants": {}, "failed": {}, "stopped": runs.get("_stopped"),
           "run_seconds": sum(r.get("seconds", 0.0) for r in mine), "runs": len(mine)}
    for v in cfg.variants:
        recs = [runs.get(run_key(v, w, s)) for w in cfg.widths for s in range(cfg.seeds)]
        recs = [r for r in recs if r is not None]
        out["failed"] |= {run_key(v, r["width"], r["seed"]): r["error"] for r in recs if "error" in r}
        good = [r for r in recs if "error" not in r]
        points: dict[str, list] = {m: [] for m in METRICS}
        by_time: dict[str, list] = {m: [[] for _ in cfg.times] for m in ("drift", "movement", "lin_error")}
        for r in good:
            for m in ("drift", "movement", "lin_error", "loss_gap"):
                points[m].append((r["width"], r[m][-1]))
            for m, rows in by_time.items():
                for i, val in enumerate(r[m]):
                    rows[i].append((r["width"], val))
            if r.get("pretrain_move") is not None:
                points["pretrain_move"].append((r["width"], r["pretrain_move"]))
        for w in cfg.widths:
            same = [r for r in good if r["width"] == w]
            if len(same) >= 2:
                points["spread"] += [(w, val) for val in spread([r["K0"] for r in same])]
        metrics = {}
        for m, pts in points.items():
            if not pts:
                continue
            label, _, pred = METRICS[m]
            fit = fit_slope([p[0] for p in pts], [p[1] for p in pts], cfg.level)
            per_width = {}
            for w in cfg.widths:
                vals = [p[1] for p in pts if p[0] == w]
                if vals:
                    per_width[str(w)] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)),
                                         "max": float(np.max(vals)), "values": vals}
            entry = {"label": label, "prediction": pred, "per_width": per_width,
                     "fit": fit._asdict() if fit else None, "verdict": verdict(fit, pred)}
            if m in by_time:
                fits = [fit_slope([p[0] for p in rows], [p[1] for p in rows], cfg.level) for rows in by_time[m]]
                entry["by_time"] = [{"eta_t": t, "fit": f._asdict() if f else None} for t, f in zip(cfg.times, fits)]
            metrics[m] = entry
        groups = sorted({g for r in good for g in r["movement_by_group"][-1]})
        by_group = {g: fit_slope([r["width"] for r in good], [r["movement_by_group"][-1][g] for r in good], cfg.level)
                    for g in groups}
        out["variants"][v.key] = {"parameterization": v.parameterization, "attn_scale": v.attn_scale,
                                  "start": v.start, "runs": len(good), "metrics": metrics,
                                  "movement_by_group": {g: f._asdict() if f else None for g, f in by_group.items()}}
    return out


# ----------------------------------------------------------------------------------------------- files


def load_runs(cfg: ScanConfig, out: Path) -> dict:
    """The runs already measured in out/runs.json, if its settings are cfg's; {} if there is none."""
    p = out / "runs.json"
    if not p.is_file():
        return {}
    saved = json.loads(p.read_text())
    if saved.get("fingerprint") != cfg.fingerprint():
        diff = sorted(k for k in set(saved.get("fingerprint", {})) | set(cfg.fingerprint())
                      if saved.get("fingerprint", {}).get(k) != cfg.fingerprint().get(k))
        raise WidthScanError(f"{p} was measured with other settings ({', '.join(diff)} differ); give another --out "
                             f"or the same settings to resume")
    return saved["runs"]


def run_scan(cfg: ScanConfig, out: str | Path, progress: bool = True) -> dict:
    """Scan, resuming from out/runs.json, saving it after every run, then write summary.json, summary.md and the
    PNGs to out/. Returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fp = cfg.fingerprint()

    def save(runs: dict) -> None:
        write_json(out / "runs.json", {"fingerprint": fp, "runs": runs}, indent=None)

    runs = scan(cfg, load_runs(cfg, out), save, progress)
    save(runs)
    from .width_report import plot_losses, plot_metric, summary_markdown

    summary = summarize(cfg, runs)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(summary_markdown(summary))
    try:
        for m in METRICS:
            if any(m in v["metrics"] for v in summary["variants"].values()):
                plot_metric(summary, m, out / f"{m}.png")
        plot_losses(summary, runs, out / "losses.png")
    except ImportError as e:
        print(f"minintk width-scan: no plots ({e}); rerun the same command where matplotlib is installed: it "
              f"draws them from runs.json without recomputing", file=sys.stderr)
    return summary
