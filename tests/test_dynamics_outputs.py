"""Kernel dynamics with several outputs, a ridge term and t = inf: one convention with the network's own loss
(1/2n) sum_i ||f(x_i) - y_i||^2, checked against the iterations that define them and against the linearized
network trained by gradient descent."""

import numpy as np
import pytest
import torch
from scipy.linalg import expm
from torch import nn

from minintk.dynamics import (
    gradient_descent_mse,
    gradient_descent_reference,
    gradient_flow_mse,
    kernel_ridge,
    max_stable_step,
)
from minintk.engine import ntk
from minintk.linearize import train


def psd(n: int, seed: int, rank: int | None = None) -> np.ndarray:
    A = np.random.default_rng(seed).standard_normal((n, rank or n))
    return A @ A.T


def test_the_traced_kernel_moves_each_output_as_one_true_step_does():
    """n = 1, C = 2, Theta = I, y = (1, 1), u_0 = 0, alpha = 0.5: one step of the loss gives 0.5 per output; the
    mean over outputs (trace=True) is the kernel that reproduces it, and so is the full (n, n, C, C) kernel."""
    theta = np.eye(2)
    traced = np.array([[np.trace(theta) / 2]])
    assert np.allclose(gradient_descent_mse(traced, [[1.0, 1.0]], 0.5)(1), [[0.5, 0.5]])
    assert np.allclose(gradient_descent_mse(theta.reshape(1, 1, 2, 2), [[1.0, 1.0]], 0.5)(1), [[0.5, 0.5]])


class Net(nn.Module):
    def __init__(self, C=3):
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh()), nn.Linear(8, C)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("which", ["head, traced", "everything, full"])
def test_kernel_predictor_reproduces_the_linearized_network_with_several_outputs(which):
    """The linearization trained by full-batch gradient descent on (1/2n) sum ||f - y||^2 with C = 3 outputs:
    a head alone has Theta_cc' = delta_cc' k, so the traced (mean) Gram drives (n, C) targets exactly; with
    every parameter the full (n, n, C, C) Gram does."""
    torch.manual_seed(0)
    model = Net().double()
    if which.startswith("head"):
        for p in model.body.parameters():
            p.requires_grad_(False)
    X, Y = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    Xt = torch.randn(3, 4, dtype=torch.float64)
    params = "head.*" if which.startswith("head") else None
    traced = which.endswith("traced")
    K = ntk(model, X, params=params, precision="fp64", trace=traced, progress=False)
    Kx = ntk(model, Xt, X, params=params, precision="fp64", trace=traced, progress=False)
    alpha, steps = 0.7 * max_stable_step(K), 25
    run = train(model, X, Y, linear=True, optimizer="sgd", lr=alpha, steps=steps, X_test=Xt,
                y_test=torch.zeros(3, 3, dtype=torch.float64))
    with torch.no_grad():
        u0, f0 = model(X).numpy(), model(Xt).numpy()
    u, f = gradient_descent_mse(K, Y, alpha)(np.arange(steps + 1), u0=u0, K_test=Kx, f0_test=f0)
    assert np.allclose(u, run.train_pred.numpy(), rtol=0, atol=1e-9), np.abs(u - run.train_pred.numpy()).max()
    assert np.allclose(f, run.test_pred.numpy(), rtol=0, atol=1e-9), np.abs(f - run.test_pred.numpy()).max()


@pytest.mark.parametrize("lam", [0.0, 0.3])
@pytest.mark.parametrize("outputs", [1, 2])
def test_ridge_gradient_descent_matches_its_iteration(lam, outputs):
    n, m = 9, 4
    K = psd(n + m, 1, rank=6)  # rank-deficient: the null space and the ridge both matter
    Ktr, Kx = K[:n, :n], K[n:, :n]
    y = np.random.default_rng(2).standard_normal((n, outputs) if outputs > 1 else n)
    alpha = 0.9 * max_stable_step(Ktr, lam)
    u0, f0 = 0.3, -0.2
    ref_u, ref_f = gradient_descent_reference(Ktr, y, alpha, 40, u0=u0, K_test=Kx, f0_test=f0, lam=lam)
    u, f = gradient_descent_mse(Ktr, y, alpha, lam)(np.arange(41), u0=u0, K_test=Kx, f0_test=f0)
    assert np.allclose(u, ref_u, atol=1e-10) and np.allclose(f, ref_f, atol=1e-10)


@pytest.mark.parametrize("lam", [0.0, 0.05])
def test_t_inf_is_kernel_ridge(lam):
    n, m = 8, 3
    K = psd(n + m, 3, rank=5 if lam == 0 else None)
    Ktr, Kx = K[:n, :n], K[n:, :n]
    y = np.random.default_rng(4).standard_normal(n)
    ridge_u, ridge_f = kernel_ridge(Ktr, y, lam, K_test=Kx)
    for predictor in (gradient_descent_mse(Ktr, y, 0.5 * max_stable_step(Ktr, lam), lam),
                      gradient_flow_mse(Ktr, y, 1.0, lam)):
        u, f = predictor(np.inf, K_test=Kx)
        assert np.allclose(u, ridge_u, atol=1e-9) and np.allclose(f, ridge_f, atol=1e-9)


def test_ridge_flow_is_the_matrix_exponential():
    n = 6
    K = psd(n, 5)
    y = np.random.default_rng(6).standard_normal(n)
    lam, eta, s = 0.2, 0.7, 1.3
    A = K / n + lam * np.eye(n)  # du/ds = -eta (A u - K y / n) from u_0 = 0
    want = np.linalg.solve(A, (np.eye(n) - expm(-eta * s * A)) @ (K @ y / n))
    assert np.allclose(gradient_flow_mse(K, y, eta, lam)(s), want, atol=1e-10)


def test_max_stable_step_is_the_edge_of_divergence():
    K = psd(10, 7)
    y = np.random.default_rng(8).standard_normal(10)
    edge = max_stable_step(K)
    assert edge == pytest.approx(2 / (np.linalg.eigvalsh(K)[-1] / 10))
    below = gradient_descent_reference(K, y, 0.99 * edge, 3000)
    above = gradient_descent_reference(K, y, 1.01 * edge, 3000)
    assert np.abs(below[-1] - y).max() < np.abs(below[0] - y).max()
    assert np.abs(above[-1] - y).max() > 1e3 * np.abs(above[0] - y).max()
    with pytest.warns(UserWarning, match="diverges"):
        gradient_descent_mse(K, y, 1.01 * edge)
    with pytest.raises(Exception, match="stable step"):
        gradient_descent_mse(K, y, 1.01 * edge)(np.inf)
