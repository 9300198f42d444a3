"""The linearized model of a torch network, trained side by side with the network itself (docs/theory.md section 3).

    f_lin(x; theta) = f(x; theta_0) + J(x; theta_0) (theta - theta_0)            (Lee et al. 2019; Lemma 1)

is evaluated with one forward-mode product, torch.func.jvp of the functional model (functional_call) at
theta_0 along theta - theta_0; J is never formed. Both models are trained in parameter space on
L = (1/2b) sum_i ||f(x_i) - y_i||^2 over a batch of b samples (the loss of docs/theory.md section 3, so that full-batch
gradient descent with step alpha moves the linearized outputs exactly as u_{t+1} = u_t - (alpha/n) K (u_t - y)
with K = J J^T, the empirical NTK), with the same torch optimizer, the same batches and the same start, and
every step is recorded: train and test predictions, losses, and how far the weights moved. With C outputs per
sample the flattened outputs u (nC,) move as u - (alpha/n) K (u - y) with K (nC, nC) and n still the number of
samples: dynamics.gradient_descent_mse(K, y, alpha) with the full K (n, n, C, C) of ntk and y (n, C)
reproduces the linearized run (docs/theory.md section 3.4).

The trained parameters are the model's parameters with requires_grad (freeze others the torch way); buffers
and frozen parameters stay constants. The model itself is never modified.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

Params = dict[str, torch.Tensor]
ModelFn = Callable[[Params, torch.Tensor], torch.Tensor]
OPTIMIZERS = ("sgd", "adam")


class LinearizeError(ValueError):
    """A model, data or optimizer setting that linearized / full training cannot use."""


class Trajectory(NamedTuple):
    """One training run, row t after t optimizer steps (t = 0..steps).

    train_pred (steps+1, n[, C]) and train_loss (steps+1,) on the whole training set; test_pred (steps+1, m[, C])
    and test_loss (steps+1,) when test data were given, else None. Losses are (1/2n) sum_i ||f(x_i) - y_i||^2.
    weight_dist (steps+1,): ||theta_t - theta_0||_2 over all trained parameters; theta0_norm: ||theta_0||_2;
    params: theta after the last step (detached copies, by parameter name).
    """

    train_pred: torch.Tensor
    train_loss: torch.Tensor
    test_pred: torch.Tensor | None
    test_loss: torch.Tensor | None
    weight_dist: torch.Tensor
    theta0_norm: float
    params: Params


class Comparison(NamedTuple):
    """Network vs linearized model trained identically. train_gap, test_gap (steps+1,):
    sqrt((1/n) sum_i ||f_net,t(x_i) - f_lin,t(x_i)||^2), the RMS distance of their predictions (test_gap None
    without test inputs)."""

    net: Trajectory
    lin: Trajectory
    train_gap: torch.Tensor
    test_gap: torch.Tensor | None


def _as_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    raise LinearizeError(
        f"the model returned {type(out).__name__}, not a tensor; pass output=..., a function of the model's "
        f"output that returns the (n,) or (n, C) predictions"
    )


def functional(model: nn.Module, output: Callable | None = None) -> tuple[ModelFn, Params]:
    """The model as a function of its trained parameters: f(theta, x) -> (b,) or (b, C), and theta_0.

    theta_0 holds detached copies of the parameters with requires_grad (tied parameters once, by their first
    name); everything else (frozen parameters, buffers) is read from the model at call time.
    """
    theta0 = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    if not theta0:
        raise LinearizeError("the model has no parameter with requires_grad=True: nothing to train")

    def f(theta: Params, x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, theta, (x,), strict=False)
        return _as_tensor(out if output is None else output(out))

    return f, theta0


def linearize(model: nn.Module, output: Callable | None = None) -> tuple[ModelFn, Params]:
    """f_lin(theta, x) = f(x; theta_0) + J(x; theta_0)(theta - theta_0) by torch.func.jvp, and theta_0.

    x: (b, ...) inputs of the model; theta: a dict like theta_0 -> (b,) or (b, C). Costs about one forward and
    one forward-mode pass of the model per call; differentiable in theta (torch.func.grad or autograd).
    """
    f, theta0 = functional(model, output)

    def f_lin(theta: Params, x: torch.Tensor) -> torch.Tensor:
        tangent = {k: theta[k] - theta0[k] for k in theta0}
        with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no forward-mode derivative
            out0, dout = jvp(lambda th: f(th, x), (theta0,), (tangent,))
        return out0 + dout

    return f_lin, theta0


def _half_mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(1/2b) sum_i ||pred_i - y_i||^2 for pred, y of shape (b,) or (b, C)."""
    return 0.5 * ((pred - y) ** 2).sum() / pred.shape[0]


def _make_optimizer(optimizer: str | Callable, leaves: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if callable(optimizer):
        return optimizer(leaves)
    if optimizer == "sgd":
        return torch.optim.SGD(leaves, lr=lr)
    if optimizer == "adam":
        return torch.optim.Adam(leaves, lr=lr)
    raise LinearizeError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)} or a factory")


def _check_data(X: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if not isinstance(X, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise LinearizeError(f"{name} inputs and targets must be tensors, got {type(X).__name__}, {type(y).__name__}")
    if X.dim() == 0 or y.dim() not in (1, 2) or X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise LinearizeError(
            f"{name} targets must be (n,) or (n, C) with the inputs' n >= 1; got inputs {tuple(X.shape)}, "
            f"targets {tuple(y.shape)}"
        )
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise LinearizeError(f"{name} targets contain non-finite values")


def _batches(n: int, batch_size: int | None, steps: int, seed: int) -> list[torch.Tensor | None]:
    """Index batches for each step: None (the full set) for batch_size None, else shuffled epochs."""
    if batch_size is None or batch_size >= n:
        return [None] * steps
    if int(batch_size) != batch_size or batch_size < 1:
        raise LinearizeError(f"batch_size must be a positive integer or None (full batch), got {batch_size!r}")
    g = torch.Generator().manual_seed(int(seed))
    out: list[torch.Tensor | None] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
    return out[:steps]


def train(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    linear: bool = False,
    optimizer: str | Callable = "sgd",
    lr: float = 1e-2,
    steps: int = 100,
    batch_size: int | None = None,
    X_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    seed: int = 0,
    output: Callable | None = None,
) -> Trajectory:
    """Train the network (linear=False) or its linearization at the current parameters (linear=True).

    X: (n, ...) inputs; y: (n,) or (n, C) targets in the model's dtype; X_test (m, ...), y_test (m[, C]) optional.
    optimizer: "sgd" (plain, no momentum; with batch_size None it is full-batch gradient descent, step lr),
    "adam", or a factory params -> torch.optim.Optimizer. Minibatches are shuffled epochs drawn from `seed`,
    so two runs with the same seed see the same batches. Returns the Trajectory of every step.
    """
    if int(steps) != steps or steps < 0:
        raise LinearizeError(f"steps must be an integer >= 0, got {steps!r}")
    if not callable(optimizer) and not (lr > 0 and math.isfinite(lr)):
        raise LinearizeError(f"lr must be a positive finite number, got {lr!r}")
    _check_data(X, y, "train")
    if y_test is not None and X_test is None:
        raise LinearizeError("y_test was given without X_test")
    if X_test is not None and y_test is not None:
        _check_data(X_test, y_test, "test")
    fn, theta0 = (linearize if linear else functional)(model, output)
    n = X.shape[0]
    batches = _batches(n, batch_size, int(steps), seed)

    theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    opt = _make_optimizer(optimizer, list(theta.values()), lr)

    def loss(th: Params, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred = fn(th, xb)
        return _half_mse(pred, yb), pred

    grad_fn = grad_and_value(loss, has_aux=True)

    def evaluate(xs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return fn({k: v.detach() for k, v in theta.items()}, xs).detach()

    def dist() -> float:
        with torch.no_grad():
            return math.sqrt(sum(float(((theta[k] - theta0[k]) ** 2).sum()) for k in theta0))

    train_pred, test_pred, wdist = [], [], []
    for idx in batches:
        xb, yb = (X, y) if idx is None else (X[idx], y[idx])
        grads, (_, pred) = grad_fn({k: v.detach() for k, v in theta.items()}, xb, yb)
        train_pred.append(pred.detach() if idx is None else evaluate(X))
        if X_test is not None:
            test_pred.append(evaluate(X_test))
        wdist.append(dist())
        for k, p in theta.items():
            p.grad = grads[k].detach()
        opt.step()
    train_pred.append(evaluate(X))
    if X_test is not None:
        test_pred.append(evaluate(X_test))
    wdist.append(dist())

    tp = torch.stack(train_pred)
    te = torch.stack(test_pred) if X_test is not None else None
    return Trajectory(
        train_pred=tp,
        train_loss=0.5 * _sq_err(tp, y).mean(1),
        test_pred=te,
        test_loss=None if te is None or y_test is None else 0.5 * _sq_err(te, y_test).mean(1),
        weight_dist=torch.tensor(wdist, dtype=torch.float64),
        theta0_norm=math.sqrt(sum(float((v.double() ** 2).sum()) for v in theta0.values())),
        params={k: v.detach().clone() for k, v in theta.items()},
    )


def _sq_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_t,i - b_i||^2 per step and sample: a (T+1, n[, C]), b broadcastable -> (T+1, n)."""
    d = a - b
    return (d**2).reshape(d.shape[0], d.shape[1], -1).sum(-1)


def _rms_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _sq_err(a, b).mean(1).sqrt()


def compare(model: nn.Module, X: torch.Tensor, y: torch.Tensor, **options) -> Comparison:
    """Train the network and its linearization with identical settings (train's options) and compare them
    step by step. Returns Comparison(net, lin, train_gap (steps+1,), test_gap (steps+1,) or None)."""
    net = train(model, X, y, linear=False, **options)
    lin = train(model, X, y, linear=True, **options)
    test_gap = None if net.test_pred is None else _rms_gap(net.test_pred, lin.test_pred)
    return Comparison(net, lin, _rms_gap(net.train_pred, lin.train_pred), test_gap)
