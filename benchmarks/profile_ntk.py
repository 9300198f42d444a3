"""Where does the NTK engine spend its time? Phases, the model's own forward/backward as a floor, and
torch.profiler over one `ntk` call on a GPT-Neo architecture.

    python benchmarks/profile_ntk.py --size 125M --n 64 --precisions fp32 bf16
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from minintk import Decoder
from minintk.config import gpt_neo_config
from minintk.engine import Stats, ntk
from minintk.engine.precision import forward_mode, matmul_flags


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="125M")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--precisions", nargs="+", default=["fp32"])
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--max-memory", type=float, default=None, help="GiB: the engine's memory budget")
    ap.add_argument("--graph", action="store_true", help="replay CUDA graphs (ntk's cuda_graph=True); default eager")
    args = ap.parse_args()
    args.max_memory = int(args.max_memory * 2**30) if args.max_memory else None
    torch.manual_seed(0)
    cfg = gpt_neo_config(args.size, head="label_words", label_ids=(352, 2089), label_diff=True)
    with torch.device("cuda"):
        model = Decoder(cfg).eval()
    X = torch.randint(0, cfg.vocab_size, (args.n, args.T), device="cuda")
    for prec in args.precisions:
        profile_one(model, X, prec, args)


def profile_one(model, X, prec: str, args) -> None:
    params = list(model.parameters())
    opts = dict(progress=False, max_memory=args.max_memory, cuda_graph=args.graph)
    ntk(model, X, precision=prec, **opts)  # warm-up: discovery, autotune (and the graph's recording)

    def fwd_bwd():
        with matmul_flags(prec), forward_mode(prec, X.device):
            f = model(X)
        with matmul_flags(prec):
            torch.autograd.grad(f.sum(), params)

    def fwd():
        with torch.no_grad(), matmul_flags(prec), forward_mode(prec, X.device):
            model(X)

    stats = Stats()
    t_call = best_of(lambda: ntk(model, X, precision=prec, **opts), args.repeats)
    torch.cuda.reset_peak_memory_stats()
    ntk(model, X, precision=prec, progress=False, stats=stats, max_memory=args.max_memory, cuda_graph=args.graph)
    phases = {k: round(v, 4) for k, v in stats.seconds.items()}
    phases["peak GiB"] = round(stats.peak_bytes / 2**30, 2)
    phases["peak in"] = stats.peak_phase
    print(f"== {args.size} n={args.n} T={args.T} {prec}: ntk {t_call:.4f} s; forward {best_of(fwd, 3):.4f} s, "
          f"forward+backward {best_of(fwd_bwd, 3):.4f} s; phases (synchronized) {phases} forms "
          f"{stats.forms}", flush=True)
    print(stats.plan, flush=True)
    if args.no_profile:
        return
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ntk(model, X, precision=prec, **opts)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    syncs = sum(e.count for e in ka if "Synchronize" in e.key or e.key == "aten::item"
                or e.key == "aten::_local_scalar_dense")
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    print(f"syncs/item calls {syncs}, kernel launches {launches}")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows), flush=True)
    print(ka.table(sort_by="cuda_time_total", row_limit=args.rows), flush=True)


if __name__ == "__main__":
    main()
