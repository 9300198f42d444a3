"""The empirical NTK Gram K = J J^T of a torch model, layer by layer, in bounded memory (docs/theory.md s. 2).

One ntk() call, file by file:
  api        validate, prepare, then the steps below (or the per-sample references)
  inputs     samples and their checks; parameters selected on the caller's model, carried to a converted copy
  probe      one pass over a few samples finds the Structure (cached per model); checks.py says what is routed
  plan       layer groups x sample blocks x capture mode that fit the memory budget at the fewest passes
  tiles      per group and tile: capture (capture.py, blocks.py, recorder.py) then contract (contract.py)
  graphs     small Grams repeated with inputs of one shape: the tiles' kernels replayed from a CUDA graph
  variants   kernels of other optimizers (SignGD, Adam-preconditioned): per-parameter materialized Grams
  reference  per-sample gradients of the whole model, for parameters the layer algebra does not cover
"""

from .api import clear_cache, default_budget, layer_structure, ntk, ntk_fn, plan
from .contract import STRATEGIES, choose_form
from .errors import NTKError
from .inputs import last_blocks, select_params
from .outputs import label_words
from .plan import CostModel, Plan, Sizes, plan_gram
from .precision import PRECISIONS
from .spec import Spec
from .stats import Stats
from .structure import Chain, Structure
from .variants import KERNELS, Variant, adam, signgd

__all__ = [
    "adam", "Chain", "choose_form", "clear_cache", "CostModel", "default_budget", "KERNELS", "label_words",
    "last_blocks", "layer_structure", "ntk", "ntk_fn", "NTKError", "Plan", "plan", "plan_gram", "PRECISIONS",
    "select_params", "signgd", "Sizes", "Spec", "Stats", "STRATEGIES", "Structure", "Variant"
]
