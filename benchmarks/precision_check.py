"""What each precision means, measured: minintk's Gram in fp64/fp32 against an fp64 torch.func reference, on our
decoder loaded from a GPT-Neo checkpoint and on transformers' own GPT-Neo (which casts its attention scores to
fp32 even in an fp64 model). CPU, a few seconds; writes benchmarks/results/precision_cpu.md.

    python benchmarks/precision_check.py [--out benchmarks/results/precision_cpu.md]
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import warnings
from pathlib import Path

import torch
import transformers
from torch.func import functional_call, jacrev, vmap
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from minintk.engine import label_words, ntk
from minintk.gptneo import load_gpt_neo

IDS = (5, 9)


def func_gram(model, X, output) -> torch.Tensor:
    """fp64 K = J J^T from torch.func (vmap of jacrev over samples), every parameter, on an fp64 copy."""
    model = copy.deepcopy(model).double()
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(ps, x):
        return output(functional_call(model, ps, (x[None],)))[0]

    J = vmap(jacrev(f), in_dims=(None, 0))(params, X)
    J = torch.cat([j.reshape(X.shape[0], -1) for j in J.values()], 1)
    return J @ J.T


def rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/precision_cpu.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = GPTNeoConfig(vocab_size=101, max_position_embeddings=32, hidden_size=64, num_layers=4, num_heads=4,
                       attention_types=[[["global", "local"], 2]], window_size=8, bos_token_id=0, eos_token_id=0)
    hf = GPTNeoForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.1)
    X = torch.randint(0, 101, (12, 32))
    diff = label_words(IDS, diff=True)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_gpt_neo(folder, head="label_words", label_ids=IDS, label_diff=True)
    ref = func_gram(ours, X, lambda out: out)
    ref_hf = func_gram(hf, X, diff)
    rows = []
    for precision in ("fp64", "fp32"):
        K = ntk(ours, X, precision=precision, progress=False)
        rows.append(("our decoder (loaded GPT-Neo)", precision, rel(K, ref), "fp64 torch.func, our decoder"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        K = ntk(hf, X, output=diff, precision="fp64", progress=False)
    rows.append(("transformers' GPT-Neo", "fp64", rel(K, ref_hf), "fp64 torch.func, transformers' GPT-Neo"))
    rows.append(("transformers' GPT-Neo", "fp64", rel(K, ref), "fp64 torch.func, our decoder (pure fp64)"))
    warned = any("computes part of its forward in torch.float32" in str(w.message) for w in caught)
    lines = [
        "# Precision check (CPU)",
        "",
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}. GPT-Neo architecture (d=64, 4 layers, local window 8), random weights "
        f"N(0, 0.1^2), n=12, T=32, output: label-word logit difference {IDS} at the last token. "
        "`python benchmarks/precision_check.py`.",
        "",
        "| model | precision | rel. Frobenius error | against |",
        "|---|---|---|---|",
        *[f"| {m} | {p} | {e:.1e} | {against} |" for m, p, e, against in rows],
        "",
        "transformers' GPT-Neo casts q and k to fp32 before its attention scores even in an fp64 model: its fp64 Gram "
        "is exact for that function (first row of the two), and differs from the pure fp64 function by fp32 "
        f"rounding (second). minintk warned about the cast: {'yes' if warned else 'no'}.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
