"""kernels/materialized.py: the sliced Gram and its unsliced reference against an fp64 Gram of formed per-sample
gradients, its slicing and split-K rules (pure functions), and split-K's batched GEMM."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from minintk.kernels import materialized_gram, materialized_gram_reference, mirror_upper
from minintk.kernels.materialized import SPLIT_K, gram_split_k, slice_rows, split_k_pieces

# (dtype, atol relative to max |K|, rtol). bf16/fp16: per-sample gradients are rounded to that dtype before
# their Gram (tensor cores), which the fp64 reference does not do.
DTYPES = [
    (torch.float32, 2e-5, 1e-5),
    (torch.bfloat16, 3e-2, 3e-2),
    (torch.float16, 3e-3, 3e-3),
    (torch.float64, 1e-12, 1e-12),
]
SHAPES = [  # (m1, m2, T1, T2, a, b)
    (1, 1, 1, 1, 1, 1),
    (6, 3, 9, 4, 13, 21),
    (4, 2, 17, 9, 20, 3),
]


def formed_gram(X1, D1, X2, D2) -> torch.Tensor:
    """<G1_i, G2_j>_F with every per-sample gradient G = D^T X formed at once, summed over tokens in fp64."""
    G1 = (D1.double()[:, :, :, None] * X1.double()[:, :, None, :]).sum(1).flatten(1)
    G2 = (D2.double()[:, :, :, None] * X2.double()[:, :, None, :]).sum(1).flatten(1)
    return G1 @ G2.T


def factors(m, T, a, b, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, T, a, generator=g).to(dtype), torch.randn(m, T, b, generator=g).to(dtype)


@pytest.mark.parametrize("budget", [1, 1000, 1 << 28])  # one weight row per slice, 8 rows, all rows
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sliced_and_reference_match_formed_gradients(shape, dtype, atol, rtol, budget):
    m1, m2, T1, T2, a, b = shape
    X1, D1 = factors(m1, T1, a, b, dtype, 0)
    X2, D2 = factors(m2, T2, a, b, dtype, 1)
    ref = formed_gram(X1, D1, X2, D2)
    scale = float(ref.abs().max())
    got = materialized_gram(X1, D1, X2, D2, budget=budget)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), ref, atol=atol * scale, rtol=rtol)
    exact = materialized_gram_reference(X1, D1, X2, D2)  # fp64 of the unrounded gradients
    torch.testing.assert_close(exact, ref, atol=1e-12 * scale, rtol=1e-12)


@given(
    m1=st.integers(1, 5), m2=st.integers(1, 5), T1=st.integers(1, 6), T2=st.integers(1, 6),
    a=st.integers(1, 7), b=st.integers(1, 7), seed=st.integers(0, 2**16),
)  # fmt: skip
@settings(max_examples=25, deadline=None)
def test_fp64_ragged_shapes_and_symmetry(m1, m2, T1, T2, a, b, seed):
    X1, D1 = factors(m1, T1, a, b, torch.float64, seed)
    X2, D2 = factors(m2, T2, a, b, torch.float64, seed + 1)
    torch.testing.assert_close(materialized_gram(X1, D1, X2, D2, budget=1), formed_gram(X1, D1, X2, D2))
    for block in (1, 2, 64):  # the symmetric Gram in bands of `block` samples, ragged or in one GEMM
        sym = materialized_gram(X1, D1, budget=a, syrk_block=block)
        torch.testing.assert_close(sym, formed_gram(X1, D1, X1, D1))
        assert torch.equal(sym, sym.T)
        upper = materialized_gram(X1, D1, budget=a, symmetrize=False, syrk_block=block)
        torch.testing.assert_close(mirror_upper(upper), sym)


@pytest.mark.parametrize("b, rows", [(300, 100), (300, 150), (50, 20), (200, 7), (40, 100)])
def test_slices_are_aligned_and_within_budget(b, rows):
    """Slices of >= 64 weight rows are multiples of 64 (cuBLAS alignment), smaller ones multiples of 8; one
    slice when all rows fit."""
    step = slice_rows(b, per_row=25, budget=rows * 25)
    if rows >= b:
        assert step == b
    else:
        align = 64 if rows >= 64 else 8 if rows >= 8 else 1
        assert step <= rows and step % align == 0, (step, rows, align)


@given(
    m1=st.integers(1, 6), m2=st.integers(1, 6), K=st.integers(1, 300), pieces=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)  # fmt: skip
@settings(max_examples=30, deadline=None)
def test_gram_split_k_equals_one_gemm(m1, m2, K, pieces, seed):
    """K cut into pieces (a remainder included, pieces > K too): fp64 equal to one GEMM, fp32 within rounding."""
    g = torch.Generator().manual_seed(seed)
    G1 = torch.randn(m1, K, generator=g, dtype=torch.float64)
    G2 = torch.randn(m2, K, generator=g, dtype=torch.float64)
    torch.testing.assert_close(gram_split_k(G1, G2, pieces), G1 @ G2.T, rtol=1e-12, atol=1e-12)
    got = gram_split_k(G1.float(), G2.float(), pieces)
    assert got.dtype == torch.float32
    ref = G1.float().double() @ G2.float().double().T
    torch.testing.assert_close(got.double(), ref, atol=2e-5 * float(ref.abs().max()), rtol=1e-5)


def test_split_k_only_for_few_sample_fp32_grams_on_cuda():
    """The rule: CUDA-core fp32, at most 128^2 outputs, pieces >= SPLIT_K_MIN_K long; never on CPU."""
    K, f32 = 2048 * 300, torch.float32
    assert split_k_pieces(64, 64, K, f32, cuda=False, tf32=False) == 1
    assert split_k_pieces(64, 64, K, f32, cuda=True, tf32=False) == SPLIT_K
    assert split_k_pieces(64, 64, 2048 * 10, f32, cuda=True, tf32=False) == 10
    assert split_k_pieces(128, 128, K, f32, cuda=True, tf32=False) == 64
    assert split_k_pieces(256, 256, K, f32, cuda=True, tf32=False) == 1
    assert split_k_pieces(64, 64, K, torch.bfloat16, cuda=True, tf32=False) == 1
    assert split_k_pieces(64, 64, K, f32, cuda=True, tf32=True) == 1


def test_bad_inputs_are_named():
    X, D = factors(2, 3, 4, 5, torch.float32, 0)
    with pytest.raises(ValueError, match="input features differ"):
        materialized_gram(X, D, X[..., :3], D)
    with pytest.raises(ValueError, match="must be 3-D"):
        materialized_gram(X[0], D[0])
    with pytest.raises(ValueError, match="both X2 and D2"):
        materialized_gram(X, D, X)


def test_same_with_another_sample_set_is_refused():
    X, D = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="same=True is the Gram of \\(X1, D1\\) with itself"):
        materialized_gram(X, D, X.clone(), D, same=True)
