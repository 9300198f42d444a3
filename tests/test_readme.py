"""The README's examples run as written: its Python blocks and its `minintk ...` command lines, in a folder that
holds what they name (a GPT-Neo folder with a tokenizer, reviews.txt, ratings.txt)."""

import re
import shlex
from pathlib import Path

import pytest
from conftest import REVIEWS, make_gpt_neo_with_tokenizer

from minintk.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_examples():
    assert len(blocks("python")) >= 1 and any(line.startswith("minintk ") for b in blocks("bash")
                                                for line in b.splitlines())


def test_readme_examples_run_as_written(tmp_path, monkeypatch, capsys):
    make_gpt_neo_with_tokenizer(tmp_path / "gpt-neo-125M")
    (tmp_path / "reviews.txt").write_text("\n".join(REVIEWS) + "\n")
    (tmp_path / "ratings.txt").write_text("\n".join(str(r) for r in (4.5, 1.0, 3.0, 4.0, 0.5, 5.0, 1.5)) + "\n")
    monkeypatch.chdir(tmp_path)
    for code in blocks("python"):
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    commands = [line for b in blocks("bash") for line in b.splitlines() if line.startswith("minintk ")]
    for line in commands:
        rc = main(shlex.split(line)[1:])
        assert rc == 0, f"`{line}` exited {rc}: {capsys.readouterr().err[-2000:]}"
    for made in ("grams/reviews/gram.safetensors", "reports/reviews-gram-spectrum/spectrum.json",
                 "reports/reviews-gram-stop/stop.json"):
        assert (tmp_path / made).is_file(), f"the README's commands did not write {made}"


@pytest.mark.parametrize("line", ["minintk stop grams/reviews/gram.safetensors --y ratings.txt --sigma auto"])
def test_a_second_run_never_overwrites_a_report(tmp_path, monkeypatch, capsys, line):
    make_gpt_neo_with_tokenizer(tmp_path / "gpt-neo-125M")
    (tmp_path / "reviews.txt").write_text("\n".join(REVIEWS) + "\n")
    (tmp_path / "ratings.txt").write_text("\n".join("1" for _ in REVIEWS) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split('ntk gpt-neo-125M --text reviews.txt --labels " negative, positive" --diff '
                            "--out grams/reviews")) == 0
    assert main(shlex.split(line)[1:]) == 0
    assert main(shlex.split(line)[1:]) == 0  # the default folder is taken: the second run gets its own
    assert (tmp_path / "reports" / "reviews-gram-stop" / "stop.json").is_file()
    assert (tmp_path / "reports" / "reviews-gram-stop-2" / "stop.json").is_file()
    capsys.readouterr()
    explicit = shlex.split(line)[1:] + ["--out", "reports/reviews-gram-stop"]
    assert main(explicit) == 2
    err = capsys.readouterr().err
    assert "already holds a report (stop.json); pass --force" in err and len(err.strip().splitlines()) == 1
    assert main(explicit + ["--force"]) == 0
