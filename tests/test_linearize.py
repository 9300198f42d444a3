"""Linearized vs full training (minintk.linearize) against the function-space dynamics of the empirical NTK."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from minintk import Decoder, DecoderConfig
from minintk.dynamics import gradient_descent_mse
from minintk.linearize import LinearizeError, compare, functional, linearize, train

F64 = torch.float64
# torch's forward-mode AD loads its jvp decompositions through torch.jit.script, which warns on torch >= 2.9
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def decoder(seed: int = 0, **cfg) -> Decoder:
    torch.manual_seed(seed)
    base = dict(vocab_size=16, n_positions=8, d_model=16, n_layer=2, n_head=2, head="scalar")
    return Decoder(DecoderConfig(**(base | cfg))).to(F64)


def data(n: int, m: int, T: int = 5, C: int | None = None, seed: int = 100):
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, 16, (n, T), generator=g)
    Xt = torch.randint(0, 16, (m, T), generator=g)
    y = torch.randn((n,) if C is None else (n, C), generator=g, dtype=F64)
    return X, Xt, y


def jacobian(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """J = d f(X) / d theta over the trained parameters, (n C, P), by torch.func.jacrev (independent of ntk.py)."""
    theta = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    J = jacrev(lambda th: functional_call(model, th, (X,)))(theta)
    rows = X.shape[0] * (1 if model(X[:1]).dim() == 1 else model(X[:1]).shape[1])
    return torch.cat([v.reshape(rows, -1) for v in J.values()], 1)


@pytest.mark.parametrize(
    "cfg, freeze, C",
    [
        (dict(), "wte.weight", None),  # scalar head, learned positions, frozen token embedding
        (dict(head="label_words", label_ids=(3, 7), n_positions=None), None, 2),  # LM head tied to the embedding
    ],
)
def test_linearized_gd_equals_function_space_dynamics_of_the_empirical_ntk(cfg, freeze, C):
    """Issue 6 acceptance: 100 steps of parameter-space GD on f_lin = function-space GD with K = J J^T (<= 1e-6)."""
    model = decoder(**cfg)
    if freeze:
        model.get_parameter(freeze).requires_grad_(False)
    X, Xt, y = data(8, 4, C=C)
    J, Jt = jacobian(model, X), jacobian(model, Xt)
    K, Kt = J @ J.T, Jt @ J.T  # (nC, nC), (mC, nC); rows ordered (sample, output)
    n, steps = X.shape[0], 100
    alpha = 1.5 * n / float(torch.linalg.eigvalsh(K).max())  # the largest stable steps oscillate: a hard case
    run = train(model, X, y, linear=True, optimizer="sgd", lr=alpha, steps=steps, X_test=Xt)
    with torch.no_grad():
        f0, f0t = model(X), model(Xt)
    # L = (1/2n) sum_i ||f_i - y_i||^2: with C outputs per sample the flattened step is (alpha C) / (n C)
    c = 1 if C is None else C
    u, f = gradient_descent_mse(K, y.reshape(-1), alpha * c)(
        np.arange(steps + 1), u0=f0.reshape(-1), K_test=Kt, f0_test=f0t.reshape(-1)
    )
    err_u = np.abs(run.train_pred.reshape(steps + 1, -1).numpy() - u).max()
    err_f = np.abs(run.test_pred.reshape(steps + 1, -1).numpy() - f).max()
    assert max(err_u, err_f) <= 1e-6, f"param vs function space after {steps} steps: {err_u:.3g}, test {err_f:.3g}"
    assert run.train_loss[-1] < 0.05 * run.train_loss[0], "the run must actually fit the data"
    if freeze:
        assert freeze not in run.params


def test_linearized_model_is_the_first_order_taylor_expansion():
    model = decoder(3, n_layer=1)
    X, _, _ = data(5, 1)
    f_lin, theta0 = linearize(model)
    f, _ = functional(model)
    with torch.no_grad():
        # the jvp runs attention's math kernel, the model its fused one: equal to rounding
        assert torch.allclose(f_lin(theta0, X), model(X), atol=1e-14, rtol=0)
    J = jacobian(model, X)
    g = torch.Generator().manual_seed(1)
    d = {k: 0.1 * torch.randn(v.shape, generator=g, dtype=F64) for k, v in theta0.items()}
    theta = {k: theta0[k] + d[k] for k in theta0}
    expect = model(X).detach() + J @ torch.cat([v.reshape(-1) for v in d.values()])
    assert torch.allclose(f_lin(theta, X), expect, atol=1e-12, rtol=0)
    assert not torch.allclose(f(theta, X), expect, atol=1e-6), "the network itself is not linear in theta"


def test_model_linear_in_its_parameters_gives_identical_runs_with_adam_and_minibatches():
    """f(x) = W x + b is its own linearization: the two runs coincide step by step, which also checks that both
    see the same optimizer, start and minibatches."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(F64)
    X = torch.randn(10, 3, dtype=F64)
    Y = X @ torch.randn(3, 2, dtype=F64) + 0.1 * torch.randn(10, 2, dtype=F64)
    cmp = compare(model, X, Y, optimizer="adam", lr=0.05, steps=30, batch_size=4, X_test=X[:3], y_test=Y[:3], seed=5)
    assert cmp.train_gap.max() < 1e-12 and cmp.test_gap.max() < 1e-12, f"gap {cmp.train_gap.max():.3g}"
    assert cmp.net.train_loss[-1] < 0.5 * cmp.net.train_loss[0]
    other = train(model, X, Y, optimizer="adam", lr=0.05, steps=30, batch_size=4, seed=6)
    assert (other.train_pred[-1] - cmp.net.train_pred[-1]).abs().max() > 1e-6, "the seed must pick the batches"


def test_network_run_is_a_plain_torch_training_loop():
    model = decoder(1, n_layer=1)
    X, Xt, y = data(6, 3)
    run = train(model, X, y, optimizer="adam", lr=1e-2, steps=15, X_test=Xt, y_test=torch.zeros(3, dtype=F64))
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    p0 = torch.cat([p.detach().reshape(-1).clone() for p in ref.parameters()])
    for _ in range(15):
        opt.zero_grad()
        (0.5 * ((ref(X) - y) ** 2).mean()).backward()
        opt.step()
    with torch.no_grad():
        assert torch.allclose(run.train_pred[-1], ref(X), atol=1e-12, rtol=0)
        assert torch.allclose(run.test_loss[-1], 0.5 * (ref(Xt) ** 2).mean(), atol=1e-12, rtol=0)
        moved = float((torch.cat([p.reshape(-1) for p in ref.parameters()]) - p0).norm())
    assert run.weight_dist[0] == 0 and run.weight_dist[-1] == pytest.approx(moved, rel=1e-10)
    assert run.theta0_norm == pytest.approx(float(p0.norm()), rel=1e-12)
    assert torch.allclose(run.train_loss, 0.5 * ((run.train_pred - y) ** 2).mean(1), atol=1e-14, rtol=0)
    with torch.no_grad():  # the model itself was not touched
        assert torch.equal(torch.cat([p.reshape(-1) for p in model.parameters()]), p0)


def test_wide_ntk_decoder_stays_close_to_its_linearization():
    """docs/theory.md section 6: under the NTK parameterization the network's predictions on held-out inputs follow the
    linearized model's more closely as the width grows (Lee et al. 2019: gap ~ 1/sqrt(width))."""
    widths, gaps, moved = [16, 64, 256], [], []
    X, Xt, y = data(8, 4, T=4)
    for d in widths:
        model = decoder(0, d_model=d, n_layer=1, n_positions=None, attn_scale="1/d", parameterization="ntk")
        cmp = compare(model, X, y, optimizer="sgd", lr=0.2, steps=50, X_test=Xt)
        assert cmp.lin.train_loss[-1] < 0.1 * cmp.lin.train_loss[0], f"width {d}: the linearized run did not train"
        gaps.append(float(cmp.test_gap.max()))
        moved.append(float(cmp.net.weight_dist[-1]) / cmp.net.theta0_norm)
    assert gaps[0] > gaps[1] > gaps[2], f"test gap vs width {widths}: {gaps}"
    slope = np.polyfit(np.log(widths), np.log(gaps), 1)[0]
    assert slope < -0.3, f"log-log slope of the gap against width: {slope:.3f}, gaps {gaps}"
    assert moved[0] > moved[1] > moved[2], f"relative weight movement vs width: {moved}"


def test_bad_input_gives_a_clear_error():
    model = decoder(n_layer=1)
    X, _, y = data(4, 1)
    with pytest.raises(LinearizeError, match="targets must be"):
        train(model, X, y[:3])
    with pytest.raises(LinearizeError, match="unknown optimizer"):
        train(model, X, y, optimizer="lbfgs")
    with pytest.raises(LinearizeError, match="non-finite"):
        train(model, X, torch.full_like(y, float("nan")))
    with pytest.raises(LinearizeError, match="batch_size"):
        train(model, X, y, batch_size=0)
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(LinearizeError, match="nothing to train"):
        train(frozen, X, y)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1).to(F64)

        def forward(self, x):
            return {"out": self.lin(x)[:, 0]}

    Z = torch.randn(4, 2, dtype=F64)
    with pytest.raises(LinearizeError, match="output="):
        train(Pair(), Z, y, steps=1)
    run = train(Pair(), Z, y, steps=3, linear=True, output=lambda o: o["out"])
    assert run.train_pred.shape == (4, 4)
