"""NTK Gram throughput on one GPU: minintk's layerwise engine vs the peers (`loop`, `torch.func`).

Check first, then time, in the same run (STYLE.md): every method is compared with an fp64 reference on a
small case; then each (model, n, T, precision, method) is timed with the GPU's own matmul peaks measured in
the same run. Flops are counted as 6 P n T + 2 n^2 P (forward/backward + the Gram). Weights are random
(GPT-Neo architectures): weights do not change the cost.

    python benchmarks/ntk_throughput.py --out benchmarks/results/ntk_throughput            # full
    python benchmarks/ntk_throughput.py --quick --out /tmp/ntk_quick                        # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from minintk import Decoder
from minintk.config import gpt_neo_config
from minintk.engine import CostModel, NTKError, Stats, default_budget, ntk, plan

LABELS = (352, 2089)  # two label-word ids (any pair: cost does not depend on them)


def matmul_peak(dtype: torch.dtype, tf32: bool = False, size: int = 8192) -> float:
    """Measured dense matmul TFLOP/s of this GPU for dtype (fp32 with TF32 on or off)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * size**3 * reps / (time.perf_counter() - t) / 1e12


def build(size: str, T: int, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    cfg = gpt_neo_config(size, head="label_words", label_ids=LABELS, label_diff=True)
    with torch.device("cuda"):
        model = Decoder(cfg)
    return model.eval()


MAX_MEMORY = None  # bytes: minintk's memory budget (--max-memory); None: its default
FORM_SECONDS = False  # --form-seconds: seconds per contraction form (synchronizing after each layer)


def run(model, X, precision, method, stats=None):
    """One call of `method`: minintk eager (cuda_graph=False), minintk-graph (cuda_graph=True: the first call
    records the CUDA graph, later ones replay it), or a per-sample reference."""
    strategy = {"minintk": "auto", "minintk-graph": "auto", "loop": "loop", "func": "func"}[method]
    budget = MAX_MEMORY if method.startswith("minintk") else None
    return ntk(model, X, precision=precision, strategy=strategy, progress=False, stats=stats, max_memory=budget,
               cuda_graph=method == "minintk-graph")


def timed(model, X, precision, method, repeats: int, warmup: bool = True):
    """(seconds, peak GiB, K, stats, warm-up s) of the best of `repeats` runs after a warm-up.

    The warm-up is a full call (warmup=True), or for large cases a call on 2 samples: it pays the one-time
    costs (the engine's discovery of the model's layers, kernel autotuning, the allocator's first cudaMallocs)
    without a second large run. Each method starts from an empty allocator cache; the timed calls are steady
    state (no `empty_cache` between them: a cudaMalloc of GiBs per call would be timed otherwise).
    """
    best, K, stats, warm = None, None, None, None
    torch.cuda.empty_cache()
    if not warmup:
        torch.cuda.synchronize()
        t = time.perf_counter()
        run(model, X[:2], precision, method)
        torch.cuda.synchronize()
        warm = time.perf_counter() - t
    for r in range(0 if warmup else 1, repeats + 1):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        s = Stats(time_forms=FORM_SECONDS)  # per-form seconds: a sync per layer
        t = time.perf_counter()
        K = run(model, X, precision, method, stats=s if method.startswith("minintk") else None)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if r == 0:
            warm = dt
        if r > 0 and (best is None or dt < best):
            best, stats = dt, s
        peak = torch.cuda.max_memory_allocated() / 2**30
    return best, peak, K, stats, warm


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(methods, precisions) -> list[dict]:
    """Every method and precision against the fp64 reference on a small GPT-Neo-like model."""
    torch.manual_seed(0)
    cfg = gpt_neo_config("tiny", head="label_words", label_ids=(3, 7), label_diff=True)
    with torch.device("cuda"):
        m = Decoder(cfg)
    X = torch.randint(0, cfg.vocab_size, (12, 32), device="cuda")
    ref = ntk(m, X, precision="fp64", strategy="func", progress=False)
    rows = []
    for method in methods:
        for p in ["fp64"] + list(precisions):
            K = run(m, X, p, method)
            rows.append({"method": method, "precision": p, "rel_err_vs_fp64_func": rel(K, ref)})
            print(f"check {method:8s} {p:5s} rel err {rows[-1]['rel_err_vs_fp64_func']:.2e}", flush=True)
    rows += check_segmented(m, X, ref)
    if "minintk-graph" in methods:
        rows += check_graph(m, cfg.vocab_size)
    return rows


def check_graph(m, vocab: int) -> list[dict]:
    """Replays of a recorded CUDA graph on new inputs (left-padded by a mask that differs from the recorded call)
    against the eager engine on the same inputs."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(1)
    X = [torch.randint(0, vocab, (12, 32), device="cuda", generator=g) for _ in range(3)]
    masks = [torch.ones(12, 32, dtype=torch.long, device="cuda") for _ in range(3)]
    for k, mask in enumerate(masks):
        mask[: 4 * k, : 3 + 5 * k] = 0  # left padding, different on every call
    m64 = copy.deepcopy(m).double()  # ntk converts per call otherwise, and a per-call copy is never graphed
    for p in ("fp64", "fp32", "bf16"):
        mp, errs = (m64 if p == "fp64" else m), []
        for i, (x, mask) in enumerate(zip(X, masks)):
            inputs = {"input_ids": x, "attention_mask": mask}
            stats = Stats()
            got = ntk(mp, inputs, precision=p, progress=False, cuda_graph=True, stats=stats)  # 0 records, 1-2 replay
            replayed = "graph replay" in stats.seconds
            if i > 0:
                errs.append(rel(got, ntk(mp, inputs, precision=p, progress=False, cuda_graph=False)))
        label = "minintk-graph replay vs eager" + ("" if replayed else " (NOT replayed)")
        rows.append({"method": label, "precision": p, "rel_err_vs_fp64_func": max(errs)})
        print(f"check graph replay {p}: rel err vs eager {max(errs):.2e}", flush=True)
    return rows


def check_segmented(m, X, ref) -> list[dict]:
    """fp64 segmented plans on the GPU: the boundary cache on the device, then in pinned host memory (a budget
    and free copies that make the planner choose each), against the same fp64 reference."""
    rows = []
    for host in (False, True):
        cost = CostModel(host_bytes_per_s=1e18 if host else 1.0)  # copies free, or too dear to choose
        for k in range(60):
            budget = int(256e6 * 0.85**k)
            try:
                p = plan(m, X, precision="fp64", max_memory=budget, cost=cost)
            except NTKError:
                break
            if p.segmented and p.host_cache == host and len(p.groups) > 1:
                K = ntk(m, X, precision="fp64", max_memory=budget, progress=False, cost=cost)
                label = f"minintk segmented, cache in {'host' if host else 'device'} memory"
                rows.append({"method": label, "precision": "fp64", "rel_err_vs_fp64_func": rel(K, ref)})
                print(f"check {label}: {p}; rel err {rows[-1]['rel_err_vs_fp64_func']:.2e}", flush=True)
                break
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/ntk_throughput")
    ap.add_argument("--sizes", default="125M,1.3B")
    ap.add_argument("--ns", default="64,256,1024")
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--short-T", type=int, default=8, help="the short-input case (single words)")
    ap.add_argument("--precisions", default="fp32,tf32,bf16")
    ap.add_argument("--methods", default="minintk,loop,func")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="125M, n=64 only")
    ap.add_argument("--no-check", action="store_true", help="skip the fp64 checks (run them once per session)")
    ap.add_argument("--cases", default="", help="comma list size:n:T, replacing the default grid")
    ap.add_argument("--skip", default="", help="comma list size:n:method to skip, e.g. 1.3B:1024:loop")
    ap.add_argument("--memory-fraction", type=float, default=None,
                    help="budget as this fraction of the free GPU memory (minintk.engine.default_budget; default 0.9)")
    ap.add_argument("--max-memory", type=float, default=None, help="GiB: minintk's memory budget (max_memory)")
    ap.add_argument("--form-seconds", action="store_true", help="seconds per contraction form (a sync per layer)")
    args = ap.parse_args()
    global MAX_MEMORY, FORM_SECONDS
    FORM_SECONDS = args.form_seconds
    if args.max_memory:
        MAX_MEMORY = int(args.max_memory * 2**30)
    if args.memory_fraction:
        MAX_MEMORY = default_budget(torch.device("cuda"), args.memory_fraction)
    sizes, ns = args.sizes.split(","), [int(v) for v in args.ns.split(",")]
    precisions, methods = args.precisions.split(","), args.methods.split(",")
    if args.quick:
        sizes, ns = ["125M"], [64]
    skip = set(args.skip.split(",")) if args.skip else set()

    dev = torch.cuda.get_device_name()
    peaks = {
        "bf16": matmul_peak(torch.bfloat16),
        "tf32": matmul_peak(torch.float32, tf32=True),
        "fp32": matmul_peak(torch.float32, tf32=False),
    }
    print(
        f"{dev}: measured matmul peaks (TFLOP/s) {json.dumps({k: round(v, 1) for k, v in peaks.items()})}", flush=True
    )
    meta = {
        "gpu": dev,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "peaks_tflops": peaks,
        "flop_count": "6 P n T + 2 n^2 P",
        "budget_fraction": args.memory_fraction or 0.9,
        "max_memory_gib": args.max_memory,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checks = check(methods, precisions) if not args.no_check else []

    rows = []
    cases = [(s, n, args.T) for s in sizes for n in ns] + [("125M", n, args.short_T) for n in (256, 1024)]
    if args.quick:
        cases = [("125M", 64, args.T), ("125M", 256, args.short_T)]
    if args.cases:
        cases = [(c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2])) for c in args.cases.split(",")]
    for size, n, T in cases:
        model = build(size, T)
        P = sum(p.numel() for p in model.parameters())
        X = torch.randint(0, model.cfg.vocab_size, (n, T), device="cuda", generator=None)
        results = {}
        for p in precisions:
            for method in methods:
                row = {"model": f"GPT-Neo-{size}", "n": n, "T": T, "precision": p, "method": method, "P": P}
                if f"{size}:{n}:{method}" in skip:
                    row["status"] = "skipped"
                    rows.append(row)
                    continue
                try:
                    sec, peak, K, stats, warm = timed(model, X, p, method, args.repeats if n <= 256 else 1, n <= 256)
                except torch.cuda.OutOfMemoryError:
                    row.update(status="OOM")
                    torch.cuda.empty_cache()
                    rows.append(row)
                    print(f"{size} n={n} T={T} {p} {method}: OOM", flush=True)
                    continue
                flops = 6 * P * n * T + 2 * n * n * P
                row.update(
                    status="ok",
                    seconds=sec,
                    warmup_seconds=warm,
                    peak_gib=peak,
                    samples_per_s=n / sec,
                    tflops=flops / sec / 1e12,
                    frac_peak=flops / sec / 1e12 / peaks[p],
                )
                if method == "minintk-graph":  # the timed calls must be replays
                    row["graph_phases"] = sorted(stats.seconds)
                elif stats is not None:
                    used, phase = stats.plan, stats.seconds
                    row.update(
                        capture_s=phase.get("capture", 0.0) + phase.get("boundary", 0.0),
                        boundary_s=phase.get("boundary", 0.0),
                        contract_s=phase.get("contract", 0.0),
                        setup_s=phase.get("setup", 0.0),
                        peak_phase=stats.peak_phase,
                        forms=stats.forms,
                        form_seconds=stats.form_seconds,
                        groups=len(used.groups) if used else None,
                        block=used.block if used else None,
                        segmented=used.segmented if used else None,
                        passes=used.passes if used else None,
                        plan=str(used) if used else None,
                    )
                    gram_flops = 2 * n * n * P + 2 * P * n * T  # forming per-sample gradients + their Gram
                    sym_flops = n * (n + 1) * P + 2 * P * n * T  # K is symmetric: the products it needs
                    if row["contract_s"]:
                        row["contract_frac_peak"] = gram_flops / row["contract_s"] / 1e12 / peaks[p]
                        row["contract_frac_peak_symmetric"] = sym_flops / row["contract_s"] / 1e12 / peaks[p]
                results[(p, method)] = K
                rows.append(row)
                save(out, meta, checks, rows)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        # relative error of each result against fp64 (small cases) or our fp32 result (large ones)
        ref_key = ("fp32", "minintk") if ("fp32", "minintk") in results else None
        ref64 = run(model, X, "fp64", "minintk") if n * P <= 64 * 2e8 else None
        for row in rows:
            key = (row["precision"], row["method"])
            if row.get("status") == "ok" and row["model"] == f"GPT-Neo-{size}" and row["n"] == n and row["T"] == T:
                if ref64 is not None:
                    row["rel_err"], row["rel_err_ref"] = rel(results[key], ref64), "fp64"
                elif ref_key and key != ref_key:
                    row["rel_err"], row["rel_err_ref"] = rel(results[key], results[ref_key]), "fp32 minintk"
        del model, results
        torch.cuda.empty_cache()

    save(out, meta, checks, rows)
    print(markdown(meta, checks, rows))


def save(out: Path, meta: dict, checks: list, rows: list) -> None:
    """Write the JSON and markdown tables (after every row: an interrupted run keeps what it measured)."""
    doc = {"meta": meta, "checks": checks, "rows": rows}
    Path(f"{out}.json").write_text(json.dumps(doc, indent=2, default=str))
    Path(f"{out}.md").write_text(markdown(meta, checks, rows))


def markdown(meta, checks, rows) -> str:
    lines = [
        f"# NTK Gram throughput on {meta['gpu']}",
        "",
        f"torch {meta['torch']}, CUDA {meta['cuda']}. Measured matmul peaks (TFLOP/s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in meta["peaks_tflops"].items())
        + f". Flops counted as {meta['flop_count']}. Output f: label-word logit difference at the last token. "
        + (
            f"minintk's memory budget: {meta['max_memory_gib']:g} GiB (max_memory)."
            if meta.get("max_memory_gib")
            else f"minintk's memory budget: {meta.get('budget_fraction', 0.75):g} of the free GPU memory (default)."
        ),
        "",
        "| model | n | T | precision | method | time (s) | warm-up s** | peak GiB | samples/s | TFLOP/s | of peak | "
        "capture s | contract s | Gram phase of peak* | forms | rel. err (vs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(
                f"| {r['model']} | {r['n']} | {r['T']} | {r['precision']} | {r['method']} | {r['status']} "
                "| | | | | | | | | | |"
            )
            continue
        secs = r.get("form_seconds", {})
        forms = ", ".join(
            f"{k} {v}" + (f" ({secs[k]:.2f} s)" if k in secs else "") for k, v in r.get("forms", {}).items()
        )
        if r.get("graph_phases"):
            forms = "phases: " + ", ".join(r["graph_phases"])
        if r.get("groups"):
            forms += f"; {r['groups']} group(s), " + (
                f"segmented, {r['passes']:.1f} passes" if r.get("segmented") else f"{r['passes']:.1f} passes"
            )
        err = r.get("rel_err")
        lines.append(
            f"| {r['model']} | {r['n']} | {r['T']} | {r['precision']} | {r['method']} | {r['seconds']:.3f} | "
            f"{r['warmup_seconds']:.2f} | "
            f"{r['peak_gib']:.1f} | {r['samples_per_s']:.0f} | {r['tflops']:.1f} | {100 * r['frac_peak']:.0f}% | "
            + (
                f"{r['capture_s']:.3f} | {r['contract_s']:.3f} | "
                f"{100 * r.get('contract_frac_peak', 0):.0f}% "
                f"({100 * r.get('contract_frac_peak_symmetric', 0):.0f}% sym.) | {forms} | "
                if "capture_s" in r
                else "| | | | "
            )
            + (f"{err:.1e} ({r['rel_err_ref']}) |" if err is not None else " |")
        )
    lines += [
        "",
        "\\* Gram phase: the counted Gram flops 2 n^2 P + 2 n T P (per-sample gradients and their Gram) over the "
        "contract seconds, as a fraction of the measured matmul peak. The ghost form does fewer flops than this count "
        "(short T), so it can exceed 100%. (sym.): the same with the products a symmetric K needs, n (n + 1) P "
        "+ 2 n T P. 'of peak' counts 6 P n T + 2 n^2 P over the whole time. Capture includes "
        "the boundary pass of a segmented plan; 'passes' counts forward/backward passes over the samples.",
        "",
        "\\** Warm-up: the first call on a fresh model, untimed in 'time' (the engine's discovery of the model's "
        "layers, kernel autotuning, cuBLAS handles, the allocator's first cudaMallocs): a full call for n <= 256, "
        "a call on 2 samples for larger n. Each method starts from an empty allocator cache; 'time' is the best "
        "timed call after the warm-up (steady state, no empty_cache between calls). For minintk-graph the warm-up "
        "call is the one that records the CUDA graph (an eager run, then the capture): its first-call cost.",
        "",
        "## Checks against the fp64 reference (tiny GPT-Neo-like model, n=12, T=32)",
        "",
        "| method | precision | rel. err vs fp64 torch.func (graph replay rows: vs the eager engine, same inputs) |",
        "|---|---|---|",
    ]
    lines += [f"| {c['method']} | {c['precision']} | {c['rel_err_vs_fp64_func']:.1e} |" for c in checks]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
