"""The boundary cache in host memory at GPT-Neo-1.3B, n=4096, T=128, bf16: the plans the planner picks at
several host_fraction settings, then one timed call at the largest (phases and the process's peak RSS).

    python benchmarks/host_cache_probe.py
"""

from __future__ import annotations

import resource
import time

import torch

from minintk import Decoder
from minintk.config import gpt_neo_config
from minintk.engine import CostModel, Stats, ntk, plan


def main() -> None:
    torch.manual_seed(0)
    cfg = gpt_neo_config("1.3B", head="label_words", label_ids=(352, 2089), label_diff=True)
    with torch.device("cuda"):
        m = Decoder(cfg).eval()
    X = torch.randint(0, cfg.vocab_size, (4096, 128), device="cuda")
    for f in (0.5, 0.65, 0.8):
        p = plan(m, X, precision="bf16", cost=CostModel(host_fraction=f))
        print(f"host_fraction {f}: mode {p.mode}, host {p.host_cache}, starts {len(p.starts)}, cache "
              f"{p.bytes_boundary_cache / 2**30:.1f} GiB, passes {p.passes:.2f}, groups {len(p.groups)}, "
              f"block {p.block}", flush=True)
    with open("/proc/meminfo") as fh:
        print([line.strip() for line in fh if line.startswith(("MemTotal", "MemAvailable"))])
    ntk(m, X[:2], precision="bf16", progress=False)
    s = Stats()
    torch.cuda.synchronize()
    t = time.perf_counter()
    ntk(m, X, precision="bf16", progress=False, stats=s, cost=CostModel(host_fraction=0.8))
    torch.cuda.synchronize()
    phases = {k: round(v, 1) for k, v in s.seconds.items()}
    print(f"host_fraction 0.8: {time.perf_counter() - t:.1f} s, phases {phases}, plan: {s.plan}", flush=True)
    print("max RSS GiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


if __name__ == "__main__":
    main()
