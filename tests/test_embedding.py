"""kernels/embedding.py: both embedding-Gram paths (torch reference, blocked cuBLAS token pairs) and the tied
embedding/LM-head cross term against fp64 Grams of (vocab x d) gradients formed from one-hot rows.

A small vocabulary makes many tokens equal. 16-bit inputs are rounded before the fp64 reference sees them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from minintk.kernels import (
    embedding_gram,
    embedding_gram_blocked,
    embedding_gram_reference,
    embedding_linear_cross,
    mirror_upper,
)

# (dtype, atol relative to max |K|, rtol)
DTYPES = [
    (torch.float32, 2e-5, 1e-5),
    (torch.bfloat16, 2e-5, 1e-5),
    (torch.float16, 2e-5, 1e-5),
    (torch.float64, 1e-12, 1e-12),
]
SHAPES = [  # (m1, m2, T1, T2, d, vocab)
    (1, 1, 1, 1, 1, 1),
    (3, 5, 7, 7, 33, 4),
    (4, 2, 17, 9, 3, 5),
    (9, 9, 8, 8, 16, 3),
]
PATHS = {"reference": embedding_gram_reference, "blocked": embedding_gram_blocked}


def one_hot_grads(tok: torch.Tensor, D: torch.Tensor, V: int) -> torch.Tensor:
    """Per-sample embedding gradients G_i = onehot(tok_i)^T D_i in fp64, flattened: (m, V d)."""
    return torch.einsum("itv,itd->ivd", F.one_hot(tok, V).double(), D.double()).flatten(1)


def inputs(m, T, d, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (m, T), generator=g), torch.randn(m, T, d, generator=g).to(dtype)


def assert_gram(got, ref, dtype, atol, rtol):
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), got.dtype
    torch.testing.assert_close(got.double(), ref, atol=atol * float(ref.abs().max()), rtol=rtol)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_path_matches_one_hot_gradients(path, shape, dtype, atol, rtol):
    m1, m2, T1, T2, d, V = shape
    tok1, D1 = inputs(m1, T1, d, V, dtype, 0)
    tok2, D2 = inputs(m2, T2, d, V, dtype, 1)
    got = PATHS[path](tok1, D1, tok2, D2)
    assert got.shape == (m1, m2)
    assert_gram(got, one_hot_grads(tok1, D1, V) @ one_hot_grads(tok2, D2, V).T, dtype, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("m, T", [(1, 3), (5, 7), (11, 4)])
def test_blocked_symmetric_is_exactly_symmetric(m, T, dtype, atol, rtol):
    tok, D = inputs(m, T, 19, 4, dtype, 2)
    got = embedding_gram_blocked(tok, D, tok, D, same=True, budget=2 * T * T)  # several tiles, mirrored
    assert torch.equal(got, got.T)
    G = one_hot_grads(tok, D, 4)
    assert_gram(got, G @ G.T, dtype, atol, rtol)


@given(
    m1=st.integers(1, 5), m2=st.integers(1, 5), T1=st.integers(1, 6), T2=st.integers(1, 6),
    d=st.integers(1, 7), V=st.integers(1, 9), budget=st.integers(1, 200), seed=st.integers(0, 2**16),
    dtype=st.sampled_from(DTYPES),
)  # fmt: skip
@settings(max_examples=25, deadline=None)
def test_ragged_shapes_and_budgets(m1, m2, T1, T2, d, V, budget, seed, dtype):
    dtype, atol, rtol = dtype
    tok1, D1 = inputs(m1, T1, d, V, dtype, seed)
    tok2, D2 = inputs(m2, T2, d, V, dtype, seed + 1)
    ref = one_hot_grads(tok1, D1, V) @ one_hot_grads(tok2, D2, V).T
    for path in PATHS.values():
        assert_gram(path(tok1, D1, tok2, D2, budget=budget), ref, dtype, atol, rtol)


@given(m=st.integers(1, 4), T1=st.integers(2, 9), T2=st.integers(2, 9), budget=st.integers(1, 12),
       same=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_sequences_longer_than_the_budget_go_by_token_blocks(m, T1, T2, budget, same, seed):
    """One sample pair's T1 x T2 token pairs over the budget: the Gram is summed over token blocks, exactly."""
    tok1, D1 = inputs(m, T1, 3, 4, torch.float64, seed)
    tok2, D2 = (tok1, D1) if same else inputs(m + 1, T2, 3, 4, torch.float64, seed + 1)
    got = embedding_gram(tok1, D1, *(() if same else (tok2, D2)), budget=budget)
    torch.testing.assert_close(got, one_hot_grads(tok1, D1, 4) @ one_hot_grads(tok2, D2, 4).T, atol=1e-12, rtol=0)
    assert not same or torch.equal(got, got.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_takes_the_reference(dtype):
    tok1, D1 = inputs(3, 4, 6, 5, dtype, 3)
    tok2, D2 = inputs(2, 5, 6, 5, dtype, 4)
    assert torch.equal(embedding_gram(tok1, D1, tok2, D2), embedding_gram_reference(tok1, D1, tok2, D2))
    sym = embedding_gram(tok1, D1)
    assert torch.equal(sym, mirror_upper(embedding_gram_reference(tok1, D1, tok1, D1)))
    assert torch.equal(embedding_gram(tok1, D1, tok1, D1), sym)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_takes_blocked_except_float64():
    tok, D = (t.cuda() for t in inputs(6, 5, 9, 4, torch.float32, 5))
    assert torch.equal(embedding_gram(tok, D), embedding_gram_blocked(tok, D, tok, D, same=True))
    Dd = D.double()
    assert torch.equal(embedding_gram(tok, Dd, tok, Dd.clone()), embedding_gram_reference(tok, Dd, tok, Dd))


@given(
    m1=st.integers(1, 4), m2=st.integers(1, 4), T1=st.integers(1, 5), T2=st.integers(1, 5),
    d=st.integers(1, 6), V=st.integers(1, 9), seed=st.integers(0, 2**16),
)  # fmt: skip
@settings(max_examples=25, deadline=None)
def test_linear_cross_equals_formed_gradients(m1, m2, T1, T2, d, V, seed):
    """Embedding (tok1, D1) against a Linear sharing its (V, d) weight (inputs X2, output-gradients D2)."""
    g = torch.Generator().manual_seed(seed)
    tok1 = torch.randint(0, V, (m1, T1), generator=g)
    D1 = torch.randn(m1, T1, d, generator=g, dtype=torch.float64)
    X2 = torch.randn(m2, T2, d, generator=g, dtype=torch.float64)
    D2 = torch.randn(m2, T2, V, generator=g, dtype=torch.float64)
    G2 = torch.einsum("jtv,jtd->jvd", D2, X2).flatten(1)
    ref = one_hot_grads(tok1, D1, V) @ G2.T
    torch.testing.assert_close(embedding_linear_cross(tok1, D1, X2, D2), ref, rtol=1e-12, atol=1e-12)


def test_bad_inputs_are_named():
    tok, D = inputs(2, 3, 5, 4, torch.float32, 0)
    with pytest.raises(ValueError, match="integer token ids"):
        embedding_gram(D[..., 0], D)
    with pytest.raises(ValueError, match="must share"):
        embedding_gram_blocked(tok, D[:, :2], tok, D)
    with pytest.raises(ValueError, match="d=5, D2 has d=4"):
        embedding_gram_reference(tok, D, tok, D[..., :4])
    with pytest.raises(ValueError, match="both tok2 and D2"):
        embedding_gram(tok, D, tok)
    with pytest.raises(ValueError, match="same=True"):
        embedding_gram_blocked(tok, D, tok.clone(), D, same=True)
    with pytest.raises(ValueError, match=r"lie in \[0, 5\)"):
        embedding_linear_cross(torch.full((2, 3), 5), D, torch.randn(2, 3, 5), D)
