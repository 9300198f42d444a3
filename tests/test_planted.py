"""Planted tasks (minintk.planted): the eigen-target lies in the span asked for, with the coefficients asked for,
and extends off the sample through the kernel; the lazy teacher is its own linearization to first order."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import jvp

from minintk.planted import PlantedError, eigen_target, lazy_teacher


def gram(N, P=40, seed=0):
    """A PSD Gram of rank min(N, P): random features with decaying scales."""
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((N, P)) * np.arange(1, P + 1) ** -1.0
    return F @ F.T


@given(N=st.integers(12, 40), m=st.integers(4, 12), k=st.integers(1, 4), s=st.floats(0.3, 3.0),
       seed=st.integers(0, 1000))
def test_eigen_target_span_coefficients_and_extension(N, m, k, s, seed):
    K = gram(N, seed=seed)
    rng = np.random.default_rng(seed)
    S = rng.choice(N, size=m, replace=False)
    p = eigen_target(K, S, k, s, sigma=0.0, scale=2.0, seed=seed)
    lam, U = np.linalg.eigh(K[np.ix_(S, S)])
    lam, U = lam[::-1], U[:, ::-1]
    coords = U.T @ p.f_star[S] / math.sqrt(m)  # coordinates of f* on S in the eigenbasis (L2 of the sample)
    np.testing.assert_allclose(coords[:k], p.coef, rtol=1e-6, atol=1e-9 * np.abs(p.coef).max())
    assert np.abs(coords[k:]).max(initial=0) <= 1e-6 * np.abs(p.coef).max(), "f* leaves the top-k span on S"
    np.testing.assert_allclose(np.abs(p.coef), 2.0 * np.arange(1, k + 1) ** -s, rtol=1e-12)
    np.testing.assert_allclose(p.f_star, K[:, S] @ p.weights, rtol=1e-12, atol=1e-12)  # one kernel expansion
    assert p.rkhs_norm == pytest.approx(math.sqrt(p.weights @ K[np.ix_(S, S)] @ p.weights), rel=1e-8)
    np.testing.assert_array_equal(p.y, p.f_star)


def test_noise_level_and_seed():
    K = gram(4000, P=30)
    S = np.arange(30)
    a, b = eigen_target(K, S, 5, 1.0, sigma=0.3, seed=7), eigen_target(K, S, 5, 1.0, sigma=0.3, seed=7)
    np.testing.assert_array_equal(a.y, b.y)
    assert np.std(a.y - a.f_star) == pytest.approx(0.3, rel=0.05)


@pytest.mark.parametrize("kw, match", [
    (dict(k=0), "k=0: expected 1 <= k <= m = 6"), (dict(smoothness=0.0), "smoothness=0.0"),
    (dict(sigma=-1.0), "sigma=-1.0"), (dict(sample=[0, 0, 1]), "distinct indices"),
    (dict(k=6, K=np.ones((10, 10))), "below the numerical rank"),
])  # fmt: skip
def test_bad_settings_are_named(kw, match):
    args = dict(K=gram(10), sample=list(range(6)), k=2, smoothness=1.0, sigma=0.1) | kw
    with pytest.raises(PlantedError, match=match):
        eigen_target(**args)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))[:, 0]


def test_lazy_teacher_is_its_linearization_to_first_order():
    torch.manual_seed(0)
    model = Net().double()
    X = torch.randn(20, 3, dtype=torch.float64)
    theta0 = {k: p.detach() for k, p in model.named_parameters()}

    def f(params):
        return torch.func.functional_call(model, params, (X,))

    gaps = []
    for scale in (1e-2, 1e-3):
        f_star, delta = lazy_teacher(model, X, scale, seed=3)
        norm0 = math.sqrt(sum(float((v**2).sum()) for v in theta0.values()))
        assert math.sqrt(sum(float((d**2).sum()) for d in delta.values())) == pytest.approx(scale * norm0)
        _, lin = jvp(f, (theta0,), (delta,))  # J(x) delta, the linearized model's target
        gaps.append(float((f_star - lin).norm() / lin.norm()))
    assert gaps[1] < gaps[0] / 5, f"second-order remainder should shrink with the scale: {gaps}"
    assert all(p.grad is None for p in model.parameters())


def test_lazy_teacher_refuses_a_frozen_model():
    model = Net()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(PlantedError, match="no parameter with requires_grad"):
        lazy_teacher(model, torch.randn(2, 3), 0.1)
