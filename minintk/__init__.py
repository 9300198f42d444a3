"""minintk: the empirical NTK of transformer LMs, and the theory of fine-tuning with early stopping.

Everything the README shows is importable from here (`from minintk import ntk, load_gpt_neo`); the names are
resolved on first use, so `import minintk` stays light.
"""

from __future__ import annotations

import importlib

from .config import ConfigError, DecoderConfig, gpt_neo_config
from .model import Decoder, ModelInputError

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    **dict.fromkeys(["ntk", "ntk_fn", "plan", "label_words", "last_blocks", "select_params", "clear_cache",
                     "NTKError", "Plan"], "engine"),
    **dict.fromkeys(["load_gpt_neo", "save_gpt_neo", "load_tokenizer", "CheckpointError"], "gptneo"),
    **dict.fromkeys(["gradient_descent_mse", "gradient_flow_mse", "kernel_ridge", "DynamicsError"], "dynamics"),
    **dict.fromkeys(["eigenvalues", "fit_power_law", "implied_rate", "SpectrumError"], "spectrum"),
    **dict.fromkeys(["stopping_time", "critical_radius", "error_bound", "estimate_sigma", "default_step",
                     "holdout_stop", "StoppingError"], "stopping"),
    **dict.fromkeys(["linearize", "LinearizeError"], "linearize"),
    **dict.fromkeys(["task_vector", "cosine_matrix", "disentanglement_error"], "task_vectors"),
    **dict.fromkeys(["eigen_target", "lazy_teacher", "PlantedError"], "planted"),
}

__all__ = ["ConfigError", "Decoder", "DecoderConfig", "ModelInputError", "gpt_neo_config", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'minintk' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
