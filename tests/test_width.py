"""Width scans (minintk.width): the theory's sign pattern on a reduced scan, resumes, the time budget, failures."""

import json
import time

import pytest
import torch
from conftest import TINY_SCAN

from minintk import width
from minintk.width import run_scan, scan, summarize
from minintk.width_config import ScanConfig, Variant, WidthScanError
from minintk.width_report import summary_markdown

# torch's forward-mode AD loads its jvp decompositions through torch.jit.script, which warns on torch >= 2.9
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]
PNG = b"\x89PNG\r\n\x1a\n"
NTK_RANDOM = Variant("ntk", "1/d", "random")


def test_reduced_scan_slopes_have_the_sign_pattern_of_the_theory():
    """Issue acceptance: under the NTK parameterization (1/d attention, random start) the K_0 spread, the kernel
    drift, the weight movement and the linearization error all shrink with width; drift and movement significantly."""
    cfg = ScanConfig(widths=(8, 16, 32, 64), seeds=2, variants=(NTK_RANDOM,), n_layer=1, n_head=2, vocab_size=16,
                     seq_len=4, n_train=8, n_test=8, teacher_width=16, times=(1.0, 2.0), lr=0.2)
    summary = summarize(cfg, scan(cfg, progress=False))
    m = summary["variants"][NTK_RANDOM.key]["metrics"]
    slopes = {k: m[k]["fit"]["slope"] for k in ("spread", "drift", "movement", "lin_error")}
    assert all(s < 0 for s in slopes.values()), f"slopes against width: {slopes}"
    for k in ("drift", "movement"):
        assert m[k]["fit"]["ci"][1] < 0, f"{k}: slope {m[k]['fit']['slope']:.3f}, interval {m[k]['fit']['ci']}"
    assert m["movement"]["fit"]["n_points"] == 8 and len(m["drift"]["by_time"]) == 2
    assert "| theory |" in summary_markdown(summary)


def test_resumes_without_recomputing(tmp_path, monkeypatch):
    cfg = ScanConfig(**(TINY_SCAN | dict(variants=(NTK_RANDOM, Variant("ntk", "1/d", "pretrained")))))
    calls, interrupt = [], [3]  # interrupt the first scan at its third run
    real = width.run_one

    def counted(cfg, variant, width, seed, *rest):
        calls.append((variant.start, width, seed))
        if len(calls) == interrupt[0]:
            interrupt[0] = 0
            raise KeyboardInterrupt
        return real(cfg, variant, width, seed, *rest)

    monkeypatch.setattr(width, "run_one", counted)
    with pytest.raises(KeyboardInterrupt):
        run_scan(cfg, tmp_path, progress=False)
    saved = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert len(saved) == 2, "every finished run is on disk after an interruption"
    calls.clear()
    summary = run_scan(cfg, tmp_path, progress=False)
    assert len(calls) == 6 and ("random", 8, 0) not in calls and summary["variants"][NTK_RANDOM.key]["runs"] == 4
    calls.clear()
    run_scan(ScanConfig(**(cfg.to_dict() | {"widths": (8, 16, 32)})), tmp_path, progress=False)
    assert sorted(calls) == sorted((s, 32, k) for s in ("random", "pretrained") for k in range(2))
    for name in ("summary.md", "summary.json", "spread.png", "drift.png", "losses.png", "pretrain_move.png"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "drift.png").read_bytes()[:8] == PNG
    with pytest.raises(WidthScanError, match="other settings.*lr"):
        run_scan(ScanConfig(**(cfg.to_dict() | {"lr": 0.5, "times": (0.5,)})), tmp_path, progress=False)


@pytest.mark.parametrize("budget, done, stop", [(5.0, 2, "width 16 not started (estimated 8 s"),
                                                 (1.5, 2, "spent: stopped before ntk|1/d|random|d=16|seed=0"),
                                                 (0.5, 1, "spent: stopped before ntk|1/d|random|d=8|seed=1")])
def test_budget_stops_the_scan(monkeypatch, budget, done, stop):
    """On a clock where every run takes 1 s: width 8 costs 2 s, so width 16 is estimated at 2 runs x 1 s x 2^2."""
    clock = [0.0]

    def one_second(cfg, v, w, s, *rest):
        clock[0] += 1.0
        return {"variant": v.key, "width": w, "seed": s}

    monkeypatch.setattr(width, "run_one", one_second)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    runs = scan(ScanConfig(**(TINY_SCAN | dict(variants=(NTK_RANDOM,), budget_s=budget))), progress=False)
    assert len(runs) == done + 1 and stop in runs["_stopped"], runs["_stopped"]


def test_out_of_gpu_memory_stops_the_scan_without_recording_the_run(monkeypatch):
    def oom_at_16(cfg, v, w, s, *rest):
        if w == 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"variant": v.key, "width": w, "seed": s}

    monkeypatch.setattr(width, "run_one", oom_at_16)
    runs = scan(ScanConfig(**(TINY_SCAN | dict(variants=(NTK_RANDOM,)))), progress=False)
    assert sorted(k for k in runs if k != "_stopped") == [f"ntk|1/d|random|d=8|seed={s}" for s in (0, 1)]
    assert "out of GPU memory at ntk|1/d|random|d=16|seed=0" in runs["_stopped"]


def test_unstable_runs_are_reported():
    bad = ScanConfig(**(TINY_SCAN | dict(variants=(NTK_RANDOM,), lr=16.0, times=(16.0,), pretrain_time=16.0)))
    summary = summarize(bad, scan(bad, progress=False))
    assert len(summary["failed"]) == 4 and all("unstable" in e for e in summary["failed"].values())
    assert "Failed runs" in summary_markdown(summary)
