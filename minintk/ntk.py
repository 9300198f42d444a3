"""Deprecated alias of `minintk.engine`, kept for one release: import from `minintk` instead
(`from minintk import ntk, label_words`). Importing it warns; the module object is callable as `ntk`."""

import sys
import types
import warnings

from . import engine
from .engine import *  # noqa: F403
from .engine import NTKError, Plan, clear_cache, label_words, last_blocks, ntk, ntk_fn, plan, select_params  # noqa: F401

warnings.warn("minintk.ntk is deprecated and goes in the next release: use `from minintk import ntk, label_words, ...`",
              DeprecationWarning, stacklevel=2)


class _CallableModule(types.ModuleType):
    """`import minintk.ntk` rebinds the name minintk.ntk to this module: calling it still computes the Gram."""

    def __call__(self, *args, **kwargs):
        return engine.ntk(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
