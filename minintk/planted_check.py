"""The theory's predictions against measurements, on planted tasks over a model's own eNTK (docs/theory.md
sections 4, 5 and 8).

For a model at theta_0 and a pool of inputs, the eNTK Gram K over the pool is computed once (exactly). Each
planted task (planted.eigen_target: smoothness s, noise sigma, known RKHS norm B) is learned from n training
inputs by full-batch gradient descent on (1/2n)||f - y||^2 with the step alpha = min(1, 1/mu_1):

- the linearized model, in closed form (dynamics.gradient_descent_mse): its in-sample and test error at every
  step on a geometric grid of times, so its oracle stopping times are exact up to the grid;
- the network itself (linearize.train, optimizer "sgd" on the whole batch), optional, for a capped number of
  steps: the theorems' algorithm on the model they approximate.

Predictions, from the spectrum mu of K_train / n alone: the Raskutti-Wainwright-Yu stopping time T_hat
(stopping.stopping_time with sigma and B), its error bound 12 B^2 eps_n^2 (stopping.error_bound) and the
rate n^(-beta / (beta + 1)) from the fitted eigen-decay beta (spectrum.fit_power_law).
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .planted import PlantedError, eigen_target


@dataclass(frozen=True)
class CheckConfig:
    """sizes: training sizes n; n_test: held-out inputs; sample: m, the inputs whose eigenvectors define the
    targets; k: eigenfunctions per target; smoothness: the decay exponents s of the planted coefficients, one
    task each; noise: sigma as a fraction of the rms of f* over the pool; seeds: draws of signs, noise and
    training sets per task; network: also train the network by gradient descent up to the rule's T_hat (at
    most net_steps steps), at the sizes net_sizes (None: all) and for the first net_seeds seeds; grid: times
    on the closed-form curves."""

    sizes: tuple[int, ...] = (25, 50, 100, 200)
    n_test: int = 200
    sample: int = 200
    k: int = 10
    smoothness: tuple[float, ...] = (0.75, 1.5, 3.0)
    noise: float = 0.3
    seeds: int = 3
    network: bool = True
    net_steps: int = 1000
    net_sizes: tuple[int, ...] | None = None
    net_seeds: int = 1
    grid: int = 240

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 2 or self.seeds < 1 or self.n_test < 1:
            raise PlantedError(f"need sizes >= 2, seeds >= 1 and n_test >= 1; got sizes={self.sizes}, "
                               f"seeds={self.seeds}, n_test={self.n_test}")
        if not 1 <= self.k <= self.sample:
            raise PlantedError(f"k={self.k}: expected 1 <= k <= sample = {self.sample}")
        if not (self.noise > 0 and math.isfinite(self.noise)):
            raise PlantedError(f"noise={self.noise}: expected a finite number > 0 (the rule needs sigma > 0)")

    @property
    def pool(self) -> int:
        """Inputs needed: the sample, the largest training set and the test set, disjoint."""
        return self.sample + max(self.sizes) + self.n_test


def run_check(model: nn.Module, X: torch.Tensor, cfg: CheckConfig, *, K: torch.Tensor | None = None,
              progress: bool = True) -> dict:
    """Every (task, seed, n) run as a dict row, and the Gram's summary. model: scalar output per sample (its
    float64 copy is used; the model is not modified); X: (N, ...) inputs with N >= cfg.pool, the first cfg.pool
    used (sample, then training pool, then test). K: the model's fp64 eNTK Gram over X[:cfg.pool] when the
    engine cannot read X as it is (e.g. ids and mask packed in one tensor: paper_planted); computed here with
    minintk.ntk otherwise. Raises PlantedError when X is too small or K has the wrong shape."""
    from .engine import ntk

    N = cfg.pool
    if X.shape[0] < N:
        raise PlantedError(f"the pool needs {N} inputs (sample {cfg.sample} + largest n {max(cfg.sizes)} + test "
                           f"{cfg.n_test}), got {X.shape[0]}")
    model = _float64_copy(model)
    X = X[:N].to(next(model.parameters()).device)
    X = X.double() if X.is_floating_point() else X  # floating inputs follow the model to float64
    if K is None:
        K = ntk(model, X, precision="fp64", progress=progress)
    elif tuple(K.shape) != (N, N):
        raise PlantedError(f"K must be the ({N}, {N}) Gram over the pool, got shape {tuple(K.shape)}")
    K = K.detach().double().cpu().numpy()
    with torch.no_grad():
        f0 = model(X).double().reshape(-1).cpu().numpy()
    sample = np.arange(cfg.sample)
    test = np.arange(N - cfg.n_test, N)
    rows = []
    jobs = [(s, seed) for s in cfg.smoothness for seed in range(cfg.seeds)]
    for j, (s, seed) in enumerate(jobs):
        task = _task(K, sample, cfg, s, seed)
        order = cfg.sample + np.random.default_rng(10_000 + seed).permutation(max(cfg.sizes))
        for n in sorted(cfg.sizes):
            row = _one(K, task, order[:n], test, cfg, n)
            if cfg.network and seed < cfg.net_seeds and (cfg.net_sizes is None or n in cfg.net_sizes):
                row.update(_network(model, X, f0, task, order[:n], test, row, cfg))
            rows.append(dict(smoothness=s, seed=seed, n=n, **row))
        if progress:
            print(f"  planted task s={s}, seed {seed}: done ({j + 1}/{len(jobs)})", file=sys.stderr, flush=True)
    return {"config": asdict(cfg), "rows": rows, "gram": {"n": N, "trace": float(np.trace(K))}}


def _float64_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double().eval()


def _task(K: np.ndarray, sample: np.ndarray, cfg: CheckConfig, s: float, seed: int):
    clean = eigen_target(K, sample, cfg.k, s, sigma=0.0, seed=seed)
    sigma = cfg.noise * float(np.sqrt(np.mean(clean.f_star**2)))
    return eigen_target(K, sample, cfg.k, s, sigma=sigma, seed=seed)


def _one(K: np.ndarray, task, train: np.ndarray, test: np.ndarray, cfg: CheckConfig, n: int) -> dict:
    """Predictions and the linearized model's measured errors for one training set."""
    from .dynamics import gradient_descent_mse
    from .spectrum import SpectrumError, eigenvalues, fit_power_law
    from .stopping import critical_radius, default_step, error_bound, stopping_time

    Ktr, Kte = K[np.ix_(train, train)], K[np.ix_(test, train)]
    spec = eigenvalues(Ktr)
    mu = spec.mu
    alpha = default_step(mu)
    B, sigma = task.rkhs_norm, task.sigma
    with warnings.catch_warnings(record=True) as caught:  # kept in the row, not printed once per run
        warnings.simplefilter("always")
        t_hat = stopping_time(mu, sigma, alpha, B=B)
    top = mu[min(cfg.k, n) - 1]
    t_max = max(10 * t_hat, math.ceil(50 / (alpha * max(top, mu[0] * 1e-12))))
    times = np.unique(np.concatenate([[0, t_hat], np.round(np.geomspace(1, min(t_max, 1e9), cfg.grid))]))
    predict = gradient_descent_mse(Ktr, task.y[train], alpha)
    u, f = predict(times, K_test=Kte)
    err_in = np.mean((u - task.f_star[train]) ** 2, axis=1)
    err_te = np.mean((f - task.f_star[test]) ** 2, axis=1)
    at = int(np.searchsorted(times, t_hat))
    try:  # the decay above the numerical floor, top eigenvalue dropped
        fit = fit_power_law(mu, floor=spec.floor, drop_top=1)
    except SpectrumError:  # too few eigenvalues above the floor to fit
        fit = None
    return dict(
        sigma=sigma, B=B, alpha=alpha, mu1=float(mu[0]), t_hat=int(t_hat),
        eps2=critical_radius(mu, sigma, B=B) ** 2, bound=error_bound(mu, sigma, B=B),
        beta=None if fit is None else fit.beta,
        lin_in_at_t_hat=float(err_in[at]), lin_test_at_t_hat=float(err_te[at]),
        lin_oracle_in_t=int(times[np.argmin(err_in)]), lin_oracle_in=float(err_in.min()),
        lin_oracle_test_t=int(times[np.argmin(err_te)]), lin_oracle_test=float(err_te.min()),
        null_test=float(np.mean(task.f_star[test] ** 2)),
        rule_warning=str(caught[0].message) if caught else None,
    )


def _network(model: nn.Module, X: torch.Tensor, f0: np.ndarray, task, train: np.ndarray, test: np.ndarray,
             row: dict, cfg: CheckConfig) -> dict:
    """The network trained by full-batch gradient descent with the same step, up to twice the later of T_hat and
    the linearized model's oracle time (at most net_steps): its test and in-sample errors at T_hat, and its own
    oracle stopping time and test error over the steps run, beside the linearized model's in the row."""
    from .linearize import train as train_model

    steps = int(min(cfg.net_steps, 2 * max(row["t_hat"], row["lin_oracle_test_t"], 1)))
    y = torch.from_numpy(f0[train] + task.y[train]).to(X.device)
    y_test = torch.from_numpy(f0[test] + task.f_star[test]).to(X.device)
    tr = train_model(model, X[train], y, optimizer="sgd", lr=row["alpha"], steps=steps, X_test=X[test],
                     y_test=y_test)
    err_te = (2 * tr.test_loss).cpu().numpy()  # test_loss is (1/2) mean squared error against the noiseless target
    err_in = ((tr.train_pred.cpu().numpy() - (f0[train] + task.f_star[train])) ** 2).mean(1)
    reached = row["t_hat"] <= steps
    return dict(net_steps=steps, net_test_at_t_hat=float(err_te[row["t_hat"]]) if reached else None,
                net_in_at_t_hat=float(err_in[row["t_hat"]]) if reached else None,
                net_oracle_test_t=int(np.argmin(err_te)), net_oracle_test=float(err_te.min()))
