"""Several outputs on a CPU: the full (n, n, C, C) kernel against its trace and diagonal (contracted inside each
layer), and the torch.func trace contraction of PyTorch's NTK tutorial as a peer. An MLP 100 -> 256 -> C, fp32;
each case in a process of its own, timed whole (after a warm-up call on 4 samples) with its peak RSS growth.

    python benchmarks/multi_output_cpu.py [--ns 100,200] [--C 100] [--out benchmarks/results/multi_output_cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

CASE = r"""
import resource, sys, time, torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[4]))
n, C, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
model = nn.Sequential(nn.Linear(100, 256), nn.Tanh(), nn.Linear(256, C))
X = torch.randn(n, 100)

def func_trace(Xs):
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = vmap(jacrev(lambda p, x: functional_call(model, p, (x[None],))[0]), (None, 0))(params, Xs)
    J = torch.cat([j.reshape(Xs.shape[0], C, -1) for j in jac.values()], -1)
    return torch.einsum("icp,jcp->ij", J, J) / C

def run(Xs):
    if mode == "func-trace":
        return func_trace(Xs)
    from minintk import ntk
    kw = {"trace": mode == "trace", "diagonal": mode == "diagonal"}
    return ntk(model, Xs, progress=False, max_memory=20 << 30, **kw)

run(X[:4])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
K = run(X)
sec = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
print(sec, peak, tuple(K.shape))
"""

MODES = ("full", "trace", "diagonal", "func-trace")


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="100,200")
    ap.add_argument("--C", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/multi_output_cpu")
    args = ap.parse_args()
    rows = []
    for n in (int(v) for v in args.ns.split(",")):
        for mode in MODES:
            r = subprocess.run([sys.executable, "-c", CASE, str(n), str(args.C), mode, str(args.threads)],
                               capture_output=True, text=True)
            if r.returncode:
                rows.append({"n": n, "C": args.C, "mode": mode, "error": r.stderr.strip().splitlines()[-1]})
            else:
                sec, peak, shape = r.stdout.split(maxsplit=2)
                rows.append({"n": n, "C": args.C, "mode": mode, "seconds": float(sec),
                             "peak_gib": float(peak) / 2**30, "shape": shape.strip()})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__}
    lines = [f"# Several outputs on a CPU ({meta['cpu']}, {args.threads} threads, torch {meta['torch']})", "",
             "MLP 100 -> 256 -> C, fp32, one process per case; seconds of one call after a warm-up on 4 samples; "
             "peak: growth of the process's maximum RSS during that call. `func-trace`: torch.func Jacobians "
             "contracted over outputs (PyTorch's NTK tutorial), the mean. "
             "`python benchmarks/multi_output_cpu.py`", "",
             "| n | C | mode | seconds | peak GiB | result shape | vs full (time, memory) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        full = next(f for f in rows if f["n"] == r["n"] and f["mode"] == "full")
        if "error" in r:
            lines.append(f"| {r['n']} | {r['C']} | {r['mode']} | error: {r['error'][:80]} | | | |")
            continue
        ratio = (f"{full['seconds'] / r['seconds']:.1f}x faster, {full['peak_gib'] / max(r['peak_gib'], 1e-9):.1f}x "
                 f"less" if r["mode"] != "full" and "seconds" in full else "")
        lines.append(f"| {r['n']} | {r['C']} | {r['mode']} | {r['seconds']:.2f} | {r['peak_gib']:.2f} | {r['shape']} |"
                     f" {ratio} |")
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
