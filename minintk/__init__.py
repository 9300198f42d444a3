"""minintk: the empirical NTK of transformer LMs, and the theory of fine-tuning with early stopping."""

from .config import ConfigError, DecoderConfig, gpt_neo_config
from .model import Decoder, ModelInputError

__version__ = "0.1.0"
__all__ = ["ConfigError", "Decoder", "DecoderConfig", "ModelInputError", "gpt_neo_config"]
