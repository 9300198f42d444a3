"""The planted-task check (planted_check, planted_report) at toy size: its numbers against independent
computations (the stopping rule, gradient descent of the linearized model), determinism, the report."""

import copy
import math

import numpy as np
import pytest
import torch

from minintk import Decoder, DecoderConfig, ntk, stopping_time
from minintk.linearize import train
from minintk.planted import PlantedError, eigen_target
from minintk.planted_check import CheckConfig, run_check
from minintk.planted_report import markdown, plot, summarize
from minintk.spectrum import eigenvalues
from minintk.stopping import default_step

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = CheckConfig(sizes=(6, 12), n_test=8, sample=10, k=4, smoothness=(1.0, 2.0, 3.0), noise=0.3, seeds=2,
                  network=True, net_steps=40, grid=60)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=23, n_positions=8, d_model=8, n_layer=1, n_head=2, head="label_words",
                        label_ids=(3, 5), label_diff=True)
    model = Decoder(cfg)
    X = torch.randint(0, 23, (CFG.pool, 5))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests run (one_thread): the same reduction order, the same numbers
    try:
        return model, X, run_check(model, X, CFG, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_rows_follow_the_rule_and_the_linearized_model(setup):
    model, X, res = setup
    assert len(res["rows"]) == 3 * 2 * 2 and res == run_check(model, X, CFG, progress=False)  # deterministic
    m64 = copy.deepcopy(model).double()
    K = ntk(m64, X, precision="fp64", progress=False).numpy()
    f0 = m64(X).detach().numpy()
    row = next(r for r in res["rows"] if r["smoothness"] == 2.0 and r["seed"] == 1 and r["n"] == 12)
    clean = eigen_target(K, np.arange(10), 4, 2.0, sigma=0.0, seed=1)
    task = eigen_target(K, np.arange(10), 4, 2.0, sigma=0.3 * math.sqrt(np.mean(clean.f_star**2)), seed=1)
    tr = 10 + np.random.default_rng(10_000 + 1).permutation(12)[:12]
    te = np.arange(CFG.pool - 8, CFG.pool)
    mu = eigenvalues(K[np.ix_(tr, tr)]).mu
    alpha = default_step(mu)
    assert row["t_hat"] == stopping_time(mu, task.sigma, alpha, B=task.rkhs_norm)
    lin = train(m64, X[tr], torch.from_numpy(f0[tr] + task.y[tr]), linear=True, optimizer="sgd", lr=alpha,
                steps=row["t_hat"], X_test=X[te], y_test=torch.from_numpy(f0[te] + task.f_star[te]))
    err = 2 * float(lin.test_loss[-1])  # gradient descent on the linearized network, step by step
    assert abs(err - row["lin_test_at_t_hat"]) <= 1e-8 * max(err, 1e-12), (err, row["lin_test_at_t_hat"])
    assert row["lin_oracle_test"] <= row["lin_test_at_t_hat"] + 1e-15


def test_report_says_which_claims_held(setup, tmp_path):
    _, _, res = setup
    s = summarize(res)
    claims = [c for c, _, _ in s["verdicts"]]
    assert len(claims) == 7 and all(ok in (True, False, None) for _, ok, _ in s["verdicts"])
    text = markdown(s, res["config"])
    assert "| claim | held | evidence |" in text and "### s = 3" in text
    assert plot(s, tmp_path / "planted.png").stat().st_size > 10_000


def test_a_pool_too_small_is_named():
    with pytest.raises(PlantedError, match=r"the pool needs 30 inputs \(sample 10 \+ largest n 12 \+ test 8\), got 5"):
        run_check(torch.nn.Linear(3, 1), torch.randn(5, 3), CheckConfig(sizes=(6, 12), n_test=8, sample=10, k=4))
    with pytest.raises(PlantedError, match="k=20: expected 1 <= k <= sample = 10"):
        CheckConfig(sample=10, k=20)


class _LinearInTheta(torch.nn.Module):
    """f(x) = <w, x>: its own linearization, so gradient descent on it is the closed-form kernel dynamics."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(6, 1, bias=False)

    def forward(self, x):
        return self.w(x)[:, 0]


def test_the_network_oracle_of_a_model_linear_in_theta_is_the_linearized_one():
    """net_oracle_test_t / net_oracle_test (the network's own oracle stopping time over the steps it ran) match
    the linearized model's closed form when the network is linear in its parameters; the closed form's oracle
    time sits on a grid, so the network's error at its oracle is at most the linearized one's."""
    torch.manual_seed(0)
    cfg = CheckConfig(sizes=(12,), n_test=8, sample=10, k=4, smoothness=(1.0,), seeds=1, network=True,
                      net_steps=5000, grid=400)
    res = run_check(_LinearInTheta(), torch.randn(cfg.pool, 6), cfg, progress=False)
    (row,) = res["rows"]
    assert row["net_steps"] == min(5000, 2 * max(row["t_hat"], row["lin_oracle_test_t"], 1))
    assert abs(row["net_test_at_t_hat"] - row["lin_test_at_t_hat"]) <= 1e-9 * row["lin_test_at_t_hat"]
    assert row["net_oracle_test"] <= row["lin_oracle_test"] * (1 + 1e-9)
    assert abs(row["net_oracle_test"] - row["lin_oracle_test"]) <= 0.05 * row["lin_oracle_test"]
