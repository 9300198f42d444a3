"""CUDA graphs of small Grams (engine/graphs.py): replays on new inputs equal the eager engine; a model changed in
place is replayed with its new values; a changed setting, shape or output records anew; NaN outputs are refused.
The graph tests need CUDA (run on the GPU machine); the option's validation runs everywhere."""

from __future__ import annotations

import pytest
import torch

from minintk import Decoder, DecoderConfig
from minintk.engine import NTKError, Stats, label_words, ntk

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def model(dtype: torch.dtype = torch.float64, **kw) -> Decoder:
    """A small decoder in the precision's dtype (ntk converts others per call, and a per-call copy is not graphed)."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=41, n_positions=16, d_model=16, n_head=2, n_layer=2, head="lm")
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return Decoder(DecoderConfig(**{**cfg, **kw})).to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def inputs(seed: int, n: int = 5, T: int = 9, pad: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 41, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[: n // 2, :pad] = 0  # left padding of the first half
    return {"input_ids": ids.cuda(), "attention_mask": mask.cuda()}


def test_unknown_cuda_graph_mode_is_named():
    with pytest.raises(NTKError, match="unknown cuda_graph 'always'"):
        ntk(model(), torch.zeros(2, 3, dtype=torch.long), cuda_graph="always", progress=False)


@cuda
@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@pytest.mark.parametrize("mode", [True, "auto"])
def test_replays_on_new_inputs_equal_the_eager_engine(precision, mode):
    """Label words at the last attended token with left padding that moves between calls: the time steps that
    carry gradient differ per call, which the replay (keeping every step) must not get wrong."""
    m = model(torch.float64 if precision == "fp64" else torch.float32)
    out = label_words([3, 7])
    tol = 1e-12 if precision == "fp64" else 1e-5
    phases = []
    for k in range(4):
        X = inputs(k, pad=2 * k)
        stats = Stats()
        got = ntk(m, X, output=out, precision=precision, cuda_graph=mode, progress=False, stats=stats)
        phases.append(next((ph for ph in stats.seconds if ph.startswith("graph")), "eager"))
        eager = ntk(m, X, output=out, precision=precision, cuda_graph=False, progress=False)
        assert got.shape == (5, 5, 2, 2) and rel(got, eager) <= tol, (k, rel(got, eager))
    first = ["graph record"] if mode is True else ["eager", "graph record"]
    assert phases == first + ["graph replay"] * (4 - len(first)), phases


@cuda
def test_in_place_changes_are_replayed_and_settings_record_anew():
    m = model(head="scalar")
    X, X2 = inputs(0), inputs(1)
    first = ntk(m, X, precision="fp64", cuda_graph=True, progress=False)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.1)  # the same storage: the graph reads the new values
    again = ntk(m, X2, precision="fp64", cuda_graph=True, progress=False)
    assert rel(again, ntk(m, X2, precision="fp64", cuda_graph=False, progress=False)) <= 1e-12
    assert rel(again, first) > 1e-3
    for block in m.blocks:
        block.attn.scale *= 0.5  # a plain attribute the kernels were recorded with
    changed = ntk(m, X2, precision="fp64", cuda_graph=True, progress=False)
    assert rel(changed, ntk(m, X2, precision="fp64", cuda_graph=False, progress=False)) <= 1e-12
    assert rel(changed, again) > 1e-6


@cuda
def test_cross_grams_and_other_shapes():
    m = model(head="scalar")
    for n2 in (3, 3, 4):
        X, X2 = inputs(n2), inputs(10 + n2, n=n2)
        got = ntk(m, X, X2, precision="fp64", cuda_graph=True, progress=False)
        assert rel(got, ntk(m, X, X2, precision="fp64", cuda_graph=False, progress=False)) <= 1e-12


@cuda
def test_nan_outputs_are_refused_on_replay():
    m = model(head="scalar")
    X = inputs(0)
    ntk(m, X, precision="fp64", cuda_graph=True, progress=False)
    with torch.no_grad():
        m.head.weight.fill_(1e308)  # finite parameters, an output that overflows
    with pytest.raises(NTKError, match="NaN or inf"):
        ntk(m, X, precision="fp64", cuda_graph=True, progress=False)


@cuda
def test_clear_cache_drops_the_graph_and_its_memory():
    from minintk.engine import clear_cache

    m = model(head="scalar")
    X = inputs(0)
    ntk(m, X, precision="fp64", cuda_graph=True, progress=False)
    held = torch.cuda.memory_reserved()
    clear_cache()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() < held
    stats = Stats()
    ntk(m, X, precision="fp64", cuda_graph=True, progress=False, stats=stats)
    assert "graph record" in stats.seconds
