"""agreement.run_one at toy size: for a model linear in its parameters the network trained by gradient descent is
its eNTK predictor (correlation 1, no gap); on a small decoder every number is finite and the run is
deterministic; the report renders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from minintk import Decoder, DecoderConfig, ntk
from minintk.agreement import AgreeConfig, markdown, plot, run_one, summarize

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = AgreeConfig(n_train=16, n_test=12, steps=30, seeds=1)


def gram_of(model: nn.Module):
    def gram(A, B, kernel):
        return ntk(model, A, B, precision="fp64", kernel=kernel, progress=False).numpy()

    return gram


def labels(n: int, seed: int) -> np.ndarray:
    return np.where(np.random.default_rng(seed).random(n) < 0.5, -1.0, 1.0)


def test_a_model_linear_in_theta_is_its_kernel_predictor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 1, bias=False), nn.Flatten(0)).double()
    X, Xt = torch.randn(16, 5, dtype=torch.float64), torch.randn(12, 5, dtype=torch.float64)
    row = run_one(model, gram_of(model), X, labels(16, 1), Xt, labels(12, 2), CFG, seed=0)
    assert row["corr"]["sgd_net_vs_kernel"] == pytest.approx(1.0, abs=1e-9)
    assert row["sgd_rms_gap"] <= 1e-9
    assert row["acc"]["sgd_net"] == row["acc"]["sgd_kernel"]


def test_decoder_rows_are_finite_deterministic_and_render(tmp_path):
    torch.manual_seed(0)
    m = Decoder(DecoderConfig(vocab_size=23, n_positions=8, d_model=8, n_layer=1, n_head=2, head="label_words",
                              label_ids=(3, 5), label_diff=True)).double()
    g = torch.Generator().manual_seed(3)
    X, Xt = torch.randint(0, 23, (16, 5), generator=g), torch.randint(0, 23, (12, 5), generator=g)
    rows = [dict(task="toy", **run_one(m, gram_of(m), X, labels(16, 4), Xt, labels(12, 5), CFG, seed=0))]
    again = run_one(m, gram_of(m), X, labels(16, 4), Xt, labels(12, 5), CFG, seed=0)
    assert again == {k: v for k, v in rows[0].items() if k != "task"}
    flat = list(rows[0]["acc"].values()) + [v for v in rows[0]["corr"].values() if v is not None]
    assert all(np.isfinite(flat)) and 0 < rows[0]["asymmetry"] < 1
    s = summarize(rows)
    text = markdown(rows, s, CFG, "toy setup")
    assert "| toy |" in text and "Adam network vs SignGD-kernel regression" in text
    plot(s, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 5_000
