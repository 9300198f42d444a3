"""kernels/ghost.py: both paths (torch reference, blocked cuBLAS token pairs) against an fp64 Gram of formed
per-sample gradients, and ghost_gram's choice between them.

Shapes are ragged (one token, one sample, token counts and feature sizes that do not divide each other).
16-bit inputs are rounded before the fp64 reference sees them, so every dtype's error is fp32 accumulation.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from minintk.kernels import ghost_gram, ghost_gram_blocked, ghost_gram_per_output, ghost_gram_reference, mirror_upper

# (dtype, atol relative to max |K|, rtol)
DTYPES = [
    (torch.float32, 2e-5, 1e-5),
    (torch.bfloat16, 2e-5, 1e-5),
    (torch.float16, 2e-5, 1e-5),
    (torch.float64, 1e-12, 1e-12),
]
SHAPES = [  # (m1, m2, T1, T2, a, b)
    (1, 1, 1, 1, 1, 1),
    (3, 5, 7, 7, 5, 33),
    (4, 2, 17, 9, 20, 3),
    (9, 9, 8, 8, 16, 16),
]
PATHS = {"reference": ghost_gram_reference, "blocked": ghost_gram_blocked}


def formed_gram(X1, D1, X2, D2) -> torch.Tensor:
    """<G1_i, G2_j>_F with every per-sample gradient G = D^T X formed in fp64."""
    G1 = torch.einsum("itb,ita->iba", D1.double(), X1.double()).flatten(1)
    G2 = torch.einsum("jtb,jta->jba", D2.double(), X2.double()).flatten(1)
    return G1 @ G2.T


def factors(m, T, a, b, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, T, a, generator=g).to(dtype), torch.randn(m, T, b, generator=g).to(dtype)


def assert_gram(got, ref, dtype, atol, rtol):
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), got.dtype
    torch.testing.assert_close(got.double(), ref, atol=atol * float(ref.abs().max()), rtol=rtol)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_path_matches_formed_gradients(path, shape, dtype, atol, rtol):
    m1, m2, T1, T2, a, b = shape
    X1, D1 = factors(m1, T1, a, b, dtype, 0)
    X2, D2 = factors(m2, T2, a, b, dtype, 1)
    got = PATHS[path](X1, D1, X2, D2)
    assert got.shape == (m1, m2)
    assert_gram(got, formed_gram(X1, D1, X2, D2), dtype, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("m, T", [(1, 3), (5, 7), (11, 4)])
def test_blocked_symmetric_is_exactly_symmetric(m, T, dtype, atol, rtol):
    X, D = factors(m, T, 6, 19, dtype, 2)
    got = ghost_gram_blocked(X, D, X, D, same=True, budget=2 * T * T)  # several tiles, mirrored
    assert torch.equal(got, got.T)
    assert_gram(got, formed_gram(X, D, X, D), dtype, atol, rtol)


@given(
    m1=st.integers(1, 5), m2=st.integers(1, 5), T1=st.integers(1, 6), T2=st.integers(1, 6),
    a=st.integers(1, 7), b=st.integers(1, 7), budget=st.integers(1, 200), seed=st.integers(0, 2**16),
    dtype=st.sampled_from(DTYPES),
)  # fmt: skip
@settings(max_examples=25, deadline=None)
def test_ragged_shapes_and_budgets(m1, m2, T1, T2, a, b, budget, seed, dtype):
    dtype, atol, rtol = dtype
    X1, D1 = factors(m1, T1, a, b, dtype, seed)
    X2, D2 = factors(m2, T2, a, b, dtype, seed + 1)
    ref = formed_gram(X1, D1, X2, D2)
    for path in PATHS.values():
        assert_gram(path(X1, D1, X2, D2, budget=budget), ref, dtype, atol, rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_takes_the_reference(dtype):
    X1, D1 = factors(3, 4, 5, 6, dtype, 3)
    X2, D2 = factors(2, 5, 5, 6, dtype, 4)
    assert torch.equal(ghost_gram(X1, D1, X2, D2), ghost_gram_reference(X1, D1, X2, D2))
    sym = ghost_gram(X1, D1)
    assert torch.equal(sym, mirror_upper(ghost_gram_reference(X1, D1, X1, D1)))
    assert torch.equal(ghost_gram(X1, D1, X1, D1), sym)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_takes_blocked_except_float64():
    X, D = factors(6, 5, 7, 9, torch.float32, 5)
    X, D = X.cuda(), D.cuda()
    assert torch.equal(ghost_gram(X, D), ghost_gram_blocked(X, D, X, D, same=True))
    Xd, Dd = X.double(), D.double()
    assert torch.equal(ghost_gram(Xd, Dd, Xd, Dd.clone()), ghost_gram_reference(Xd, Dd, Xd, Dd))


def test_mixed_dtypes_are_promoted():
    X, D = factors(3, 4, 5, 6, torch.float32, 6)
    for path in (ghost_gram, ghost_gram_blocked, ghost_gram_reference):
        got = path(X, D.double(), X, D.double())
        assert got.dtype == torch.float64, (path.__name__, got.dtype)
        torch.testing.assert_close(got, formed_gram(X, D, X, D), atol=1e-12, rtol=1e-12)


def test_bad_inputs_are_named():
    X, D = factors(2, 3, 4, 5, torch.float32, 0)
    with pytest.raises(ValueError, match="must share"):
        ghost_gram(X, D[:, :2], X, D)
    with pytest.raises(ValueError, match="input features differ"):
        ghost_gram_blocked(X, D, X[..., :3], D)
    with pytest.raises(ValueError, match="floating-point"):
        ghost_gram(X.int(), D)
    with pytest.raises(ValueError, match="both X2 and D2"):
        ghost_gram(X, D, X)
    with pytest.raises(ValueError, match="same=True"):
        ghost_gram_blocked(X, D, X.clone(), D, same=True)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("C", [1, 3])
def test_per_output_matches_formed_gradients(shape, C, dtype, atol, rtol):
    """The diagonal over outputs: one ghost Gram per output c, all sharing the inputs X."""
    m1, m2, T1, T2, a, b = shape
    X1, _ = factors(m1, T1, a, b, dtype, 0)
    X2, _ = factors(m2, T2, a, b, dtype, 1)
    g = torch.Generator().manual_seed(2)
    D1, D2 = torch.randn(m1, C, T1, b, generator=g).to(dtype), torch.randn(m2, C, T2, b, generator=g).to(dtype)
    got = ghost_gram_per_output(X1, D1, X2, D2, budget=37)  # a small budget: many sample chunks
    assert got.shape == (m1, m2, C)
    ref = torch.stack([formed_gram(X1, D1[:, c], X2, D2[:, c]) for c in range(C)], -1)
    assert_gram(got, ref, dtype, atol, rtol)
