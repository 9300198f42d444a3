"""Fine-tuning with hold-out early stopping (minintk.finetune): the stopping step on scripted validation curves,
metrics against their definitions, task heads against the base LM's logits, the best checkpoint kept."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call

from minintk import Decoder, DecoderConfig
from minintk.finetune import (
    Data,
    FinetuneConfig,
    FinetuneError,
    Targets,
    features,
    finetune,
    holdout_loop,
    metrics,
    probe_readout,
    task_model,
)
from minintk.stopping import holdout_stop

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def scripted(curve):
    """step() counter and an evaluate() that replays `curve` as validation losses."""
    calls = {"steps": 0, "evals": []}

    def step(t):
        assert t == calls["steps"], "steps must run in order"
        calls["steps"] += 1

    def evaluate(t):
        calls["evals"].append(t)
        return {"val_loss": curve[len(calls["evals"]) - 1]}

    return step, evaluate, calls


def test_early_stopping_stops_at_the_right_step_on_a_scripted_curve():
    step, evaluate, calls = scripted([5, 4, 3, 3.5, 3.6, 3.7, 2, 1])
    best = []
    res = holdout_loop(step, evaluate, max_steps=1000, eval_every=10, patience=3, on_best=best.append)
    # evaluations at steps 0, 10, ..., 50: 3.5, 3.6, 3.7 are three in a row without beating 3 (step 20)
    assert (res.stop_step, res.best_step, res.stopped) == (50, 20, True)
    assert calls["steps"] == 50 and calls["evals"] == [0, 10, 20, 30, 40, 50]
    assert best == [0, 10, 20]
    assert [h["step"] for h in res.history] == calls["evals"]


def test_no_stop_before_the_curve_turns_and_a_final_evaluation_at_max_steps():
    step, evaluate, calls = scripted([3, 2, 1, 0.5, 0.4])
    res = holdout_loop(step, evaluate, max_steps=35, eval_every=10, patience=2)
    assert (res.stop_step, res.best_step, res.stopped) == (35, 35, False)
    assert calls["evals"] == [0, 10, 20, 30, 35] and calls["steps"] == 35


@given(curve=st.lists(st.floats(0, 10), min_size=1, max_size=30), patience=st.integers(1, 6),
       every=st.integers(1, 7))
def test_stop_matches_holdout_stop_on_the_whole_curve(curve, patience, every):
    max_steps = every * (len(curve) - 1)
    step, evaluate, calls = scripted(curve)
    res = holdout_loop(step, evaluate, max_steps=max_steps, eval_every=every, patience=patience)
    ref = holdout_stop(curve, patience)
    assert res.stop_step == every * ref.stop_index and res.best_step == every * ref.best_index
    assert res.stopped == ref.stopped and calls["steps"] == res.stop_step


def test_metrics_against_their_definitions():
    y = np.array([1, 0, 1, 1, 0, 0, 1.0])
    f = np.array([0.3, -2, -0.1, 4, 0.2, -1, 2])  # predicted classes 1 0 0 1 1 0 1
    m = metrics(f, y, "classification", trivial=1.0)
    tp, fp, fn = 3, 1, 1
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert m["nerr"] == pytest.approx((2 / 7) / (3 / 7))  # the majority class (1) errs on the three zeros
    r = metrics(np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 5.0]), "regression", trivial=3.0)
    assert r["mse"] == pytest.approx(2 / 3) and r["nerr"] == pytest.approx((2 / 3) / (8 / 3))
    t = Targets.of(np.array([1.0, 3.0, 5.0]), "regression")
    np.testing.assert_allclose(t.label_units(t.z(np.array([2.0, 7.0])), "regression"), [2.0, 7.0])
    assert Targets.of(np.array([0, 1, 1.0]), "classification").z(np.array([0.0, 1.0])).tolist() == [-1.0, 1.0]


def base_lm(seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=20, n_positions=8, d_model=16, n_layer=1, n_head=2, head="lm", attn_scale="none")
    return Decoder(cfg).double()


def packed(n: int, T: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (n, T), generator=g)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return torch.stack([ids * mask, mask], 1)


def test_task_models_read_the_base_lm():
    base = base_lm()
    X = packed(5)
    with torch.no_grad():
        logits = base(X[:, 0], X[:, 1])  # (n, T, V)
        last = X[:, 1].sum(1) - 1
        ref = logits[torch.arange(5), last][:, 7] - logits[torch.arange(5), last][:, 3]
        cls = task_model(base, "classification", (3, 7))
        torch.testing.assert_close(cls(X), ref)
        reg = task_model(base, "regression")
        assert reg(X).shape == (5,)
        for name, p in base.named_parameters():
            if not name.startswith("lm_head"):
                assert torch.equal(dict(reg.model.named_parameters())[name], p), name
        f, theta = probe_readout(cls)
        torch.testing.assert_close(f(theta, features(cls, X)), ref)  # the probe starts at the model's function
    with pytest.raises(FinetuneError, match="label-word ids"):
        task_model(base, "classification")


def test_finetune_keeps_the_best_checkpoint_and_leaves_the_body_alone():
    base = base_lm()
    model = task_model(base, "regression")
    before = {k: v.clone() for k, v in model.named_parameters() if "head" not in k}
    g = torch.Generator().manual_seed(3)
    X, Xv = packed(40, seed=2), packed(20, seed=3)
    y, yv = torch.randn(40, generator=g, dtype=torch.float64).numpy(), torch.randn(20, generator=g).double().numpy()
    cfg = FinetuneConfig(method="full", lr=3e-3, batch_size=8, max_steps=30, eval_every=5, patience=3, seed=1)
    res = finetune(model, Data(X, y), Data(Xv, yv), None, "regression", cfg)
    losses = [h["val_loss"] for h in res.history]
    assert res.best_step == res.history[int(np.argmin(losses))]["step"]
    with torch.no_grad():  # the returned parameters reproduce the best validation loss, independently evaluated
        f = functional_call(model, res.theta, (Xv,)).numpy()
    assert 0.5 * np.mean((f - res.targets.z(yv)) ** 2) == pytest.approx(min(losses), rel=1e-9)
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in before.items())
    assert res.test is None and set(res.val) == {"mse", "nerr"}
    with pytest.raises(FinetuneError, match="unknown method"):
        FinetuneConfig(method="lora")


@pytest.mark.parametrize("method", ["tangent", "probe"])
def test_other_methods_train(method):
    base = base_lm(1)
    model = task_model(base, "classification", (3, 7))
    X, Xv = packed(32, seed=4), packed(16, seed=5)
    y = (torch.arange(32) % 2).double().numpy()
    yv = (torch.arange(16) % 2).double().numpy()
    if method == "probe":
        X, Xv = features(model, X), features(model, Xv)
    cfg = FinetuneConfig(method=method, lr=1e-2, batch_size=8, max_steps=20, eval_every=5, patience=10)
    res = finetune(model, Data(X, y), Data(Xv, yv), Data(Xv, yv), "classification", cfg)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert set(res.test) == {"accuracy", "f1", "nerr"} and res.stop_step == 20


def test_a_frozen_head_stays_at_its_seeded_init_and_out_of_theta():
    model = task_model(base_lm(2), "regression")
    X = packed(16, seed=6)
    y = torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
    cfg = FinetuneConfig(method="full", lr=1e-2, batch_size=8, max_steps=5, eval_every=5, patience=2, seed=4,
                         freeze_head=True)
    res = finetune(model, Data(X, y), Data(X, y), None, "regression", cfg)
    assert not any(k.startswith("model.head.") for k in res.theta)
    head = model.model.head
    assert head.weight.requires_grad and head.bias.requires_grad  # restored after the run
    ref = torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.02
    torch.testing.assert_close(head.weight.detach(), ref)  # N(0, 0.02^2), drawn from the run's seed
    assert any(not torch.equal(v, dict(model.named_parameters())[k]) for k, v in res.theta.items())
