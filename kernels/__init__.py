"""Gram contractions of the NTK engine, one file per contraction with its paths side by side.

Each function takes a layer's captured factors for two sample sets and returns the (m1, m2) Gram of
their per-sample parameter gradients, fp32-accumulated (fp64 for fp64 inputs). ghost_gram and
embedding_gram pick their path from the tensors: the blocked cuBLAS token-pair path on CUDA (32- and
16-bit dtypes), the plain-torch reference on CPU and for float64; both paths are public too.
"""

from ._common import mirror_upper
from .embedding import (
    embedding_grad_slice,
    embedding_gram,
    embedding_gram_blocked,
    embedding_gram_reference,
    embedding_linear_cross,
)
from .ghost import ghost_gram, ghost_gram_blocked, ghost_gram_per_output, ghost_gram_reference
from .materialized import grad_slice, materialized_gram, materialized_gram_reference
from .syrk import SYRK_BLOCK, gram_upper, gram_upper_reference

__all__ = [
    "SYRK_BLOCK",
    "embedding_grad_slice",
    "embedding_gram",
    "embedding_gram_blocked",
    "embedding_gram_reference",
    "embedding_linear_cross",
    "ghost_gram",
    "ghost_gram_blocked",
    "ghost_gram_per_output",
    "ghost_gram_reference",
    "grad_slice",
    "gram_upper",
    "gram_upper_reference",
    "materialized_gram",
    "materialized_gram_reference",
    "mirror_upper",
]
