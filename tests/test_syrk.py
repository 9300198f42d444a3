"""The symmetric Gram (kernels.syrk.gram_upper) against the fp64 G G^T: ragged row counts, every band layout,
fp64 / fp32 / bf16 inputs with their tolerances."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from minintk.kernels import gram_upper, gram_upper_reference, mirror_upper

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}  # relative to the largest entry


@given(m=st.integers(1, 40), K=st.integers(1, 50), block=st.integers(1, 45),
       dtype=st.sampled_from(list(TOL)), seed=st.integers(0, 2**16))
def test_upper_triangle_matches_fp64(m, K, block, dtype, seed):
    G = torch.randn(m, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    got = gram_upper(G, block)
    ref = gram_upper_reference(G)  # from the rounded G: the kernel's own error only
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    err = ((torch.triu(got).double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()
    assert err <= TOL[dtype], f"m={m} K={K} block={block} {dtype}: error {err:.2e}"
    full = mirror_upper(got).double()
    assert torch.equal(full, full.T)


def test_bands_skip_the_lower_blocks():
    G = torch.randn(12, 5, dtype=torch.float64)
    got = gram_upper(G, 4)
    assert torch.count_nonzero(got[4:8, :4]) == 0 and torch.count_nonzero(got[8:, :8]) == 0
    torch.testing.assert_close(torch.triu(got), gram_upper_reference(G))


@pytest.mark.parametrize("G, block, match", [
    (torch.zeros(3), 2, "must be 2-D"), (torch.zeros(3, 2), 0, "block must be >= 1, got 0"),
])  # fmt: skip
def test_bad_input_is_named(G, block, match):
    with pytest.raises(ValueError, match=match):
        gram_upper(G, block)
