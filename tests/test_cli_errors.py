"""Every user error of every subcommand: exit code 2, one line on stderr naming the bad value, no traceback
(--debug shows it)."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import REVIEWS, make_gpt_neo_with_tokenizer

from minintk.cli import main

CASES = [  # (argv, what the line must say)
    ("info /no/such/folder", "no such file or folder: /no/such/folder"),
    ("info EleutherAI/gpt-neo-125M", "hf download EleutherAI/gpt-neo-125M"),
    ("info empty", "has no config.json"),
    ("info tiny --attn-scale 2", "unknown attn_scale '2'"),
    ("spectrum nope.npy", "nope.npy: no such file"),
    ("spectrum K.npy --range a:b", "--range must be FIRST:LAST"),
    ("spectrum K.npy --sigma -1", "--sigma must be positive"),
    ("stop K.npy --y y3.npy --sigma 1", "--y has 3 values but the Gram is 4 x 4"),
    ("stop K.npy --y y4.npy --sigma x", "--sigma must be a positive number or 'auto', got 'x'"),
    ("stop K.npy --y y4.npy --sigma 1 --alpha -2", "alpha must be a positive"),
    ("ntk tiny random:8 --labels 3 --out o", "bad data 'random:8'"),
    ("ntk tiny random:8:4 --out o", "give label words or token ids"),
    ("ntk tiny random:8:4 --labels ' positive, negative' --out o", "are words: they need a tokenizer"),
    ("ntk tiny --text nope.txt --labels 1 --out o", "nope.txt: no such text file"),
    ("ntk tiny --text reviews.txt --labels 1 --out o", "has no tokenizer"),
    ("ntk neo --text reviews.txt --labels ' wonderful film' --out o", "label word ' wonderful film' is"),
    ("ntk neo --text rows.jsonl --labels ' positive' --out o", "rows.jsonl, line 1: expected a JSON object"),
    ("ntk tiny random:8:4 --labels 1 --precision fp16 --out o", "unknown precision 'fp16'"),
    ("ntk tiny random:8:4 --labels 1 --max-memory lots --out o", "--max-memory must be bytes"),
    ("ntk tiny random:8:4 --labels 1", "give MODEL DATA --out FOLDER"),
    ("ntk --status nowhere", "nowhere"),
    ("width-scan --threads 0", "--threads must be >= 1, got 0"),
    ("width-scan --preset huge", "unknown preset 'huge'"),
    ("paper --preset huge", "unknown preset 'huge'"),
    ("paper --tasks nope --quick", "unknown tasks ['nope']"),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    np.save("K.npy", np.eye(4))
    np.save("y3.npy", np.ones(3))
    np.save("y4.npy", np.ones(4))
    (tmp_path / "empty").mkdir()
    (tmp_path / "reviews.txt").write_text("\n".join(REVIEWS) + "\n")
    (tmp_path / "rows.jsonl").write_text('["not an object"]\n')
    make_gpt_neo_with_tokenizer(tmp_path / "neo")
    return tmp_path


@pytest.mark.parametrize("argv,says", CASES, ids=[c[0] for c in CASES])
def test_user_errors_are_one_line(workdir, capsys, argv, says):
    import shlex

    args = shlex.split(argv)
    assert main(args) == 2, f"`minintk {argv}` did not exit 2"
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"minintk {args[0]}: error: ") and len(err.splitlines()) == 1, err
    assert says in err and "Traceback" not in err, err


def test_the_installed_command_prints_no_traceback_and_debug_does(workdir):
    run = [sys.executable, "-m", "minintk.cli", "info", "/no/such/folder"]
    r = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "minintk info: error: no such file or folder: /no/such/folder"
    r = subprocess.run(run + ["--debug"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "CheckpointError" in r.stderr


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["ntk", "--help"])
    text = capsys.readouterr().out
    assert "(default: 256)" in text and "(default: fp32)" in text
