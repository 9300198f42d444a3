"""Function-space dynamics (minintk.dynamics) against iterating the update, expm, solve, and the ridge bounds."""

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

from minintk.dynamics import (
    DynamicsError,
    gd_filters,
    gradient_descent_mse,
    gradient_descent_reference,
    gradient_flow_mse,
    kernel_ridge,
    step_sums,
)


def psd(n: int, rank: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    A = rng.standard_normal((n, rank)) * scale
    return A @ A.T


def problem(seed: int, n: int, m: int, C: int | None, rank: int):
    """A random kernel regression problem: K (n, n) of the given rank, its cross kernel (m, n), y, u0, f0."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n + m, rank))
    full = A @ A.T
    K, Kx = full[:n, :n], full[n:, :n]
    shape = (n,) if C is None else (n, C)
    y = rng.standard_normal(shape)
    u0 = 0.3 * rng.standard_normal(shape)
    f0 = 0.3 * rng.standard_normal((m,) + shape[1:])
    return K, Kx, y, u0, f0


@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 12),
    m=st.integers(1, 5),
    C=st.sampled_from([None, 1, 3]),
    rank_frac=st.floats(0.2, 1.0),
    step_frac=st.floats(0.05, 1.9),
)
def test_closed_form_gd_equals_iterating_the_update(seed, n, m, C, rank_frac, step_frac):
    K, Kx, y, u0, f0 = problem(seed, n, m, C, max(1, int(rank_frac * n)))
    alpha = step_frac * n / np.linalg.eigvalsh(K).max()  # alpha l_max / n up to 1.9: oscillating but stable
    steps = 60
    u_ref, f_ref = gradient_descent_reference(K, y, alpha, steps, u0=u0, K_test=Kx, f0_test=f0)
    u, f = gradient_descent_mse(K, y, alpha)(np.arange(steps + 1), u0=u0, K_test=Kx, f0_test=f0)
    err = max(np.abs(u - u_ref).max(), np.abs(f - f_ref).max())
    assert err <= 1e-10, f"closed form vs iteration: max error {err:.3g}"


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 10))
def test_closed_form_gd_with_a_step_schedule(seed, n):
    K, Kx, y, u0, f0 = problem(seed, n, 3, None, n)
    rng = np.random.default_rng(seed + 1)
    alpha = rng.uniform(0.05, 1.5, size=40) * n / np.linalg.eigvalsh(K).max()
    u_ref, f_ref = gradient_descent_reference(K, y, alpha, 40, u0=u0, K_test=Kx, f0_test=f0)
    t = np.array([[0, 1, 7], [40, 13, 40]])  # any shape, unsorted, repeated
    u, f = gradient_descent_mse(K, y, alpha)(t, u0=u0, K_test=Kx, f0_test=f0)
    assert u.shape == (2, 3, n) and f.shape == (2, 3, 3)
    err = max(np.abs(u - u_ref[t]).max(), np.abs(f - f_ref[t]).max())
    assert err <= 1e-10, f"schedule closed form vs iteration: max error {err:.3g}"
    eta = step_sums(alpha, t)
    assert np.allclose(eta, np.concatenate([[0], np.cumsum(alpha)])[t], rtol=1e-14)


def test_near_singular_kernel_stays_finite_and_exact():
    """Eigenvalues 1, 1e-6, ..., 1e-300, exact zeros and tiny negatives: no K^{-1}, no NaN, the iteration's answer."""
    rng = np.random.default_rng(0)
    n = 12
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.array([1.0, 1e-3, 1e-6, 1e-10, 1e-14, 1e-17, 1e-200, 1e-300, 0.0, 0.0, -1e-17, -3e-16])
    K = (V * lam) @ V.T
    Kx = rng.standard_normal((4, n)) @ K + 1e-3 * rng.standard_normal((4, n))  # not in K's column space either
    y = rng.standard_normal(n)
    alpha = 0.9 * n
    u, f = gradient_descent_mse(K, y, alpha)(np.array([0, 1, 50, 2000]), u0=0.1, K_test=Kx, f0_test=-0.2)
    assert np.all(np.isfinite(u)) and np.all(np.isfinite(f))
    u_ref, f_ref = gradient_descent_reference(K, y, alpha, 2000, u0=0.1, K_test=Kx, f0_test=-0.2)
    err = max(np.abs(u - u_ref[[0, 1, 50, 2000]]).max(), np.abs(f - f_ref[[0, 1, 50, 2000]]).max())
    assert err <= 1e-10, f"near-singular K: max error vs iteration {err:.3g}"
    # the null-space filter of the test predictions is eta_t / n, not 0 (and not inf)
    _, g = gd_filters(np.zeros(1), n, alpha, np.array([5]))
    assert g[0, 0] == pytest.approx(5 * alpha / n, rel=1e-15)
    uf, ff = gradient_flow_mse(K, y, eta=2.0)(np.array([0.0, 3.0, 1e8]), K_test=Kx)
    assert np.all(np.isfinite(uf)) and np.all(np.isfinite(ff))
    ridge = kernel_ridge(K, y, np.array([0.0, 1e-12, 1.0]), K_test=Kx)
    assert all(np.all(np.isfinite(r)) for r in ridge)


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 10), eta=st.floats(0.1, 5.0))
def test_gradient_flow_equals_matrix_exponential(seed, n, eta):
    K, Kx, y, u0, f0 = problem(seed, n, 3, 2, max(1, n - 1))
    s = np.array([0.0, 0.37, 2.5])
    u, f = gradient_flow_mse(K, y, eta)(s, u0=u0, K_test=Kx, f0_test=f0)
    for k, sk in enumerate(s):
        # du/ds = -(eta/n) K (u - y); the test outputs follow df/ds = -(eta/n) Kx (u - y)
        E = scipy.linalg.expm(-eta * sk * K / n)
        u_ref = y + E @ (u0 - y)
        M = np.block([[-eta * K / n, np.zeros((n, 3))], [-eta * Kx / n, np.zeros((3, 3))]])
        z = scipy.linalg.expm(sk * M) @ np.vstack([u0 - y, f0])
        err = max(np.abs(u[k] - u_ref).max(), np.abs(f[k] - z[n:]).max())
        assert err <= 1e-9 * max(1.0, np.abs(u_ref).max()), f"flow vs expm at s={sk}: {err:.3g}"


def test_small_steps_approach_gradient_flow():
    K, Kx, y, u0, f0 = problem(3, 8, 2, None, 8)
    eta, s = 1.0, 2.0
    u_flow = gradient_flow_mse(K, y, eta)(s, u0=u0)
    errs = []
    for steps in (100, 1000):
        u_gd = gradient_descent_mse(K, y, eta * s / steps)(steps, u0=u0)
        errs.append(np.abs(u_gd - u_flow).max())
    assert errs[1] < errs[0] / 5 and errs[1] < 1e-2, f"GD -> flow as the step shrinks: errors {errs}"


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 10), lam=st.floats(1e-6, 10.0))
def test_kernel_ridge_matches_a_linear_solve(seed, n, lam):
    K, Kx, y, u0, f0 = problem(seed, n, 3, None, n)
    u, f = kernel_ridge(K, y, lam, u0=u0, K_test=Kx, f0_test=f0)
    a = np.linalg.solve(K + n * lam * np.eye(n), y - u0)
    err = max(np.abs(u - (u0 + K @ a)).max(), np.abs(f - (f0 + Kx @ a)).max())
    assert err <= 1e-8 * max(1.0, np.abs(a).max()), f"kernel ridge vs solve: {err:.3g}"


def test_early_stopping_matches_ridge_with_lambda_one_over_eta():
    """GD for t steps vs ridge with lam = 1/eta_t (docs/theory.md section 3): in every eigendirection of K the GD fit of
    y - u0 lies between 1x and 2x the ridge fit (alpha mu_1 <= 1), and the two predictors stay close."""
    rng = np.random.default_rng(1)
    n = 60
    x = np.sort(rng.uniform(0, 1, n))
    K = np.minimum.outer(x, x)
    y = np.sin(3 * x) + 0.1 * rng.standard_normal(n)
    l, V = np.linalg.eigh(K)
    alpha = 0.5 * n / l.max()
    gd = gradient_descent_mse(K, y, alpha)
    r = V.T @ y
    big = np.abs(r) > 1e-8 * np.abs(r).max()
    for t in (1, 10, 100, 1000):
        lam = 1.0 / float(step_sums(alpha, t))
        u_gd, u_r = gd(t), kernel_ridge(K, y, lam)
        ratio = (V.T @ u_gd)[big] / (V.T @ u_r)[big]
        assert ratio.min() >= 1 - 1e-9 and ratio.max() <= 2 + 1e-9, f"t={t}: GD/ridge in [{ratio.min()}, {ratio.max()}]"
        rel = np.linalg.norm(u_gd - u_r) / np.linalg.norm(u_r)
        assert rel < 0.5, f"t={t}: ||u_gd - u_ridge|| / ||u_ridge|| = {rel:.3g}"
        # a wrong scaling (lam = 1/(n eta_t)) breaks the sandwich
        wrong = (V.T @ kernel_ridge(K, y, lam / n))[big] / (V.T @ u_gd)[big]
        assert wrong.max() > 2 or wrong.min() < 1


def test_multi_output_columns_are_independent_runs():
    K, Kx, y, u0, f0 = problem(5, 7, 3, 3, 7)
    pred = gradient_descent_mse(K, y, 0.5)
    u, f = pred(np.array([0, 4, 30]), u0=u0, K_test=Kx, f0_test=f0)
    for c in range(3):
        uc, fc = gradient_descent_mse(K, y[:, c], 0.5)(np.array([0, 4, 30]), u0=u0[:, c], K_test=Kx, f0_test=f0[:, c])
        assert np.abs(u[..., c] - uc).max() < 1e-12 and np.abs(f[..., c] - fc).max() < 1e-12


def test_torch_inputs_and_fp32_tolerance():
    rng = np.random.default_rng(0)
    K = psd(6, 6, rng)
    y = rng.standard_normal(6)
    u_np = gradient_descent_mse(K, y, 0.1)(5)
    u_t = gradient_descent_mse(torch.from_numpy(K), torch.from_numpy(y), 0.1)(5)
    assert np.abs(u_np - u_t).max() < 1e-14
    # an fp32 Gram with a rounding-level negative eigenvalue is accepted; the same value in fp64 is not
    V, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    Kneg = (V * np.array([1.0, 0.5, 0.1, 1e-3, 0.0, -1e-6])) @ V.T
    gradient_descent_mse(Kneg.astype(np.float32), y, 0.1)
    with pytest.raises(DynamicsError, match="positive semi-definite"):
        gradient_descent_mse(Kneg, y, 0.1)


@pytest.mark.parametrize(
    "K, y, alpha, match",
    [
        (np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), 1.0, "symmetric"),
        (np.array([[1.0, 2.0], [2.0, 1.0]]), np.zeros(2), 1.0, "positive semi-definite"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), np.zeros(2), 1.0, "non-finite"),
        (np.eye(3), np.zeros(2), 1.0, "n = 3"),
        (np.eye(2), np.zeros(2), -1.0, "alpha must be a positive"),
        (np.ones((2, 3)), np.zeros(2), 1.0, "square"),
    ],
)
def test_bad_input_gives_a_clear_error(K, y, alpha, match):
    with pytest.raises(DynamicsError, match=match):
        gradient_descent_mse(K, y, alpha)


def test_bad_times_and_schedules():
    pred = gradient_descent_mse(np.eye(3), np.ones(3), np.full(5, 0.1))
    with pytest.raises(DynamicsError, match="past the end"):
        pred(6)
    with pytest.raises(DynamicsError, match="integers"):
        pred(1.5)
    with pytest.raises(DynamicsError, match=">= 0"):
        gradient_flow_mse(np.eye(3), np.ones(3))(-1.0)
    with pytest.raises(DynamicsError, match="K_test"):
        pred(2, K_test=np.ones((2, 4)))
    with pytest.raises(DynamicsError, match="lam"):
        kernel_ridge(np.eye(3), np.ones(3), -1.0)
