"""Model loading (ground floor, beside ``cache/``): built-in offline aliases and local checkpoints.

The names below load on first use (PEP 562), so ``kvjudge.models.sim`` and ``kvjudge.models.base``
import without torch or transformers: a simulated agent or judge never loads them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "LoadedModel": "base", "ModelLoadError": "base", "default_device": "base", "default_dtype": "base",
    "REAL_ALIASES": "loading", "checkpoint_id": "loading", "load_model": "loading",
    "TINY_CONFIGS": "tiny", "byte_tokenizer": "tiny", "tiny_model": "tiny",
}

if TYPE_CHECKING:
    from kvjudge.models.base import LoadedModel, ModelLoadError, default_device, default_dtype
    from kvjudge.models.loading import REAL_ALIASES, checkpoint_id, load_model
    from kvjudge.models.tiny import TINY_CONFIGS, byte_tokenizer, tiny_model


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


__all__ = sorted(_HOMES)
