"""The registry of compression methods (an explicit dict, one method per module) and ``compress_segment``.

It lives here rather than in the package ``__init__`` so that ``kvjudge.cache.compress.catalog`` stays
importable without torch (as ``judges/catalog.py`` beside ``judges/methods/__init__.py``); a test keeps
the two name lists equal.
"""

from __future__ import annotations

import torch

from kvjudge.cache.compress.base import CompressError, Press, kept_count, select
from kvjudge.cache.compress.catalog import COMPRESSION_METHODS
from kvjudge.cache.compress.knorm import KnormPress
from kvjudge.cache.compress.laprox import LaProxPress
from kvjudge.cache.compress.none import NoPress
from kvjudge.cache.compress.random_press import RandomPress
from kvjudge.cache.compress.snapkv import SnapKVPress
from kvjudge.cache.compress.streaming import StreamingPress
from kvjudge.cache.segments import CompressedSegment, KVSegment

PRESSES: dict[str, type] = {
    "none": NoPress,
    "laprox": LaProxPress,
    "streaming": StreamingPress,
    "snapkv": SnapKVPress,
    "knorm": KnormPress,
    "random": RandomPress,
}


def make_press(method: str, ratio: float = 1.0, **options) -> Press | NoPress:
    """A press by registry name; unknown names and bad options are one-line :class:`CompressError`."""
    if method not in PRESSES:
        raise CompressError(f"unknown compression method {method!r}; known: {', '.join(COMPRESSION_METHODS)}")
    try:
        return PRESSES[method](ratio=float(ratio), **options)
    except TypeError as exc:
        raise CompressError(f"bad options for compression method {method!r}: {exc}") from None


def compress_segment(segment: KVSegment, model: torch.nn.Module | None, method: str, ratio: float,
                     context: KVSegment | None = None, **options) -> KVSegment | CompressedSegment:
    """``segment`` compressed by ``method`` to the kept fraction ``ratio``; the segment itself (not a
    wrapper keeping every entry) for ``none``, at ``ratio == 1`` and whenever nothing would be dropped.

    ``model`` is the causal LM (``LoadedModel.model``) the segment was encoded with, needed by the
    observation-window methods (``snapkv``, ``laprox``); ``context`` is the KV the segment was encoded
    after (positions ``0..segment.start-1``), which those methods' window also attends to.
    """
    return make_press(method, ratio, **options).compress(segment, model, context)


__all__ = ["COMPRESSION_METHODS", "PRESSES", "CompressError", "CompressedSegment", "Press", "compress_segment",
           "kept_count", "make_press", "select"]
