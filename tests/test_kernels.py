"""Every Gram kernel against its fp64 reference: Triton under TRITON_INTERPRET=1 on CPU, and the torch paths.

Shapes are ragged (token counts and feature sizes that are not multiples of the tiles, one token, one
sample) so masks at tile edges are exercised. Per-dtype tolerances are relative to the Gram's max entry.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from minintk.kernels import (
    embedding_gram,
    embedding_gram_reference,
    embedding_linear_cross,
    ghost_gram,
    ghost_gram_reference,
    materialized,
    materialized_gram,
    materialized_gram_reference,
)
from minintk.kernels._common import HAS_TRITON

# Relative (to max |K|) tolerances. bf16 inputs are rounded first, so the reference sees the same operands;
# what remains is fp32 accumulation order (and, for the materialized path, G rounded to bf16).
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5}
TOL_MATERIALIZED = {torch.float32: 2e-5, torch.bfloat16: 3e-2}

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    scale = ref.abs().max().clamp_min(1e-30)
    err = float((got.double() - ref).abs().max() / scale)
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e}"


def _factors(m: int, T: int, a: int, b: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, T, a, generator=g).to(dtype)
    D = torch.randn(m, T, b, generator=g).to(dtype)
    return X, D


SHAPES = [  # (m1, m2, T1, T2, a, b)
    (1, 1, 1, 1, 1, 1),
    (3, 5, 7, 7, 5, 33),
    (4, 2, 17, 9, 20, 3),
    (9, 9, 8, 8, 16, 16),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_ghost_triton_matches_reference(interpret, shape, dtype):
    m1, m2, T1, T2, a, b = shape
    X1, D1 = _factors(m1, T1, a, b, dtype, 0)
    X2, D2 = _factors(m2, T2, a, b, dtype, 1)
    ref = ghost_gram_reference(X1.double(), D1.double(), X2.double(), D2.double())
    got = ghost_gram(X1, D1, X2, D2, backend="triton")
    assert got.dtype == torch.float32 and got.shape == (m1, m2)
    _close(got, ref, TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,T", [(1, 3), (5, 7), (11, 4)])
def test_ghost_triton_symmetric(interpret, m, T, dtype):
    X, D = _factors(m, T, 6, 19, dtype, 2)
    got = ghost_gram(X, D, backend="triton")
    assert torch.equal(got, got.T)
    _close(got, ghost_gram_reference(X.double(), D.double(), X.double(), D.double()), TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_embedding_triton_matches_reference(interpret, shape, dtype):
    m1, m2, T1, T2, _, b = shape
    g = torch.Generator().manual_seed(3)
    tok1 = torch.randint(0, 4, (m1, T1), generator=g)  # a small vocabulary: many equal tokens
    tok2 = torch.randint(0, 4, (m2, T2), generator=g)
    _, D1 = _factors(m1, T1, 1, b, dtype, 4)
    _, D2 = _factors(m2, T2, 1, b, dtype, 5)
    ref = embedding_gram_reference(tok1, D1.double(), tok2, D2.double())
    _close(embedding_gram(tok1, D1, tok2, D2, backend="triton"), ref, TOL[dtype])
    sym = embedding_gram(tok1, D1, backend="triton")
    assert torch.equal(sym, sym.T)
    _close(sym, embedding_gram_reference(tok1, D1.double(), tok1, D1.double()), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("budget", [1, 100, 1 << 20])
def test_blocked_matches_reference(shape, dtype, budget):
    """cuBLAS token-pair tiles (kernels/blocked.py), tiled down to one sample pair, ghost and embedding."""
    from minintk.kernels.blocked import blocked_gram

    m1, m2, T1, T2, a, b = shape
    X1, D1 = _factors(m1, T1, a, b, dtype, 6)
    X2, D2 = _factors(m2, T2, a, b, dtype, 7)
    ref = ghost_gram_reference(X1.double(), D1.double(), X2.double(), D2.double())
    _close(blocked_gram(X1, D1, X2, D2, budget=budget), ref, TOL[dtype])
    sym = blocked_gram(X1, D1, X1, D1, same=True, budget=budget)
    assert torch.equal(sym, sym.T)
    _close(sym, ghost_gram_reference(X1.double(), D1.double(), X1.double(), D1.double()), TOL[dtype])
    tok1, tok2 = torch.randint(0, 3, (m1, T1)), torch.randint(0, 3, (m2, T2))
    eref = embedding_gram_reference(tok1, D1.double(), tok2, D2.double())
    _close(blocked_gram(tok1, D1, tok2, D2, budget=budget), eref, TOL[dtype])
    _close(embedding_gram(tok1, D1, tok2, D2, backend="blocked"), eref, TOL[dtype])
    _close(ghost_gram(X1, D1, X2, D2, backend="blocked"), ref, TOL[dtype])


@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("m1,m2,T,budget", [(40, 40, 4, 64), (40, 7, 3, 100), (5, 50, 8, 64), (30, 30, 1, 10)])
def test_blocked_tiles_stay_within_budget(monkeypatch, same, m1, m2, T, budget):
    """Every token-pair tile the blocked path forms has at most `budget` elements (unless one pair exceeds it)."""
    from minintk.kernels import blocked

    sizes = []
    real = blocked.mm_fp32

    def spy(a, b):
        sizes.append(a.shape[0] * b.shape[1])
        return real(a, b)

    monkeypatch.setattr(blocked, "mm_fp32", spy)
    X1, D1 = _factors(m1, T, 3, 5, torch.float32, 8)
    X2, D2 = (X1, D1) if same else _factors(m2, T, 3, 5, torch.float32, 9)
    got = blocked.blocked_gram(X1, D1, X2, D2, same=same, budget=budget)
    assert max(sizes) <= max(budget, T * T)
    _close(got, ghost_gram_reference(X1.double(), D1.double(), X2.double(), D2.double()), TOL[torch.float32])


def test_embedding_reference_equals_one_hot_gradients():
    """Independent check: form the (V, d) gradients with one-hot matrices and dot them."""
    g = torch.Generator().manual_seed(6)
    V, d = 7, 5
    tok1, tok2 = torch.randint(0, V, (3, 6), generator=g), torch.randint(0, V, (4, 2), generator=g)
    D1, D2 = torch.randn(3, 6, d, generator=g).double(), torch.randn(4, 2, d, generator=g).double()
    G1 = torch.einsum("itv,itd->ivd", torch.nn.functional.one_hot(tok1, V).double(), D1).flatten(1)
    G2 = torch.einsum("jtv,jtd->jvd", torch.nn.functional.one_hot(tok2, V).double(), D2).flatten(1)
    torch.testing.assert_close(embedding_gram(tok1, D1, tok2, D2), G1 @ G2.T, rtol=1e-12, atol=1e-12)


@given(
    m1=st.integers(1, 4), m2=st.integers(1, 4), T1=st.integers(1, 5), T2=st.integers(1, 5),
    d=st.integers(1, 6), V=st.integers(1, 9), seed=st.integers(0, 2**16),
)  # fmt: skip
@settings(max_examples=25, deadline=None)
def test_embedding_linear_cross_equals_formed_gradients(m1, m2, T1, T2, d, V, seed):
    g = torch.Generator().manual_seed(seed)
    tok1 = torch.randint(0, V, (m1, T1), generator=g)
    D1 = torch.randn(m1, T1, d, generator=g, dtype=torch.float64)
    X2 = torch.randn(m2, T2, d, generator=g, dtype=torch.float64)
    D2 = torch.randn(m2, T2, V, generator=g, dtype=torch.float64)
    G1 = torch.einsum("itv,itd->ivd", torch.nn.functional.one_hot(tok1, V).double(), D1).flatten(1)
    G2 = torch.einsum("jtv,jtd->jvd", D2, X2).flatten(1)
    torch.testing.assert_close(embedding_linear_cross(tok1, D1, X2, D2), G1 @ G2.T, rtol=1e-12, atol=1e-12)


@given(
    m1=st.integers(1, 5), m2=st.integers(1, 5), T1=st.integers(1, 6), T2=st.integers(1, 6),
    a=st.integers(1, 7), b=st.integers(1, 7), seed=st.integers(0, 2**16),
)  # fmt: skip
@settings(max_examples=25, deadline=None)
def test_torch_paths_fp64_equal_formed_gradients(m1, m2, T1, T2, a, b, seed):
    X1, D1 = (t.double() for t in _factors(m1, T1, a, b, torch.float32, seed))
    X2, D2 = (t.double() for t in _factors(m2, T2, a, b, torch.float32, seed + 1))
    ref = materialized_gram_reference(X1, D1, X2, D2)
    torch.testing.assert_close(ghost_gram(X1, D1, X2, D2), ref, rtol=1e-12, atol=1e-10)
    # budget=1 forces one weight row per slice: the slicing is exercised too.
    torch.testing.assert_close(materialized_gram(X1, D1, X2, D2, budget=1), ref, rtol=1e-12, atol=1e-10)
    sym = materialized_gram(X1, D1, budget=a)
    torch.testing.assert_close(sym, materialized_gram_reference(X1, D1, X1, D1), rtol=1e-12, atol=1e-10)
    assert torch.equal(sym, sym.T)
    torch.testing.assert_close(materialized_gram(X1, D1, budget=a, symmetrize=False), sym, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("b,rows", [(300, 100), (300, 150), (50, 20), (200, 7)])
def test_materialized_slices_are_aligned_and_cover_every_row(monkeypatch, b, rows):
    """Slices of >= 64 weight rows start on multiples of 64 (cuBLAS alignment), smaller ones on multiples of 8,
    stay within the budget, and together give the unsliced Gram."""
    X1, D1 = (t.double() for t in _factors(3, 4, 5, b, torch.float32, 11))
    X2, D2 = (t.double() for t in _factors(2, 3, 5, b, torch.float32, 12))
    starts = []
    real = materialized._slice_grads
    monkeypatch.setattr(materialized, "_slice_grads", lambda X, D, b0, b1, keep: starts.append((b0, b1)) or real(
        X, D, b0, b1, keep))
    got = materialized_gram(X1, D1, X2, D2, budget=rows * (3 + 2) * 5)
    torch.testing.assert_close(got, materialized_gram_reference(X1, D1, X2, D2), rtol=1e-12, atol=1e-10)
    starts = sorted(set(starts))  # each slice is formed for both sample sets
    sizes = {b1 - b0 for b0, b1 in starts[:-1]}
    assert len(sizes) <= 1 and all(s <= rows for s in sizes) and starts[-1][1] == b
    align = 64 if rows >= 64 else 8 if rows >= 8 else 1
    assert all(b0 % align == 0 for b0, _ in starts)


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
    torch.testing.assert_close(materialized.gram_split_k(G1, G2, pieces), G1 @ G2.T, rtol=1e-12, atol=1e-12)
    got = materialized.gram_split_k(G1.float(), G2.float(), pieces)
    assert got.dtype == torch.float32
    _close(got, G1.float().double() @ G2.float().double().T, 2e-5)


def test_split_k_only_for_few_sample_fp32_grams_on_cuda():
    """The rule: CUDA-core fp32, at most 128^2 outputs, pieces >= SPLIT_K_MIN_K long; never on CPU."""
    K, f32 = 2048 * 300, torch.float32
    assert materialized._split_k(64, 64, K, f32, cuda=False, tf32=False) == 1
    assert materialized._split_k(64, 64, K, f32, cuda=True, tf32=False) == materialized.SPLIT_K
    assert materialized._split_k(64, 64, 2048 * 10, f32, cuda=True, tf32=False) == 10
    assert materialized._split_k(128, 128, K, f32, cuda=True, tf32=False) == 64
    assert materialized._split_k(256, 256, K, f32, cuda=True, tf32=False) == 1
    assert materialized._split_k(64, 64, K, torch.bfloat16, cuda=True, tf32=False) == 1
    assert materialized._split_k(64, 64, K, f32, cuda=True, tf32=True) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_materialized_low_precision(dtype):
    X1, D1 = _factors(6, 9, 13, 21, dtype, 7)
    X2, D2 = _factors(3, 4, 13, 21, dtype, 8)
    ref = materialized_gram_reference(X1, D1, X2, D2)
    got = materialized_gram(X1, D1, X2, D2, budget=64)
    assert got.dtype == torch.float32
    _close(got, ref, TOL_MATERIALIZED[dtype])


def test_bad_inputs_are_named(monkeypatch):
    X, D = _factors(2, 3, 4, 5, torch.float32, 0)
    with pytest.raises(ValueError, match="must share"):
        ghost_gram(X, D[:, :2], X, D)
    with pytest.raises(ValueError, match="input features differ"):
        materialized_gram(X, D, X[..., :3], D)
    with pytest.raises(ValueError, match="integer token ids"):
        embedding_gram(X[..., 0], D)
    with pytest.raises(ValueError, match=r"lie in \[0, 5\)"):
        embedding_linear_cross(torch.full((2, 3), 5), X, X, D)
    with pytest.raises(ValueError, match="backend"):
        ghost_gram(X, D, backend="cuda")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            ghost_gram(X, D, backend="triton")
