"""One run of a width scan: a student decoder of one width, seed and variant is built (at its random init, or
pretrained on the source task, or pretrained with a fresh head), trained by gradient descent beside its
linearization, and measured at fixed times eta t (docs/theory.md section 6; paper Lemma 1, Theorem 1)."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .config import DecoderConfig
from .dynamics import gradient_descent_mse
from .engine import ntk
from .linearize import train
from .model import Decoder
from .width_config import ScanConfig, Variant, WidthScanError
from .width_tasks import Task


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
