"""Several outputs per sample: the full kernel, its trace (the mean over outputs) and its diagonal, each
contracted inside the layers, against an fp64 per-sample reference, on every contraction form and path."""

import warnings

import pytest
import torch
from conftest import make_gpt_neo_checkpoint
from hypothesis import given
from hypothesis import strategies as st
from test_ntk_models import per_sample_gram, rel
from torch import nn

from minintk import Decoder, DecoderConfig
from minintk.engine import NTKError, Stats, label_words, ntk, plan

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = {"fp64": 1e-10, "fp32": 1e-5}


def reduce(R: torch.Tensor, outputs: str) -> torch.Tensor:
    """The full reference (n, n2, C, C) in the layout asked for."""
    d = R.diagonal(dim1=2, dim2=3)
    return {"trace": d.mean(-1), "diagonal": d}[outputs]


def decoder(head="label_words", C=3, seed=0, **kw):
    torch.manual_seed(seed)
    ids = tuple(range(3, 3 + C))
    cfg = dict(vocab_size=29, n_positions=10, d_model=8, n_head=2, n_layer=2, head=head, label_ids=ids,
               n_classes=C, sigma_b=0.3)
    return Decoder(DecoderConfig(**{**cfg, **kw}))


@given(outputs=st.sampled_from(["trace", "diagonal"]), head=st.sampled_from(["label_words", "classes"]),
       C=st.integers(2, 4), strategy=st.sampled_from(["auto", "ghost", "materialized"]),
       block=st.sampled_from([None, 2]), precision=st.sampled_from(["fp64", "fp32"]), seed=st.integers(0, 99))
def test_decoder_trace_and_diagonal(outputs, head, C, strategy, block, precision, seed):
    """The tied embedding/head (label words), its cross terms, LayerNorm and bias vectors, both dense forms."""
    model = decoder(head, C, seed)
    X = torch.randint(0, 29, (5, 7), generator=torch.Generator().manual_seed(seed))
    K = ntk(model, X, precision=precision, strategy=strategy, block_size=block, progress=False,
            **{outputs: True})
    R = reduce(per_sample_gram(model, X), outputs)
    assert K.shape == R.shape and rel(K, R) <= TOL[precision], f"{outputs}: {rel(K, R):.2e} ({precision})"


@pytest.mark.parametrize("outputs", ["trace", "diagonal"])
def test_cross_kernel_and_references_agree(outputs):
    model = decoder(C=3)
    X, X2 = torch.randint(0, 29, (4, 6)), torch.randint(0, 29, (3, 6))
    K = ntk(model, X, X2, precision="fp64", progress=False, **{outputs: True})
    for strategy in ("loop", "func"):
        Kr = ntk(model, X, X2, precision="fp64", strategy=strategy, progress=False, **{outputs: True})
        assert K.shape == Kr.shape and rel(K, Kr) <= 1e-10, f"{strategy}: {rel(K, Kr):.2e}"


@pytest.mark.parametrize("outputs", ["trace", "diagonal"])
def test_transformers_gpt_neo_with_several_label_words(tmp_path, outputs):
    _, hf = make_gpt_neo_checkpoint(tmp_path, vocab=41, positions=10, d=16, layers=2, heads=2, window=3)
    hf = hf.double()
    out = label_words([2, 7, 11, 13])
    X = torch.randint(0, 41, (5, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-Neo's fp32 scores in fp64
        K = ntk(hf, X, output=out, precision="fp64", progress=False, **{outputs: True})
    R = reduce(per_sample_gram(hf, X, output=out), outputs)
    assert rel(K, R) <= 1e-10, f"{outputs}: {rel(K, R):.2e}"


class MLP(nn.Module):
    """100 -> 32 -> C, with a raw parameter outside any layer (the reference path) when raw."""

    def __init__(self, C=5, raw=False):
        super().__init__()
        self.fc, self.out = nn.Linear(10, 32), nn.Linear(32, C)
        self.scale = nn.Parameter(torch.ones(32)) if raw else None

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.out(h * self.scale if self.scale is not None else h)


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("outputs", ["trace", "diagonal"])
def test_mlp_and_the_reference_path(outputs, raw):
    torch.manual_seed(0)
    model = MLP(raw=raw).double()
    X = torch.randn(6, 10, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        K = ntk(model, X, precision="fp64", block_size=4, progress=False, **{outputs: True})
    R = reduce(per_sample_gram(model, X), outputs)
    assert rel(K, R) <= 1e-10, f"{outputs}, raw={raw}: {rel(K, R):.2e}"


@pytest.mark.parametrize("outputs", ["trace", "diagonal"])
def test_segmented_plans(outputs):
    model = decoder(C=3, n_layer=4, n_positions=16).double()
    X = torch.randint(0, 29, (12, 12))
    for k in range(40):
        budget = int(64e6 * 0.8**k)
        try:
            p = plan(model, X, max_memory=budget, precision="fp64", **{outputs: True})
        except NTKError:
            pytest.fail("no budget gave a segmented plan")
        if p.segmented and len(p.groups) > 1:
            break
    stats = Stats()
    K = ntk(model, X, precision="fp64", max_memory=budget, progress=False, stats=stats, **{outputs: True})
    assert stats.plan.segmented
    R = reduce(per_sample_gram(model, X), outputs)
    assert rel(K, R) <= 1e-10, f"{outputs}: {rel(K, R):.2e}"


def test_trace_and_diagonal_need_less_memory_and_flops_than_the_full_kernel():
    model = decoder(C=8, d_model=16)
    X = torch.randint(0, 29, (16, 8))
    full, trace = plan(model, X, max_memory=1 << 30), plan(model, X, max_memory=1 << 30, trace=True)
    diag = plan(model, X, max_memory=1 << 30, diagonal=True)
    assert trace.bytes_captures < full.bytes_captures and diag.bytes_captures == trace.bytes_captures
    assert trace.flops < full.flops, (trace.flops, full.flops)


def test_trace_and_diagonal_exclude_each_other():
    with pytest.raises(NTKError, match="exclude each other"):
        ntk(decoder(), torch.zeros(2, 3, dtype=torch.long), trace=True, diagonal=True, progress=False)
