"""Where does the NTK engine spend its time? torch.profiler over one `ntk` call on a GPT-Neo architecture.

    python benchmarks/profile_ntk.py --size 1.3B --n 128 --precision bf16
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from minintk import Decoder
from minintk.config import gpt_neo_config
from minintk.ntk import ntk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="125M")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = gpt_neo_config(args.size, head="label_words", label_ids=(352, 2089), label_diff=True)
    with torch.device("cuda"):
        model = Decoder(cfg).eval()
    X = torch.randint(0, cfg.vocab_size, (args.n, args.T), device="cuda")
    ntk(model, X[: min(16, args.n)], precision=args.precision, progress=False)  # warm-up: discovery, autotune
    stats: dict = {}
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ntk(model, X, precision=args.precision, progress=False, stats=stats)
        torch.cuda.synchronize()
    print(f"total {time.perf_counter() - t:.3f} s (profiled); phases", {k: v for k, v in stats.items() if k != "plan"})
    print(stats.get("plan"))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
