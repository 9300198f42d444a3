"""Gram contractions of the NTK engine: Triton kernels beside their plain-torch references.

Each function takes a layer's captured factors for two sample sets and returns the (m1, m2) Gram of
their per-sample parameter gradients, fp32-accumulated (fp64 for fp64 inputs, via the reference).
On CUDA tensors the Triton kernels run; on CPU the torch references (or the kernels under
TRITON_INTERPRET=1).
"""

from .embedding import embedding_gram, embedding_gram_reference, embedding_linear_cross
from .ghost import ghost_gram, ghost_gram_reference
from .materialized import materialized_gram, materialized_gram_reference

__all__ = [
    "embedding_gram",
    "embedding_gram_reference",
    "embedding_linear_cross",
    "ghost_gram",
    "ghost_gram_reference",
    "materialized_gram",
    "materialized_gram_reference",
]
