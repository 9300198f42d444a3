"""`minintk width-scan` and `minintk paper`: a reduced scan into its report folder, paper errors, re-rendering and
the export of the offline data."""

import json

import pytest
import torch
from test_data import install_offline_packages, write_offline

from minintk.cli import main

PNG = b"\x89PNG\r\n\x1a\n"
# torch's forward-mode AD loads its jvp decompositions through torch.jit.script, which warns on torch >= 2.9
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),
]


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


def test_cli_renders_exports_and_explains_errors(tmp_path, capsys, monkeypatch):
    data = write_offline(tmp_path / "data", n_extra=10)
    assert main(["paper", "--tasks", "sst5", "--data-dir", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "unknown tasks ['sst5']" in capsys.readouterr().err
    assert main(["paper", "--tv-size", "7", "--data-dir", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "tv_size=7 must be one of the sizes" in capsys.readouterr().err
    assert main(["paper", "--render", str(tmp_path / "nothing")]) == 2
    monkeypatch.syspath_prepend(str(install_offline_packages(tmp_path / "site", data)))
    monkeypatch.delenv("MININTK_DATA", raising=False)
    assert main(["paper", "--export-data", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "kjv.jsonl").read_text() == (data / "kjv.jsonl").read_text()


def test_agree_refuses_regression_tasks(capsys):
    from minintk.cli import main

    assert main(["agree", "--tasks", "vader", "afinn-sign", "--out", "/nonexistent/agree"]) == 2
    err = capsys.readouterr().err
    assert "['vader'] are regression tasks" in err and "vader-sign" in err


def test_agree_settings_and_an_existing_report_are_refused_in_one_line(tmp_path, capsys):
    from minintk.cli import main

    assert main(["agree", "--n-train", "1", "--out", str(tmp_path / "a")]) == 2
    assert "n_train=1: expected an integer >= 4" in capsys.readouterr().err
    assert main(["agree", "--seeds", "0", "--out", str(tmp_path / "a")]) == 2
    assert "seeds=0: expected an integer >= 1" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text("{}")
    assert main(["agree", "--out", str(tmp_path / "b")]) == 2
    assert "already holds a report" in capsys.readouterr().err
