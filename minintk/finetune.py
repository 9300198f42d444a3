"""Fine-tuning a pretrained decoder on a text task, with hold-out early stopping (paper section 7; docs/theory.md
sections 3-4).

Three methods, one loop:
  full     every parameter trained: f(x; theta), theta_0 the pretrained weights (linearize.functional).
  tangent  the linearized model f(x; theta_0) + J(x; theta_0)(theta - theta_0) trained instead (linearize.linearize):
           kernel regression with the empirical NTK, and task arithmetic is exact in function space.
  probe    the body frozen, only the readout trained on its pooled features (n, d): linear probing.
Heads: regression tasks get a fresh scalar head on the last token (N(0, 0.02^2) weights, zero bias); classification
tasks read the label-word logit difference logit[w1] - logit[w0] of the tied LM head (no new parameter).
Loss: (1/2b) sum_i (f(x_i) - y_i)^2 on standardized targets (regression: z-scores with the training set's mean and
sd; classification: y = +-1), the squared loss of the theory. Adam, minibatches of shuffled epochs.
Hold-out early stopping: every `eval_every` steps the loss on the validation set is measured (with the train
subset's and the test set's, logged as curves); training stops when `patience` evaluations in a row have not
improved on the best (stopping.holdout_stop), and the parameters of the best evaluation are returned.
Metrics: MSE in label units (regression); accuracy and F1 of class 1 (classification); nerr, the error relative
to the trivial predictor (training mean, or majority class), comparable across tasks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .linearize import functional, linearize
from .model import Decoder
from .stopping import holdout_stop

METHODS = ("full", "tangent", "probe")
Params = dict[str, torch.Tensor]


class FinetuneError(ValueError):
    """A fine-tuning setting, model or data that cannot be used."""


@dataclass
class FinetuneConfig:
    """Adam with step lr on batches of batch_size; at most max_steps steps; an evaluation every eval_every steps;
    stop after `patience` evaluations without improvement of the validation loss. freeze_head: keep a scalar head
    at its (seeded) initialisation, so that the body carries the whole adaptation (for task vectors)."""

    method: str = "full"
    lr: float = 1e-4
    batch_size: int = 32
    max_steps: int = 2000
    eval_every: int = 25
    patience: int = 6
    weight_decay: float = 0.0
    seed: int = 0
    log_subset: int = 256
    freeze_head: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FinetuneError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        for name in ("batch_size", "max_steps", "eval_every", "patience"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise FinetuneError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FinetuneError(f"lr must be a positive finite number, got {self.lr!r}")


class Packed(nn.Module):
    """A Decoder of one packed input x (n, 2, T) = (ids, attention mask), so that torch.func sees one tensor."""

    def __init__(self, model: Decoder):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x[:, 0], x[:, 1])


def unpack(X: torch.Tensor) -> dict[str, torch.Tensor]:
    """Packed inputs (n, 2, T) as the Decoder's keywords {"idx", "attention_mask"} (for ntk on Packed.model)."""
    return {"idx": X[:, 0], "attention_mask": X[:, 1]}


def task_model(base: Decoder, kind: str, label_ids: tuple[int, int] | None = None) -> Packed:
    """The pretrained body of `base` under the task's head, as a Packed module on base's device and dtype.

    kind "regression": a scalar head on the last token; "classification": logit[label_ids[1]] - logit[label_ids[0]].
    """
    if kind == "regression":
        cfg = replace(base.cfg, head="scalar", label_ids=(), label_diff=False)
    elif kind == "classification":
        if label_ids is None:
            raise FinetuneError("a classification task needs the label-word ids (class 0, class 1)")
        cfg = replace(base.cfg, head="label_words", label_ids=tuple(label_ids), label_diff=True)
    else:
        raise FinetuneError(f"kind must be 'regression' or 'classification', got {kind!r}")
    p = next(base.parameters())
    model = Decoder(cfg).to(device=p.device, dtype=p.dtype)  # .to keeps the tied LM head tied
    body = {k: v for k, v in base.state_dict().items() if not k.startswith(("head.", "lm_head."))}
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected or any(not k.startswith(("head.", "lm_head.")) for k in missing):
        raise FinetuneError(f"the base model does not match the task model: missing {missing}, unexpected {unexpected}")
    if model.head is not None:
        reset_head(model, seed=0)
    return Packed(model)


HEAD_STD = 0.02  # GPT-Neo's initializer_range, which transformers also uses for a new sequence-classification head


def reset_head(model: Decoder, seed: int) -> None:
    """A fresh scalar/class head: weights N(0, 0.02^2) as GPT-Neo initialises, bias 0, from `seed`. Small, so that the
    pretrained model's initial outputs stay near 0 (the mean of the standardized targets)."""
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        w = model.head.weight
        w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float64).to(w) * HEAD_STD)
        model.head.bias.zero_()


@torch.no_grad()
def features(model: Packed, X: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Pooled final hidden states (n, d) of packed inputs X (n, 2, T): what a linear probe reads."""
    dec = model.model
    out = []
    for i in range(0, X.shape[0], batch):
        x = X[i : i + batch].to(next(dec.parameters()).device)
        out.append(dec.pool(dec.hidden(x[:, 0], x[:, 1]), x[:, 1]))
    return torch.cat(out)


def probe_readout(model: Packed) -> tuple[Callable, Params]:
    """f(theta, H) = H w + b on features H (n, d), started at the task model's own readout (so the probe's
    initial function is the model's): the scalar head, or the label-word direction E[w1] - E[w0]."""
    dec = model.model
    if dec.head is not None:
        theta0 = {"w": dec.head.weight[0].detach().clone(), "b": dec.head.bias[0].detach().clone()}
    else:
        i0, i1 = dec.cfg.label_ids
        E = dec.lm_head.weight.detach() * dec.lm_head.w_mult
        theta0 = {"w": (E[i1] - E[i0]).clone(), "b": torch.zeros((), dtype=E.dtype, device=E.device)}
    return (lambda th, H: H @ th["w"] + th["b"]), theta0


class LoopResult(NamedTuple):
    """history: one record per evaluation (with its "step"); best_step: step of the best validation loss;
    stop_step: the step at which training ended; stopped: True when patience ran out (not max_steps)."""

    history: list[dict]
    best_step: int
    stop_step: int
    stopped: bool


def holdout_loop(
    step: Callable[[int], None],
    evaluate: Callable[[int], dict],
    *,
    max_steps: int,
    eval_every: int,
    patience: int,
    on_best: Callable[[int], None] | None = None,
) -> LoopResult:
    """Run step(t) for t = 0..max_steps-1 with evaluate(t) (a dict holding "val_loss") at t = 0, eval_every, ...
    and at max_steps; stop at the evaluation that is the `patience`-th in a row without a strict improvement
    (stopping.holdout_stop). on_best(t) is called whenever an evaluation is the best so far."""
    history: list[dict] = []
    curve: list[float] = []
    for t in range(max_steps + 1):
        if t % eval_every == 0 or t == max_steps:
            rec = dict(evaluate(t), step=t)
            if "val_loss" not in rec:
                raise FinetuneError("evaluate must return a dict with 'val_loss'")
            history.append(rec)
            curve.append(float(rec["val_loss"]))
            stop = holdout_stop(curve, patience)
            if stop.best_index == len(curve) - 1 and on_best is not None:
                on_best(t)
            if stop.stopped:
                return LoopResult(history, history[stop.best_index]["step"], t, True)
        if t < max_steps:
            step(t)
    best = holdout_stop(curve, patience).best_index
    return LoopResult(history, history[best]["step"], max_steps, False)


def metrics(pred: np.ndarray, y: np.ndarray, kind: str, trivial: float) -> dict:
    """Scores of predictions pred (n,) in label units (regression) or as logit differences (classification).

    trivial: the training mean (regression) or majority class (classification), for nerr = error / trivial error.
    """
    pred, y = np.asarray(pred, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if kind == "regression":
        mse = float(np.mean((pred - y) ** 2))
        base = float(np.mean((trivial - y) ** 2))
        return {"mse": mse, "nerr": mse / base if base > 0 else float("nan")}
    label = (pred > 0).astype(np.float64)
    acc = float(np.mean(label == y))
    tp = float(np.sum((label == 1) & (y == 1)))
    fp, fn = float(np.sum((label == 1) & (y == 0))), float(np.sum((label == 0) & (y == 1)))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0
    base = float(np.mean(y != trivial))
    return {"accuracy": acc, "f1": f1, "nerr": (1 - acc) / base if base > 0 else float("nan")}


class Targets(NamedTuple):
    """How labels map to the trained scale: z = (y - shift) / scale; trivial: the trivial predictor."""

    shift: float
    scale: float
    trivial: float

    @staticmethod
    def of(y_train: np.ndarray, kind: str) -> Targets:
        y = np.asarray(y_train, dtype=np.float64)
        if kind == "regression":
            sd = float(y.std())
            return Targets(float(y.mean()), sd if sd > 0 else 1.0, float(y.mean()))
        return Targets(0.5, 0.5, float(y.mean() >= 0.5))  # 0/1 -> -1/+1

    def z(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, dtype=np.float64) - self.shift) / self.scale

    def label_units(self, f: np.ndarray, kind: str) -> np.ndarray:
        """Regression outputs back in label units; classification outputs stay logit differences."""
        return f * self.scale + self.shift if kind == "regression" else f


class Data(NamedTuple):
    """Inputs X (n, ...) (packed ids for full/tangent, features for probe) and labels y (n,) in label units."""

    X: torch.Tensor
    y: np.ndarray


class FinetuneResult(NamedTuple):
    """theta: the best parameters (by name, detached); history: per-evaluation losses and metrics; best_step,
    stop_step, stopped (patience ran out); train/val/test: metrics at theta; seconds: wall time; targets."""

    theta: Params
    history: list[dict]
    best_step: int
    stop_step: int
    stopped: bool
    train: dict
    val: dict
    test: dict | None
    seconds: float
    targets: Targets


def trim(x: torch.Tensor) -> torch.Tensor:
    """Packed inputs (b, 2, T) cut to the batch's longest prompt (padding is on the right); other inputs as is."""
    if x.dim() != 3 or x.shape[1] != 2:
        return x
    return x[..., : max(1, int(x[:, 1].sum(1).max()))]


@torch.no_grad()
def predict(fn: Callable, theta: Params, X: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Outputs (n,) of fn(theta, X) in batches, as fp64 numpy."""
    device = next(iter(theta.values())).device
    out = [fn(theta, trim(X[i : i + batch].to(device))).double().cpu() for i in range(0, X.shape[0], batch)]
    return torch.cat(out).numpy()


def finetune(
    model: Packed,
    train: Data,
    val: Data,
    test: Data | None,
    kind: str,
    cfg: FinetuneConfig,
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tune the task model with hold-out early stopping (module docstring). The model's parameters are not
    trained (torch.func runs on copies); only a scalar head is re-drawn from cfg.seed before training.

    For method "probe" pass features (finetune.features) as the inputs X; otherwise packed ids (n, 2, T).
    """
    if len(train.y) != train.X.shape[0] or len(val.y) != val.X.shape[0]:
        raise FinetuneError("inputs and labels differ in length")
    head = model.model.head
    if head is not None:
        reset_head(model.model, cfg.seed)  # a fresh head per seed
    if cfg.method == "probe":
        fn, theta0 = probe_readout(model)
    else:
        frozen = cfg.freeze_head and head is not None
        if frozen:  # functional/linearize train only parameters with requires_grad; the head is then a constant
            head.requires_grad_(False)
        try:
            fn, theta0 = (functional if cfg.method == "full" else linearize)(model)
        finally:
            if frozen:
                head.requires_grad_(True)
    device = next(iter(theta0.values())).device
    dtype = next(iter(theta0.values())).dtype
    train, val = Data(train.X.to(device), train.y), Data(val.X.to(device), val.y)
    test = None if test is None else Data(test.X.to(device), test.y)
    tg = Targets.of(train.y, kind)
    z = torch.as_tensor(tg.z(train.y), dtype=dtype, device=device)
    theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    opt = torch.optim.Adam(theta.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = train.X.shape[0]
    g = torch.Generator().manual_seed(cfg.seed)
    order: list[torch.Tensor] = []
    log_idx = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))[: cfg.log_subset]
    best: dict[str, Params] = {}

    def step(t: int) -> None:
        if not order:
            perm = torch.randperm(n, generator=g)
            order.extend(perm[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size))
        idx = order.pop(0).to(device)
        pred = fn(theta, trim(train.X[idx]))
        loss = 0.5 * ((pred - z[idx]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def half_mse(f: np.ndarray, y: np.ndarray) -> float:
        return 0.5 * float(np.mean((f - tg.z(y)) ** 2))

    def evaluate(t: int) -> dict:
        th = {k: v.detach() for k, v in theta.items()}
        rec = {"train_loss": half_mse(predict(fn, th, train.X[log_idx.to(device)]), train.y[log_idx.numpy()])}
        f_val = predict(fn, th, val.X)
        rec["val_loss"] = half_mse(f_val, val.y)
        rec["val"] = metrics(tg.label_units(f_val, kind), val.y, kind, tg.trivial)
        if test is not None:
            f_test = predict(fn, th, test.X)
            rec["test_loss"] = half_mse(f_test, test.y)
            rec["test"] = metrics(tg.label_units(f_test, kind), test.y, kind, tg.trivial)
        return rec

    def on_best(t: int) -> None:
        best["theta"] = {k: v.detach().clone() for k, v in theta.items()}

    t0 = time.perf_counter()
    loop = holdout_loop(step, evaluate, max_steps=cfg.max_steps, eval_every=cfg.eval_every, patience=cfg.patience,
                        on_best=on_best)
    th = best["theta"]
    scores = {}
    for name, d in (("train", train), ("val", val), ("test", test)):
        if d is not None:
            scores[name] = metrics(tg.label_units(predict(fn, th, d.X), kind), d.y, kind, tg.trivial)
    return FinetuneResult(th, loop.history, loop.best_step, loop.stop_step, loop.stopped, scores["train"],
                          scores["val"], scores.get("test"), time.perf_counter() - t0, tg)
