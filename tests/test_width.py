"""Width-scaling checks (minintk.width): metrics against independent references, slope fits, resumable scans, CLI."""

import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy.stats import linregress
from scipy.stats import t as student_t
from torch.func import functional_call, jacrev

from minintk import width as W
from minintk import width_report as R
from minintk.cli import main
from minintk.linearize import compare
from minintk.width import ScanConfig, Slope, Variant, WidthScanError

# torch's forward-mode AD loads its jvp decompositions through torch.jit.script, which warns on torch >= 2.9
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]
PNG = b"\x89PNG\r\n\x1a\n"
NTK_RANDOM = Variant("ntk", "1/d", "random")
TINY = dict(n_layer=1, n_head=2, vocab_size=8, seq_len=3, n_train=4, n_test=4, teacher_width=4, times=(0.5,),
            pretrain_time=0.5, seeds=2, widths=(8, 16))




def gram(model, X):
    """K = J J^T over the trained parameters by torch.func.jacrev (independent of minintk.engine)."""
    theta = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    J = jacrev(lambda th: functional_call(model, th, (X,)))(theta)
    J = torch.cat([v.reshape(X.shape[0], -1) for v in J.values()], 1)
    return J @ J.T


def test_reduced_scan_slopes_have_the_sign_pattern_of_the_theory():
    """Issue acceptance: under the NTK parameterization (1/d attention, random start) the K_0 spread, the kernel
    drift, the weight movement and the linearization error all shrink with width; drift and movement significantly."""
    cfg = ScanConfig(widths=(8, 16, 32, 64), seeds=2, variants=(NTK_RANDOM,), n_layer=1, n_head=2, vocab_size=16,
                     seq_len=4, n_train=8, n_test=8, teacher_width=16, times=(1.0, 2.0), lr=0.2)
    summary = W.summarize(cfg, W.scan(cfg, progress=False))
    m = summary["variants"][NTK_RANDOM.key]["metrics"]
    slopes = {k: m[k]["fit"]["slope"] for k in ("spread", "drift", "movement", "lin_error")}
    assert all(s < 0 for s in slopes.values()), f"slopes against width: {slopes}"
    for k in ("drift", "movement"):
        assert m[k]["fit"]["ci"][1] < 0, f"{k}: slope {m[k]['fit']['slope']:.3f}, interval {m[k]['fit']['ci']}"
    assert m["movement"]["fit"]["n_points"] == 8 and len(m["drift"]["by_time"]) == 2
    assert "| theory |" in R.summary_markdown(summary)


def test_measure_against_parameter_space_training_and_jacrev_kernels():
    """measure's linearized model (closed form on the NTK) is linearize's f_lin trained by the same gradient descent;
    its drift, movement and K_0 are those of jacrev Jacobians and of the network trained in one piece."""
    cfg = ScanConfig(**TINY)
    model = W.student(cfg, NTK_RANDOM, 16, 0, vocab=8, seq_len=3).double()
    assert not model.head.bias.requires_grad, "zero-multiplier parameters are outside theta"
    task = W.teacher_task(replace_n(cfg, 6, 5), 7)
    alpha, steps = 0.3, (3, 8)
    rec = W.measure(copy.deepcopy(model), task, alpha, steps, curve_points=9)
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


@given(st.lists(st.sampled_from([8, 16, 32, 64, 128]), min_size=3, max_size=12),
       st.lists(st.floats(-3, 3), min_size=12, max_size=12))
def test_fit_slope_is_ordinary_least_squares_on_log_log_axes(widths, logs):
    v = np.exp(np.array(logs[: len(widths)]))
    fit = W.fit_slope(widths, v, level=0.9)
    if len(set(widths)) < 3:
        assert fit is None, "an interval from fewer than 3 widths is not a power-law fit"
        return
    assume(np.ptp(v[: len(widths)]) > 1e-9)  # linregress's stderr is NaN for constant values (ours: 0)
    ref = linregress(np.log(widths), np.log(v))
    q = student_t.ppf(0.95, len(widths) - 2)
    assert fit.slope == pytest.approx(ref.slope, abs=1e-9) and fit.se == pytest.approx(ref.stderr, abs=1e-9)
    assert fit.ci == pytest.approx((ref.slope - q * ref.stderr, ref.slope + q * ref.stderr), abs=1e-8)


def test_fit_slope_recovers_a_power_law_and_skips_unusable_points():
    w = np.array([32, 64, 128, 256, 32, 64])
    fit = W.fit_slope(w, 3.0 * w**-0.5)
    assert fit.slope == pytest.approx(-0.5, abs=1e-12) and np.exp(fit.intercept) == pytest.approx(3.0)
    assert W.fit_slope([32, 64, 128], [1.0, 0.0, np.nan]) is None, "zeros and NaN cannot enter a log-log fit"
    with pytest.raises(WidthScanError, match="paired"):
        W.fit_slope([32, 64], [1.0])


@given(st.integers(2, 6), st.integers(2, 5), st.floats(0.01, 2.0))
def test_spread_of_symmetric_perturbations(n, seeds, scale):
    """K_s = K + c_s E with sum_s c_s = 0: the mean is K and seed s deviates by |c_s| ||E|| / ||K||."""
    rng = np.random.default_rng(n * seeds)
    A, E = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    K = A @ A.T + n * np.eye(n)
    c = scale * rng.standard_normal(seeds)
    c -= c.mean()
    got = W.spread([K + ci * E for ci in c])
    assert np.allclose(got, np.abs(c) * np.linalg.norm(E) / np.linalg.norm(K), rtol=1e-10, atol=1e-14)


def test_verdicts():
    def s(lo, hi):
        return Slope((lo + hi) / 2, (lo, hi), 0.1, 0.0, 1.0, 10, 0.95)

    assert W.verdict(s(-0.7, -0.3), -0.5) == "matches"
    assert W.verdict(s(-1.2, -0.8), -0.5) == "steeper"
    assert W.verdict(s(-0.4, -0.1), -0.5) == "shallower"
    assert W.verdict(s(-0.4, 0.1), -0.5) == "no significant decay"
    assert W.verdict(s(0.1, 0.4), -0.5) == "grows"
    assert W.verdict(s(-0.4, -0.1), None) == "decays" and W.verdict(None, -0.5) == "no fit"


def test_variants_star_and_product():
    base = W.star(("ntk", "standard"), ("1/d", "1/sqrt(d)"), ("random", "pretrained", "linear_head"))
    assert [v.key for v in base] == ["ntk|1/d|random", "standard|1/d|random", "ntk|1/sqrt(d)|random",
                                     "ntk|1/d|pretrained", "ntk|1/d|linear_head"]
    assert len(W.star(("ntk", "standard"), ("1/d", "1/sqrt(d)"), ("random", "pretrained"), product=True)) == 8
    assert Variant.from_key("standard|1/sqrt(d)|linear_head") == Variant("standard", "1/sqrt(d)", "linear_head")


@pytest.mark.parametrize("bad, match", [
    (dict(widths=(12, 30)), "multiples of n_head"),
    (dict(seeds=1), ">= 2 seeds"),
    (dict(times=(0.3,), lr=0.25), "multiples of lr"),
    (dict(times=(5.0, 2.5)), "increasing"),
    (dict(variants=("ntk|1/d|warm",)), "unknown start"),
    (dict(variants=("ntk|none|random",)), "unknown attn_scale"),
    (dict(lr=-1.0), "lr must be a positive number"),
])
def test_bad_settings_are_clear_errors(bad, match):
    with pytest.raises(WidthScanError, match=match):
        ScanConfig(**bad)
    with pytest.raises(WidthScanError, match="unknown preset"):
        W.preset("tpu")


def test_presets():
    gpu = W.preset("gpu")
    assert max(gpu.widths) >= 2048 and gpu.device == "cuda" and gpu.budget_s is not None
    cpu = W.preset("cpu")
    assert (min(cpu.widths), max(cpu.widths)) == (32, 512) and cpu.device == "cpu" and len(cpu.variants) == 5
    assert W.preset("cpu", lr=None, seeds=4).seeds == 4, "None overrides keep the preset's value"


def test_pretrained_and_linear_head_starts():
    cfg = ScanConfig(**(TINY | dict(lr=0.1, times=(0.5,), pretrain_time=2.0)))
    target, source, vocab = W.tasks(cfg)
    model = W.student(cfg, NTK_RANDOM, 8, 0, vocab, 3)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    theta_pre, move = W.pretrain(model, source, 0.25, 8)
    d = torch.cat([(theta_pre[k] - init[k]).reshape(-1) for k in theta_pre]).norm()
    assert move == pytest.approx(float(d / torch.cat([init[k].reshape(-1) for k in theta_pre]).norm()), rel=1e-5)
    assert move > 0 and torch.equal(model.blocks[0].mlp.c_fc.weight, theta_pre["blocks.0.mlp.c_fc.weight"])
    W.fresh_head(model, 3)
    changed = {k for k, v in theta_pre.items() if not torch.equal(model.get_parameter(k), v)}
    assert changed == {"head.weight"}, f"a fresh head changes the head only, changed {changed}"
    cache: dict = {}
    recs = [W.run_one(cfg, Variant("ntk", "1/d", s), 16, 0, target, source, vocab, cache)
            for s in ("pretrained", "linear_head")]
    assert len(cache) == 1 and recs[0]["pretrain_move"] == recs[1]["pretrain_move"] > 0
    assert not np.allclose(recs[0]["K0"], recs[1]["K0"])


def test_resumes_without_recomputing(tmp_path, monkeypatch):
    cfg = ScanConfig(**(TINY | dict(variants=(NTK_RANDOM, Variant("ntk", "1/d", "pretrained")))))
    calls, interrupt = [], [3]  # interrupt the first scan at its third run
    real = W.run_one

    def counted(cfg, variant, width, seed, *rest):
        calls.append((variant.start, width, seed))
        if len(calls) == interrupt[0]:
            interrupt[0] = 0
            raise KeyboardInterrupt
        return real(cfg, variant, width, seed, *rest)

    monkeypatch.setattr(W, "run_one", counted)
    with pytest.raises(KeyboardInterrupt):
        W.run_scan(cfg, tmp_path, progress=False)
    saved = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert len(saved) == 2, "every finished run is on disk after an interruption"
    calls.clear()
    summary = W.run_scan(cfg, tmp_path, progress=False)
    assert len(calls) == 6 and ("random", 8, 0) not in calls and summary["variants"][NTK_RANDOM.key]["runs"] == 4
    calls.clear()
    W.run_scan(ScanConfig(**(cfg.to_dict() | {"widths": (8, 16, 32)})), tmp_path, progress=False)
    assert sorted(calls) == sorted((s, 32, k) for s in ("random", "pretrained") for k in range(2))
    for name in ("summary.md", "summary.json", "spread.png", "drift.png", "losses.png", "pretrain_move.png"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "drift.png").read_bytes()[:8] == PNG
    with pytest.raises(WidthScanError, match="other settings.*lr"):
        W.run_scan(ScanConfig(**(cfg.to_dict() | {"lr": 0.5, "times": (0.5,)})), tmp_path, progress=False)


@pytest.mark.parametrize("budget, done, stop", [(5.0, 2, "width 16 not started (estimated 8 s"),
                                                 (1.5, 2, "spent: stopped before ntk|1/d|random|d=16|seed=0"),
                                                 (0.5, 1, "spent: stopped before ntk|1/d|random|d=8|seed=1")])
def test_budget_stops_the_scan(monkeypatch, budget, done, stop):
    """On a clock where every run takes 1 s: width 8 costs 2 s, so width 16 is estimated at 2 runs x 1 s x 2^2."""
    clock = [0.0]

    def one_second(cfg, v, w, s, *rest):
        clock[0] += 1.0
        return {"variant": v.key, "width": w, "seed": s}

    monkeypatch.setattr(W, "run_one", one_second)
    monkeypatch.setattr(W.time, "perf_counter", lambda: clock[0])
    runs = W.scan(ScanConfig(**(TINY | dict(variants=(NTK_RANDOM,), budget_s=budget))), progress=False)
    assert len(runs) == done + 1 and stop in runs["_stopped"], runs["_stopped"]


def test_out_of_gpu_memory_stops_the_scan_without_recording_the_run(monkeypatch):
    def oom_at_16(cfg, v, w, s, *rest):
        if w == 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"variant": v.key, "width": w, "seed": s}

    monkeypatch.setattr(W, "run_one", oom_at_16)
    runs = W.scan(ScanConfig(**(TINY | dict(variants=(NTK_RANDOM,)))), progress=False)
    assert sorted(k for k in runs if k != "_stopped") == [f"ntk|1/d|random|d=8|seed={s}" for s in (0, 1)]
    assert "out of GPU memory at ntk|1/d|random|d=16|seed=0" in runs["_stopped"]


def test_unstable_runs_are_reported():
    bad = ScanConfig(**(TINY | dict(variants=(NTK_RANDOM,), lr=16.0, times=(16.0,), pretrain_time=16.0)))
    summary = W.summarize(bad, W.scan(bad, progress=False))
    assert len(summary["failed"]) == 4 and all("unstable" in e for e in summary["failed"].values())
    assert "Failed runs" in R.summary_markdown(summary)


def test_task_files(tmp_path):
    X = np.random.default_rng(0).integers(0, 20, (10, 5))
    y = np.linspace(-1, 1, 10)
    np.savez(tmp_path / "half.npz", X=X, y=y)
    t = W.load_task(tmp_path / "half.npz")
    assert t.X.shape == (5, 5) and t.X_test.shape == (5, 5) and t.y.dtype == torch.float32
    np.savez(tmp_path / "split.npz", X=X, y=y, X_test=X[:3], y_test=y[:3])
    assert W.load_task(tmp_path / "split.npz").X.shape == (10, 5)
    np.savez(tmp_path / "float.npz", X=X.astype(float), y=y)
    with pytest.raises(WidthScanError, match="integer token ids"):
        W.load_task(tmp_path / "float.npz")
    np.savez(tmp_path / "short.npz", X=X, y=y[:4], X_test=X, y_test=y)
    with pytest.raises(WidthScanError, match="one target per sequence"):
        W.load_task(tmp_path / "short.npz")
    np.savez(tmp_path / "keys.npz", ids=X)
    with pytest.raises(WidthScanError, match="needs arrays 'X'"):
        W.load_task(tmp_path / "keys.npz")
    (tmp_path / "half.npy").touch()
    with pytest.raises(WidthScanError, match="unknown task format"):
        W.load_task(tmp_path / "half.npy")
    cfg = ScanConfig(**(TINY | dict(data=str(tmp_path / "half.npz"))))
    target, source, vocab = W.tasks(cfg)
    assert vocab == 20 and source.X.shape[1] == 5 and int(source.X.max()) < 20


def test_cli_width_scan(tmp_path, capsys):
    out = tmp_path / "scan"
    args = ["width-scan", "--widths", "8", "16", "--seeds", "2", "--parameterization", "ntk", "--attn-scale", "1/d",
            "--start", "random", "--n-train", "4", "--n-test", "4", "--times", "0.5", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| ntk, 1/d, random |" in text and "summary.md" in text, text
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == {"ntk|1/d|random"} and summary["config"]["widths"] == [8, 16]
    assert (out / "movement.png").read_bytes()[:8] == PNG
    assert main(args[:2] + ["6", "10"] + args[4:]) == 2
    assert "multiples of n_head" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["width-scan", "--preset", "gpu", "--out", str(tmp_path / "g"), "--no-progress"]) == 2
        assert "no CUDA" in capsys.readouterr().err
