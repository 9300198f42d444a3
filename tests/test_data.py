"""Text tasks (minintk.data): the lexicon and hub formats parsed from small local files, deterministic disjoint
splits, the offline files found in their packages."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minintk.data import (
    FILES,
    DataError,
    Task,
    data_file,
    export_offline_data,
    kernel_sample,
    load_task,
    pretraining_text,
    read_afinn,
    read_vader,
    split,
)

VADER_LINES = [
    ":)\t2.0\t1.18322\t[2, 2, 1, 1, 1, 1, 4, 3, 4, 1]",
    "abandon\t-1.9\t0.53852\t[-1, -2, -2, -2, -2, -3, -2, -2, -1, -2]",
    "ace\t0.6\t0.66332\t[0, 1, 0, 1, 0, 0, 1, 2, 1, 0]",
    "zealous\t0.5\t1.43178\t[0, -1, 2, 0, 3, -2, 1, 2, 0, 0]",
]
AFINN_LINES = ["abandon\t-2", "cool stuff\t3", "some kind\t0", "yeah\t1"]


def write_offline(folder, n_extra: int = 0, seed: int = 0):
    """A data folder in the formats of the packages: VADER (CRLF, as shipped), AFINN, kjv.jsonl."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vader = list(VADER_LINES)
    afinn = list(AFINN_LINES)
    for i in range(n_extra):
        r = rng.integers(-4, 5, size=10)
        vader.append(f"word{i}\t{r.mean():.1f}\t{r.std():.5f}\t{json.dumps(r.tolist())}")
        afinn.append(f"term{i}\t{int(rng.choice([-3, -2, -1, 1, 2, 3]))}")
    (folder / "vader_lexicon.txt").write_bytes(("\r\n".join(vader) + "\r\n").encode())
    (folder / "AFINN-en-165.txt").write_text("\n".join(afinn) + "\n")
    verses = ["In the beginning God created the heaven and the earth.", "And God saw the light, that it was good."]
    (folder / "kjv.jsonl").write_text("\n".join(json.dumps({"citation": f"Gen 1:{i}", "text": v})
                                                for i, v in enumerate(verses * 20)) + "\n")
    return folder


def test_vader_parses_mean_and_the_noise_of_the_mean(tmp_path):
    words, mean, sd = read_vader(write_offline(tmp_path) / "vader_lexicon.txt")
    assert words == [":)", "abandon", "ace", "zealous"]
    np.testing.assert_allclose(mean, [2.0, -1.9, 0.6, 0.5])
    ratings = np.array([json.loads(line.split("\t")[3]) for line in VADER_LINES], dtype=float)
    reference = ratings.std(axis=1, ddof=1) / np.sqrt(10)  # sd of a mean of 10 ratings
    np.testing.assert_allclose(sd, reference, rtol=2e-5, err_msg=f"sd of the mean {sd} vs {reference}")


def test_afinn_and_kjv_parse(tmp_path):
    folder = write_offline(tmp_path)
    words, score = read_afinn(folder / "AFINN-en-165.txt")
    assert words == ["abandon", "cool stuff", "some kind", "yeah"] and score.tolist() == [-2, 3, 0, 1]
    text = pretraining_text(folder)
    assert text.startswith("In the beginning") and text.count("\n") == 39


def test_offline_tasks_from_a_data_dir(tmp_path):
    folder = write_offline(tmp_path, n_extra=40)
    vader = load_task("vader", folder)
    assert vader.kind == "regression" and len(vader) == 44 and vader.noise_sd.shape == (44,)
    agreed = load_task("vader-agreed", folder)
    assert len(agreed) < len(vader) and np.all(agreed.noise_sd < np.median(vader.noise_sd))
    sign = load_task("afinn-sign", folder)
    assert sign.kind == "classification" and len(sign) == 43  # "some kind" (0) dropped
    assert set(np.unique(sign.y)) == {0.0, 1.0} and sign.label_words == (" negative", " positive")
    assert sign.prompts([0]) == ["Word: abandon\nSentiment:"] and sign.y[0] == 0


def test_task_kind_is_the_loaded_tasks_kind(tmp_path):
    from minintk.data import OFFLINE_TASKS, DataError, task_kind

    folder = write_offline(tmp_path, n_extra=40)
    assert all(task_kind(t) == load_task(t, folder).kind for t in OFFLINE_TASKS)
    assert task_kind("rte") == "classification" and task_kind("stsb") == "regression"
    with pytest.raises(DataError, match="unknown task 'sst7'"):
        task_kind("sst7")


def test_missing_files_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="export-data"):
        load_task("vader", tmp_path)
    with pytest.raises(DataError, match="offline: vader"):
        load_task("sst5", tmp_path)
    (tmp_path / "AFINN-en-165.txt").write_text("abandon -2\n")
    with pytest.raises(DataError, match="word<TAB>score"):
        load_task("afinn", tmp_path)


def install_offline_packages(root: Path, data: Path) -> Path:
    """The PyPI packages that ship the offline data files, as far as minintk reads them (a package folder with the
    file at its place, FILES), written under root from the files of `data`. Put root on sys.path to use them."""
    for name, (package, rel) in FILES.items():
        (root / package / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").touch()
        shutil.copyfile(data / name, root / package / rel)
    return root


def test_files_come_from_the_installed_packages_and_export_copies_them(tmp_path, monkeypatch):
    src = write_offline(tmp_path / "data")
    monkeypatch.syspath_prepend(str(install_offline_packages(tmp_path / "site", src)))
    monkeypatch.delenv("MININTK_DATA", raising=False)
    assert data_file("kjv.jsonl") == tmp_path / "site" / "bible" / "data" / "kjv.jsonl"
    out = export_offline_data(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert load_task("afinn", out).y.tolist() == load_task("afinn", src).y.tolist()


def toy_task(n: int) -> Task:
    return Task("toy", "regression", [(f"w{i}",) for i in range(n)], np.arange(n, dtype=float), "{0}")


@given(n=st.integers(46, 300), n_val=st.integers(1, 10), n_test=st.integers(1, 15), seed=st.integers(0, 5))
def test_splits_are_deterministic_disjoint_and_nested(n, n_val, n_test, seed):
    t = toy_task(n)
    a, b = split(t, n_val, n_test), split(t, n_val, n_test)
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        np.testing.assert_array_equal(x, y)
    parts = np.concatenate([a.train, a.val, a.test])
    assert parts.size == n and np.unique(parts).size == n, "splits overlap or lose examples"
    assert a.val.size == n_val and a.test.size == n_test
    small, large = a.train_subset(5, seed), a.train_subset(20, seed)
    np.testing.assert_array_equal(small, large[:5])  # nested within a seed
    assert set(large) <= set(a.train)
    if seed:
        assert not np.array_equal(a.train_subset(20, seed), a.train_subset(20, 0))


def test_fixed_splits_draw_test_from_the_test_split():
    t = toy_task(100)
    t.fixed = {"train": np.arange(70), "test": np.arange(70, 100)}
    sp = split(t, 10, 50)
    assert set(sp.test) == set(range(70, 100)) and set(sp.train) | set(sp.val) == set(range(70))
    with pytest.raises(DataError, match="exceeds the train pool"):
        sp.train_subset(61)


def test_kernel_sample_is_seeded_and_inside_the_pool():
    t = toy_task(300)
    sp = split(t, 20, 20)
    a, b, c = (kernel_sample(t, sp, 100, draw=d) for d in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and set(a) <= set(sp.train) and np.unique(a).size == 100


# ------------------------------------------------------------------------------------- the paper's tasks, local files


def _rows(k: int, kind: str):
    rng = np.random.default_rng(k)
    return [{"sentence1": f"first sentence {i}", "sentence2": f"second {i}", "idx": i,
             "label": int(rng.integers(0, 2)) if kind == "cls" else None} for i in range(k)]


def test_glue_rte_from_local_parquet_uses_validation_as_test_and_drops_hidden_labels(tmp_path):
    datasets = pytest.importorskip("datasets")
    train, val = _rows(12, "cls"), _rows(6, "cls")
    val[0]["label"] = -1  # GLUE's hidden labels
    files = {}
    for name, rows in (("train", train), ("validation", val)):
        files[name] = tmp_path / f"rte-{name}.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(files[name]))
    t = load_task("rte", data_files=files)
    assert t.kind == "classification" and len(t) == 17 and t.label_words == (" Yes", " No")
    assert t.fixed["train"].size == 12 and t.fixed["test"].size == 5
    assert t.prompts([0])[0] == 'first sentence 0\nQuestion: does this imply "second 0"? Yes or No?\nAnswer:'
    assert t.y[:12].tolist() == [r["label"] for r in train]


def test_sts_regression_from_local_jsonl_and_tsv(tmp_path):
    pytest.importorskip("datasets")
    rows = [{"sentence1": f"a {i}", "sentence2": f"b {i}", "score": i / 2} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "test.tsv").write_text("sentence1\tsentence2\tscore\n" + "\n".join(
        f"{r['sentence1']}\t{r['sentence2']}\t{r['score']}" for r in rows[:3]))
    t = load_task("sts12", data_files={"train": tmp_path / "train.jsonl", "test": tmp_path / "test.tsv"})
    assert t.kind == "regression" and len(t) == 11 and t.y[7] == 3.5 and t.y[8:].tolist() == [0.0, 0.5, 1.0]
    assert t.prompts([1])[0] == "Sentence 1: a 1\nSentence 2: b 1\nSimilarity (0 to 5):"


def test_amazon_reads_at_most_max_rows_and_names_missing_columns(tmp_path):
    pytest.importorskip("datasets")
    rows = [{"label": i % 2, "title": f"t{i}", "content": f"c{i}"} for i in range(5)]
    for s in ("train", "test"):
        (tmp_path / f"{s}.json").write_text("\n".join(json.dumps(r) for r in rows))
    t = load_task("amazon", data_files={"train": tmp_path / "train.json", "test": tmp_path / "test.json"})
    assert len(t) == 10 and t.prompts([3]) == ["Review: t3. c3\nSentiment:"] and t.y[3] == 1
    (tmp_path / "bad.json").write_text(json.dumps({"text": "x", "label": 1}))
    with pytest.raises(DataError, match="lacks columns"):
        load_task("amazon", data_files={"train": tmp_path / "bad.json", "test": tmp_path / "bad.json"})
    with pytest.raises(DataError, match="unknown format"):
        load_task("cr", data_files={"train": tmp_path / "x.xlsx", "test": tmp_path / "x.xlsx"})
