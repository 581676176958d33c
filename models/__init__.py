"""Model loading (ground floor, beside ``cache/``): built-in offline aliases and local checkpoints."""

from kvjudge.models.base import LoadedModel, ModelLoadError, default_device, default_dtype
from kvjudge.models.loading import REAL_ALIASES, checkpoint_id, load_model
from kvjudge.models.tiny import TINY_CONFIGS, byte_tokenizer, tiny_model

__all__ = [
    "LoadedModel", "ModelLoadError", "REAL_ALIASES", "TINY_CONFIGS", "byte_tokenizer", "checkpoint_id",
    "default_device", "default_dtype", "load_model", "tiny_model",
]
