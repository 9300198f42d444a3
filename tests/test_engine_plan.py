"""The planner as a pure function: hand-built structures, sizes and cost models, no model, no patching."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from minintk.engine import Chain, CostModel, NTKError, Sizes, Structure, choose_form, plan_gram
from minintk.engine.layers import LINEAR, NORM, Use, capture_bytes


def param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape))


def layer_stack(L: int, d: int = 64, T: int = 32, tied: bool = False):
    """Uses of a block chain: per block a LayerNorm and two Linears; with tied, the first and last Linear share
    a weight (as a tied embedding and LM head do)."""
    uses, shared = [], param(d, d)
    for k in range(L):
        uses.append(Use(f"b{k}.ln", None, 0, NORM, param(d), param(d), T=T, d_in=d, d_out=d, segment=k + 1))
        w1 = shared if tied and k == 0 else param(4 * d, d)
        w2 = shared if tied and k == L - 1 else param(d, 4 * d)
        uses.append(Use(f"b{k}.fc", None, 0, LINEAR, w1, None, T=T, d_in=d, d_out=w1.shape[0], segment=k + 1))
        uses.append(Use(f"b{k}.out", None, 0, LINEAR, w2, None, T=T, d_in=w2.shape[1], d_out=d, segment=k + 1))
    return uses


def structure(L=4, graph_per_block=1e5, tied=False, skip=True, chain=True, d=64, T=32) -> Structure:
    uses = layer_stack(L, d, T, tied)
    seg_graph = (1e3,) + (graph_per_block,) * L + (1e3,)
    return Structure(
        tuple(uses), C=1, n_params=sum(p.numel() for u in uses for p in u.params), graph_bytes=sum(seg_graph),
        seg_graph=seg_graph, seg_flops=(0.0,) + (1e6,) * L + (0.0,), h_bytes=(4.0 * d * T,) * (L + 1),
        h_full=(4.0 * d * T,) * (L + 1), chain=Chain(tuple(nn.Identity() for _ in range(L)) if chain else (), 1),
        skip_prefix=skip,
    )


def sizes(n=64, budget=1 << 30, symmetric=True, block=None, host_ok=False, host=0.0) -> Sizes:
    return Sizes(n, n, symmetric, budget, block, 4, "fp32", host_ok, host)


def test_everything_fits_in_one_pass():
    p = plan_gram(structure(), sizes())
    assert (len(p.groups), p.block, p.mode, p.passes) == (1, 64, "full", 1.0), str(p)


@given(budget=st.integers(300_000, 200_000_000), n=st.integers(1, 200), L=st.integers(1, 6),
       tied=st.booleans(), skip=st.booleans(), symmetric=st.booleans())
def test_every_plan_fits_its_budget_and_covers_every_use_once(budget, n, L, tied, skip, symmetric):
    s = structure(L=L, tied=tied, skip=skip)
    cost = CostModel()
    try:
        p = plan_gram(s, sizes(n=n, budget=budget, symmetric=symmetric), cost)
    except NTKError as e:
        assert "exceed the memory budget" in str(e)
        return
    labels = [u.label for g in p.groups for u in g]
    assert sorted(labels) == sorted(u.label for u in s.uses), "groups must partition the uses"
    on_device = 0 if p.host_cache else p.bytes_boundary_cache
    assert p.bytes_captures + on_device <= budget, str(p)
    assert p.mode in ("full", "prefix") + (("skip",) if skip else ()), p.mode
    if tied:  # a shared weight's uses are contracted together (its cross terms)
        shared = s.uses[1].weight
        assert len({i for i, g in enumerate(p.groups) for u in g if u.weight is shared}) == 1


def test_a_tight_budget_splits_layers_then_samples():
    s = structure(L=4)
    roomy = plan_gram(s, sizes(budget=1 << 30))
    need = capture_bytes(list(s.uses), 4, 1) * 64
    tight = plan_gram(s, sizes(budget=int(need * 0.6)))
    assert len(tight.groups) > 1 or tight.block < 64, str(tight)
    assert tight.passes > roomy.passes


def test_a_large_graph_makes_segmented_capture_pay():
    """With the autograd graph dominating, recomputing each group's own blocks from a boundary cache beats one
    full pass per group; without a chain the planner cannot choose it."""
    big = dict(L=6, graph_per_block=2e5, d=256, T=128)  # ~7.9 MB of captures and 1.2 MB of graph per sample
    p = plan_gram(structure(**big), sizes(n=16, budget=100_000_000))
    assert p.segmented and p.boundaries and len(p.groups) > 1, str(p)
    flat = plan_gram(structure(**big, chain=False), sizes(n=16, budget=100_000_000))
    assert not flat.segmented and flat.passes > p.passes, (str(flat), str(p))


def test_host_cache_only_where_allowed_and_cheaper():
    heavy = structure(L=6, graph_per_block=2e5, d=256, T=128)
    budget = 40_000_000
    free_copies = CostModel(host_bytes_per_s=1e18)
    allowed = plan_gram(heavy, sizes(n=64, budget=budget, host_ok=True, host=1e12), free_copies)
    never = plan_gram(heavy, sizes(n=64, budget=budget, host_ok=True, host=1e12), CostModel(host_cache=False))
    assert not never.host_cache
    assert allowed.host_cache and allowed.passes < never.passes, (str(allowed), str(never))
    dear = plan_gram(heavy, sizes(n=64, budget=budget, host_ok=True, host=1e12), CostModel(host_bytes_per_s=1.0))
    assert not dear.host_cache, str(dear)  # copies priced above what they save
    no_room = plan_gram(heavy, sizes(n=64, budget=budget, host_ok=True, host=0.0), free_copies)
    assert not no_room.host_cache


def test_one_sample_that_cannot_fit_is_refused_with_the_bytes():
    with pytest.raises(NTKError, match=r"even one sample's captures \(\d+\.\d MiB\) and graph"):
        plan_gram(structure(L=4, graph_per_block=1e9), sizes(budget=1 << 20))


@pytest.mark.parametrize("m,T,r,c,want", [(64, 128, 768, 3072, "materialized"), (256, 8, 768, 3072, "ghost"),
                                          (4, 2, 10, 10, "ghost"), (2, 64, 4, 4, "materialized")])
def test_choose_form_takes_the_fewer_flops(m, T, r, c, want):
    assert choose_form(m, T, m, T, r, c, same=True) == want
    other = {"ghost": "materialized", "materialized": "ghost"}[want]
    assert choose_form(m, T, m, T, r, c, same=True, strategy=other) == other
