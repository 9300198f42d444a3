"""Two versions of the engine side by side in one process: the same cases, calls alternating A/B/B/A, so that
host and clock drift fall on both. For refactors that must not slow anything down (issue 18).

The other version is a copy of the package renamed `minintk_before` (its imports are relative), e.g.
    git archive <commit> minintk kernels | tar -x -C /tmp/v && mv /tmp/v/kernels /tmp/v/minintk/kernels
    mv /tmp/v/minintk /tmp/v/minintk_before
    python benchmarks/engine_ab.py --before /tmp/v --cases 125M:64:128:fp32,1.3B:1024:128:bf16

Each case builds the GPT-Neo architecture (random weights, label-word logit difference) once per version with
the same weights, warms both up (the probe), then times `rounds` calls of each. Writes <out>.md and .json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import minintk
from minintk.config import gpt_neo_config


def build(pkg, size: str, state: dict | None):
    cfg = gpt_neo_config(size, head="label_words", label_ids=(3, 7), label_diff=True)
    cfg = pkg.DecoderConfig(**{k: v for k, v in cfg.to_dict().items() if k in pkg.DecoderConfig.__dataclass_fields__})
    with torch.device("cuda"):
        m = pkg.Decoder(cfg)
    if state is not None:
        m.load_state_dict(state)
    return m.eval()


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def case(before, size: str, n: int, T: int, precision: str, rounds: int) -> dict:
    torch.manual_seed(0)
    a = build(minintk, size, None)
    b = build(before, size, a.state_dict())
    X = torch.randint(0, a.cfg.vocab_size, (n, T), device="cuda")
    ntk_b = importlib.import_module("minintk_before.engine").ntk

    def after():
        return minintk.ntk(a, X, precision=precision, progress=False)

    def earlier():
        return ntk_b(b, X, precision=precision, progress=False)

    calls = {"after": after, "before": earlier}
    Ka, Kb = calls["after"](), calls["before"]()  # the warm-up calls, and the same Gram (or how far apart)
    same, diff = torch.equal(Ka, Kb), ((Ka - Kb).norm() / Kb.norm()).item()
    del Ka, Kb
    times: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(rounds):
        for v in (("before", "after") if r % 2 == 0 else ("after", "before")):
            times[v].append(timed(calls[v]))
    row = {"model": f"GPT-Neo-{size}", "n": n, "T": T, "precision": precision, "rounds": rounds,
           "identical_gram": same, "rel_diff": diff}
    for v in ("before", "after"):
        row[f"{v}_min_s"], row[f"{v}_median_s"] = min(times[v]), statistics.median(times[v])
    row["ratio_min"] = row["after_min_s"] / row["before_min_s"]
    row["ratio_median"] = row["after_median_s"] / row["before_median_s"]
    torch.cuda.empty_cache()
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="folder holding the package minintk_before")
    ap.add_argument("--cases", default="125M:64:128:fp32,125M:64:128:tf32,125M:64:128:bf16,125M:256:8:fp32")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/engine_ab")
    args = ap.parse_args()
    sys.path.insert(0, args.before)
    before = importlib.import_module("minintk_before")
    rows = []
    for spec in args.cases.split(","):
        size, n, T, precision = spec.split(":")
        rows.append(case(before, size, int(n), int(T), precision, args.rounds if size != "1.3B" else 3))
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    lines = [f"# Engine before/after, one process, calls alternating ({meta['gpu']}, torch {meta['torch']}, "
             f"CUDA {meta['cuda']})", "",
             "| model | n | T | precision | rounds | before min / median s | after min / median s | "
             "after/before (min, median) | same Gram (relative difference) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['n']} | {r['T']} | {r['precision']} | {r['rounds']} | "
                     f"{r['before_min_s']:.4f} / {r['before_median_s']:.4f} | {r['after_min_s']:.4f} / "
                     f"{r['after_median_s']:.4f} | {r['ratio_min']:.3f}, {r['ratio_median']:.3f} | "
                     f"{'yes' if r['identical_gram'] else 'no'} ({r['rel_diff']:.1e}) |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
