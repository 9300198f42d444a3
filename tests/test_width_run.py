"""One width-scan run (minintk.width_run): its metrics against independent references (jacrev kernels,
linearize's training), and the pretrained and linear-head starts."""

import copy

import numpy as np
import pytest
import torch
from conftest import TINY_SCAN
from torch.func import functional_call, jacrev

from minintk.linearize import compare
from minintk.width_config import ScanConfig, Variant
from minintk.width_run import fresh_head, measure, pretrain, run_one, student
from minintk.width_tasks import tasks, teacher_task

# torch's forward-mode AD loads its jvp decompositions through torch.jit.script, which warns on torch >= 2.9
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]
NTK_RANDOM = Variant("ntk", "1/d", "random")


def gram(model, X):
    """K = J J^T over the trained parameters by torch.func.jacrev (independent of minintk.engine)."""
    theta = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    J = jacrev(lambda th: functional_call(model, th, (X,)))(theta)
    J = torch.cat([v.reshape(X.shape[0], -1) for v in J.values()], 1)
    return J @ J.T


def test_measure_against_parameter_space_training_and_jacrev_kernels():
    """measure's linearized model (closed form on the NTK) is linearize's f_lin trained by the same gradient descent;
    its drift, movement and K_0 are those of jacrev Jacobians and of the network trained in one piece."""
    cfg = ScanConfig(**TINY_SCAN)
    model = student(cfg, NTK_RANDOM, 16, 0, vocab=8, seq_len=3).double()
    assert not model.head.bias.requires_grad, "zero-multiplier parameters are outside theta"
    task = teacher_task(replace_n(cfg, 6, 5), 7)
    alpha, steps = 0.3, (3, 8)
    rec = measure(copy.deepcopy(model), task, alpha, steps, curve_points=9)
    y, yt = task.y.double(), task.y_test.double()
    cmp = compare(model, task.X, y, lr=alpha, steps=8, X_test=task.X_test, y_test=yt)
    assert rec["curves"]["step"] == list(range(9))
    for key, ref in (("lin_test", cmp.lin.test_loss), ("lin_train", cmp.lin.train_loss),
                     ("net_test", cmp.net.test_loss), ("net_train", cmp.net.train_loss)):
        err = np.abs(np.array(rec["curves"][key]) - ref.numpy()).max()
        assert err < 1e-10, f"{key} curve differs from linearize's run by {err:.3g}"
    rms = float(yt.pow(2).mean().sqrt())
    K0 = gram(model, task.X)
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for k, v in cmp.net.params.items():
            trained.get_parameter(k).copy_(v)
    K8 = gram(trained, task.X)
    expect = {"lin_error": float(cmp.test_gap[8]) / rms, "drift": float((K8 - K0).norm() / K0.norm()),
              "movement": float(cmp.net.weight_dist[8]) / cmp.net.theta0_norm}
    for key, ref in expect.items():
        assert rec[key][1] == pytest.approx(ref, rel=1e-7), f"{key}: {rec[key][1]:.10g} vs reference {ref:.10g}"
    assert np.allclose(rec["K0"], K0.numpy(), rtol=1e-7, atol=1e-10)
    assert rec["movement"][0] < rec["movement"][1] and set(rec["movement_by_group"][1]) >= {"attention", "mlp"}


def replace_n(cfg: ScanConfig, n: int, m: int) -> ScanConfig:
    return ScanConfig(**(cfg.to_dict() | {"n_train": n, "n_test": m}))


def test_pretrained_and_linear_head_starts():
    cfg = ScanConfig(**(TINY_SCAN | dict(lr=0.1, times=(0.5,), pretrain_time=2.0)))
    target, source, vocab = tasks(cfg)
    model = student(cfg, NTK_RANDOM, 8, 0, vocab, 3)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    theta_pre, move = pretrain(model, source, 0.25, 8)
    d = torch.cat([(theta_pre[k] - init[k]).reshape(-1) for k in theta_pre]).norm()
    assert move == pytest.approx(float(d / torch.cat([init[k].reshape(-1) for k in theta_pre]).norm()), rel=1e-5)
    assert move > 0 and torch.equal(model.blocks[0].mlp.c_fc.weight, theta_pre["blocks.0.mlp.c_fc.weight"])
    fresh_head(model, 3)
    changed = {k for k, v in theta_pre.items() if not torch.equal(model.get_parameter(k), v)}
    assert changed == {"head.weight"}, f"a fresh head changes the head only, changed {changed}"
    cache: dict = {}
    recs = [run_one(cfg, Variant("ntk", "1/d", s), 16, 0, target, source, vocab, cache)
            for s in ("pretrained", "linear_head")]
    assert len(cache) == 1 and recs[0]["pretrain_move"] == recs[1]["pretrain_move"] > 0
    assert not np.allclose(recs[0]["K0"], recs[1]["K0"])
