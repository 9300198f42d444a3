"""Task vectors on parameter dicts (docs/theory.md section 7; Ilharco et al. 2023; Ortiz-Jimenez et al. 2023).

    tau_k = theta_k - theta_pre                              (the task vector of task k)
    addition:  theta_pre + sum_k lambda_k tau_k              (lambda chosen on validation)
    negation:  theta_pre - lambda tau_k                      (forget task k)
    cos(tau_i, tau_j) = <tau_i, tau_j> / (||tau_i|| ||tau_j||), over all shared parameters flattened
    xi(a1, a2) = sum_k E_{x ~ D_k} dist(f(x; theta_pre + a_k tau_k), f(x; theta_pre + a1 tau_1 + a2 tau_2))

Parameters are dicts name -> tensor; a task vector holds the names it is given (task-specific heads are left out by
passing `keys`). Arithmetic runs in fp64 and returns the parameters' own dtype. Nothing here knows the model: f is
any function f(params, X) -> (n,) outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

Params = dict[str, torch.Tensor]


class TaskVectorError(ValueError):
    """Parameter dicts, coefficients or grids that task arithmetic cannot use."""


def task_vector(finetuned: Params, pretrained: Params, keys: Iterable[str] | None = None) -> Params:
    """tau = finetuned - pretrained over `keys` (default: the names both hold)."""
    keys = sorted(set(finetuned) & set(pretrained)) if keys is None else list(keys)
    missing = [k for k in keys if k not in finetuned or k not in pretrained]
    if missing:
        raise TaskVectorError(f"parameters {missing[:8]} are missing from the fine-tuned or the pretrained dict")
    tau = {}
    for k in keys:
        if finetuned[k].shape != pretrained[k].shape:
            raise TaskVectorError(f"{k}: fine-tuned shape {tuple(finetuned[k].shape)} differs from the pretrained "
                                  f"{tuple(pretrained[k].shape)}")
        tau[k] = (finetuned[k].double() - pretrained[k].double()).to(pretrained[k].dtype)
    return tau


def combine(pretrained: Params, vectors: Sequence[Params], coefs: Sequence[float]) -> Params:
    """theta_pre + sum_k coefs[k] vectors[k]; names outside every vector keep the pretrained value."""
    if len(vectors) != len(coefs):
        raise TaskVectorError(f"{len(vectors)} task vectors but {len(coefs)} coefficients")
    out = {}
    for k, v in pretrained.items():
        acc = v.double()
        for tau, c in zip(vectors, coefs):
            if k in tau:
                acc = acc + float(c) * tau[k].double()
        out[k] = acc.to(v.dtype)
    unknown = sorted({k for tau in vectors for k in tau} - set(pretrained))
    if unknown:
        raise TaskVectorError(f"task vectors hold parameters the pretrained dict lacks: {unknown[:8]}")
    return out


def add(pretrained: Params, vectors: Sequence[Params], lam: float | Sequence[float]) -> Params:
    """Task addition: theta_pre + lambda sum_k tau_k (one lambda), or with one lambda_k per vector."""
    coefs = [float(lam)] * len(vectors) if np.isscalar(lam) else list(lam)
    return combine(pretrained, vectors, coefs)


def negate(pretrained: Params, tau: Params, lam: float = 1.0) -> Params:
    """Task negation: theta_pre - lambda tau."""
    return combine(pretrained, [tau], [-float(lam)])


def norm(tau: Params) -> float:
    """||tau||_2 over all its entries (fp64)."""
    return float(sum(float((v.double() ** 2).sum()) for v in tau.values())) ** 0.5


def cosine_matrix(vectors: Sequence[Params]) -> np.ndarray:
    """(K, K) fp64 cosine similarities of K task vectors over the names they share (all of them, by default)."""
    if not vectors:
        raise TaskVectorError("need at least one task vector")
    keys = sorted(set.intersection(*(set(v) for v in vectors)))
    if not keys:
        raise TaskVectorError("the task vectors share no parameter")
    flat = torch.stack([torch.cat([v[k].double().reshape(-1) for k in keys]) for v in vectors])
    gram = (flat @ flat.T).cpu().numpy()
    d = np.sqrt(np.diag(gram))
    with np.errstate(invalid="ignore", divide="ignore"):
        return gram / np.outer(d, d)


def choose_coef(score: Callable[[float], float], grid: Sequence[float]) -> tuple[float, list[float]]:
    """The coefficient of `grid` with the highest score(lambda) (a validation score; first on ties), and all scores."""
    if len(grid) == 0:
        raise TaskVectorError("the coefficient grid is empty")
    scores = [float(score(float(lam))) for lam in grid]
    if not np.isfinite(scores).any():
        raise TaskVectorError("every coefficient of the grid scored NaN")
    return float(grid[int(np.nanargmax(scores))]), scores


def squared(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample squared distance ||a_i - b_i||^2 of outputs (n,) or (n, C)."""
    d = (a - b).double()
    return (d**2).reshape(d.shape[0], -1).sum(1)


def disagreement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample 0/1 disagreement of predicted classes: sign for (n,) outputs, argmax for (n, C)."""
    if a.dim() == 1:
        return ((a > 0) != (b > 0)).double()
    return (a.argmax(-1) != b.argmax(-1)).double()


def disentanglement_error(
    f: Callable[[Params, torch.Tensor], torch.Tensor] | tuple[Callable, Callable],
    pretrained: Params,
    vectors: tuple[Params, Params],
    alphas: tuple[float, float],
    inputs: tuple[torch.Tensor, torch.Tensor],
    dist: Callable | tuple[Callable, Callable] = squared,
) -> float:
    """Weight disentanglement error xi(a1, a2) (Ortiz-Jimenez et al. 2023, eq. 3; docs/theory.md section 7).

    f(params, X) -> outputs (one function, or one per task, e.g. with the task's own head); inputs[k]: samples of
    task k's inputs (the expectation is their mean); dist: per-sample distance (one, or one per task). Zero when each
    task's outputs depend only on its own vector's parameters.
    """
    if len(vectors) != 2 or len(alphas) != 2 or len(inputs) != 2:
        raise TaskVectorError("xi is defined for two tasks: two vectors, two coefficients, two input sets")
    dists = dist if isinstance(dist, tuple) else (dist, dist)
    fs = f if isinstance(f, tuple) else (f, f)
    both = combine(pretrained, list(vectors), list(alphas))
    total = 0.0
    with torch.no_grad():
        for k in range(2):
            alone = combine(pretrained, [vectors[k]], [alphas[k]])
            total += float(dists[k](fs[k](alone, inputs[k]), fs[k](both, inputs[k])).mean())
    return total
