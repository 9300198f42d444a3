"""Does fine-tuning behave like its kernel? (issue 23; docs/theory.md sections 2.7 and 3; Malladi et al. 2023)

For a task model at theta_0 with a scalar output f (the label-word logit difference) and classes coded y = +-1,
on n training and m test inputs, per seed:

- the network fine-tuned by full-batch gradient descent (step alpha = min(1, 1/mu_1(K/n)), the theorems'
  algorithm) for `steps` steps, and its kernel predictor at the same step: the eNTK's gradient-descent dynamics
  (dynamics.gradient_descent_mse), which the linearized network follows exactly;
- the network fine-tuned by Adam (full batch, `adam_lr`), and the kernel predictors an Adam-like kernel gives: kernel
  regression with the SignGD kernel S (asymmetric: f = f_0 + S(x, X) (S + n lam I)^-1 (y - u_0)) beside the same
  with the eNTK;
- kernel classifiers on the eNTK (SVM and logistic regression, kernel_classifiers) for reference.

Agreement: the Pearson correlation of the test predictions' moves f_T - f_0 between the network and a kernel
predictor, and their test accuracies side by side. Nothing here is a bound: it measures how far the kernel view
describes the fine-tuning that ran.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn


class AgreementError(ValueError):
    """A setting of the agreement run that cannot work; the message names it and what is accepted."""


@dataclass(frozen=True)
class AgreeConfig:
    """n_train, n_test: inputs per seed (drawn from the pools); steps: optimizer steps of both fine-tunings;
    adam_lr: Adam's learning rate; ridge: lam of the kernel regressions (the loss's normalization, as
    dynamics.kernel_ridge); svm_C, logistic_C: the classifiers' C; seeds: draws of the training set."""

    n_train: int = 64
    n_test: int = 100
    steps: int = 200
    adam_lr: float = 1e-4
    ridge: float = 1e-3
    svm_C: float = 1.0
    logistic_C: float = 1.0
    seeds: int = 3

    def __post_init__(self) -> None:
        for name, low in (("n_train", 4), ("n_test", 1), ("steps", 1), ("seeds", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < low:
                raise AgreementError(f"{name}={v!r}: expected an integer >= {low}")
        for name in ("adam_lr", "svm_C", "logistic_C"):
            if not getattr(self, name) > 0:
                raise AgreementError(f"{name}={getattr(self, name)!r}: expected a number > 0")
        if not self.ridge >= 0:
            raise AgreementError(f"ridge={self.ridge!r}: expected a number >= 0")


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = a - a.mean(), b - b.mean()
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return None if den == 0 else float(a @ b / den)


def accuracy(f: np.ndarray, y: np.ndarray) -> float:
    """Share of signs of f that match y = +-1."""
    return float(np.mean(np.sign(f) == y))


def run_one(model: nn.Module, gram: Callable, Xtr: torch.Tensor, ytr: np.ndarray, Xte: torch.Tensor,
            yte: np.ndarray, cfg: AgreeConfig, seed: int) -> dict:
    """One seed's row. model: scalar output per input (fp64); gram(A, B, kernel) -> the kernel between inputs A
    and B (B None: A with itself) as an fp64 numpy array; y = +-1."""
    from .dynamics import gradient_descent_mse, kernel_ridge
    from .kernel_classifiers import kernel_logistic, kernel_svm
    from .linearize import train
    from .spectrum import eigenvalues
    from .stopping import default_step

    n = len(ytr)
    K, Kx = gram(Xtr, None, "sgd"), gram(Xte, Xtr, "sgd")
    S, Sx = gram(Xtr, None, "signgd"), gram(Xte, Xtr, "signgd")
    with torch.no_grad():
        f0tr, f0te = model(Xtr).double().cpu().numpy(), model(Xte).double().cpu().numpy()
    alpha = default_step(eigenvalues(K).mu)
    y = torch.from_numpy(ytr).to(Xtr.device, torch.float64)
    yt = torch.from_numpy(yte).to(Xtr.device, torch.float64)
    sgd = train(model, Xtr, y, optimizer="sgd", lr=alpha, steps=cfg.steps, X_test=Xte, y_test=yt, seed=seed)
    ad = train(model, Xtr, y, optimizer="adam", lr=cfg.adam_lr, steps=cfg.steps, X_test=Xte, y_test=yt, seed=seed)
    net_sgd = sgd.test_pred[-1].double().cpu().numpy()
    net_adam = ad.test_pred[-1].double().cpu().numpy()
    _, kern_gd = gradient_descent_mse(K, ytr - f0tr, alpha)(np.array([cfg.steps]), K_test=Kx)
    kern_gd = f0te + kern_gd[0]
    _, ridge = kernel_ridge(K, ytr, cfg.ridge, u0=f0tr, K_test=Kx, f0_test=f0te)
    sign_ridge = f0te + Sx @ np.linalg.solve(S + n * cfg.ridge * np.eye(n), ytr - f0tr)
    cls = 0.5 * (ytr + 1)
    svm = kernel_svm(K, cls, C=cfg.svm_C).decision_function(Kx)
    logistic = kernel_logistic(K, cls, C=cfg.logistic_C).decision_function(Kx)
    return dict(
        seed=seed, n=n, alpha=alpha, steps=cfg.steps,
        acc=dict(sgd_net=accuracy(net_sgd, yte), sgd_kernel=accuracy(kern_gd, yte), adam_net=accuracy(net_adam, yte),
                 entk_ridge=accuracy(np.asarray(ridge).reshape(-1), yte), signgd_ridge=accuracy(sign_ridge, yte),
                 entk_svm=accuracy(svm, yte), entk_logistic=accuracy(logistic, yte), init=accuracy(f0te, yte)),
        corr=dict(sgd_net_vs_kernel=pearson(net_sgd - f0te, kern_gd - f0te),
                  adam_net_vs_signgd_ridge=pearson(net_adam - f0te, sign_ridge - f0te),
                  adam_net_vs_entk_ridge=pearson(net_adam - f0te, np.asarray(ridge).reshape(-1) - f0te)),
        sgd_rms_gap=float(np.sqrt(np.mean((net_sgd - kern_gd) ** 2))),
        asymmetry=float(np.linalg.norm(S - S.T) / np.linalg.norm(S)),
    )


def summarize(rows: list[dict]) -> dict:
    """Per task: mean and sd over seeds of each accuracy and correlation."""
    out = {}
    for task in sorted({r["task"] for r in rows}):
        rs = [r for r in rows if r["task"] == task]
        stat = {}
        for group in ("acc", "corr"):
            for k in rs[0][group]:
                vals = [r[group][k] for r in rs if r[group][k] is not None]
                stat[f"{group}.{k}"] = (float(np.mean(vals)), float(np.std(vals))) if vals else (math.nan, math.nan)
        out[task] = stat
    return out


def markdown(rows: list[dict], summary: dict, cfg: AgreeConfig, setup: str) -> str:
    """The report: setup, the agreement table, the accuracies, and what it says."""
    def ms(t, k):
        m, s = summary[t][k]
        return "n/a" if math.isnan(m) else f"{m:.3f}" + (f" ± {s:.3f}" if cfg.seeds > 1 else "")

    lines = ["# Does fine-tuning behave like its kernel?", "", setup, "",
             f"Settings: {asdict(cfg)}. " + (f"Mean ± sd over {cfg.seeds} seeds (training sets). " if cfg.seeds > 1
                                              else "One seed (no spread). ")
             + "Correlations are Pearson correlations of the test predictions' moves f_T - f_0. Kernel regression "
             "with a kernel M (eNTK K or SignGD S): f = f_0 + M(x, X) (M + n ridge I)^-1 (y - u_0), the system solved "
             "as it is for the asymmetric S (docs/theory.md section 3.6).", "",
             "## Agreement of predictions", "",
             "| task | GD network vs eNTK GD predictor (same step) | Adam network vs SignGD-kernel regression | "
             "Adam network vs eNTK regression |", "|---|---|---|---|"]
    for t in summary:
        lines.append(f"| {t} | {ms(t, 'corr.sgd_net_vs_kernel')} | {ms(t, 'corr.adam_net_vs_signgd_ridge')} | "
                     f"{ms(t, 'corr.adam_net_vs_entk_ridge')} |")
    keys = ["init", "sgd_net", "sgd_kernel", "adam_net", "signgd_ridge", "entk_ridge", "entk_svm", "entk_logistic"]
    lines += ["", "## Test accuracy", "", "| task | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for t in summary:
        lines.append(f"| {t} | " + " | ".join(ms(t, f"acc.{k}") for k in keys) + " |")
    moved = [t for t in summary if summary[t]["acc.sgd_net"][0] == summary[t]["acc.init"][0]
             and summary[t]["acc.adam_net"][0] == summary[t]["acc.init"][0]]
    lines += ["", "init: the model at theta_0; sgd_net / adam_net: the network after the steps (step alpha = "
              "min(1, 1/mu_1(K/n)) for gradient descent); sgd_kernel: the eNTK's gradient-descent predictor at the "
              "same step; *_ridge: kernel regression (ridge above); entk_svm, entk_logistic: scikit-learn on the eNTK. "
              "results.json also holds per seed alpha, the RMS gap between the GD network and its kernel predictor "
              "(sgd_rms_gap) and ||S - S^T|| / ||S|| (asymmetry)."]
    if moved:
        lines += ["", f"On {moved} neither fine-tuning changed the test accuracy from theta_0's: too few steps (or "
                  "too small a step) for the correlations to describe much."]
    lines += ["", "![agreement](agreement.png)", ""]
    return "\n".join(lines)


def plot(summary: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["init", "sgd_net", "sgd_kernel", "adam_net", "signgd_ridge", "entk_ridge", "entk_svm", "entk_logistic"]
    tasks = list(summary)
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(tasks), 3.6))
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        m = [summary[t][f"acc.{k}"][0] for t in tasks]
        s = [summary[t][f"acc.{k}"][1] for t in tasks]
        ax.bar(np.arange(len(tasks)) + i * width, m, width, yerr=s, label=k)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
    ax.set(ylabel="test accuracy", ylim=(0, 1), title="fine-tuning and its kernels")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
