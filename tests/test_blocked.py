"""kernels/blocked.py: the token-pair tiling under the ghost and embedding blocked paths. Tiles stay within the
budget and, with same=True, only tiles on and above the diagonal are formed; the Gram is the fp64 one."""

from __future__ import annotations

import pytest
import torch
from minintk.kernels.blocked import token_pair_gram


@pytest.mark.parametrize("same", [False, True])
@pytest.mark.parametrize("m1, m2, T, budget", [(40, 40, 4, 64), (40, 7, 3, 100), (5, 50, 8, 64), (30, 30, 1, 10)])
def test_tiles_stay_within_budget(same, m1, m2, T, budget):
    """P = all ones: the Gram is sum_{t,s} D1[i,t] . D2[j,s]. Every tile has at most `budget` elements (unless
    one sample pair exceeds it), and a symmetric Gram forms no tile wholly below the diagonal."""
    g = torch.Generator().manual_seed(0)
    D1 = torch.randn(m1, T, 5, generator=g)
    D2 = D1 if same else torch.randn(m2, T, 5, generator=g)
    tiles = []

    def weigh(Q, rows, cols):
        tiles.append((rows, cols))
        assert Q.shape == (rows.stop - rows.start, cols.stop - cols.start)
        return Q

    got = token_pair_gram(D1, D2, weigh, same=same, budget=budget)
    assert max((r.stop - r.start) * (c.stop - c.start) for r, c in tiles) <= max(budget, T * T)
    if same:
        assert all(c.stop > r.start for r, c in tiles), "a tile below the diagonal was formed"
        assert torch.equal(got, got.T)
    ref = D1.double().sum(1) @ D2.double().sum(1).T
    torch.testing.assert_close(got.double(), ref, atol=2e-5 * float(ref.abs().max()), rtol=1e-5)


def test_empty_sides_give_zeros():
    D = torch.randn(3, 4, 5)
    out = token_pair_gram(D, D[:0], lambda Q, r, c: Q)
    assert out.shape == (3, 0) and out.dtype == torch.float32
    out = token_pair_gram(D[:, :0], D[:, :0], lambda Q, r, c: Q, same=True)
    assert torch.equal(out, torch.zeros(3, 3))
