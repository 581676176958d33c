"""The interface of a compression method ("press", as in kvpress) and the three ways to select tokens.

A press is a dataclass whose fields are its hyper-parameters; ``ratio`` is the *kept* fraction
(``compression_ratio = 1 - ratio`` in kvpress terms). It scores the segment's tokens once and keeps
the best under its budget:

* ``head``: scores ``[L, H, T]``, each (layer, KV head) keeps ``k = round(ratio * T)`` tokens;
* ``layer``: scores ``[L, T]``, each layer keeps ``k`` tokens for all its heads;
* ``global``: scores ``[L, T]``, the best ``L * k`` (layer, token) pairs model-wide (layers differ).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvjudge.cache.compress.observe import Observation, observe
from kvjudge.cache.segments import CompressedSegment, KVSegment


class CompressError(ValueError):
    """A bad compression setting (one line)."""


def kept_count(n: int, ratio: float) -> int:
    """Entries kept of ``n`` at ``ratio`` (at least one, at most ``n``)."""
    return min(n, max(1, round(ratio * n)))


def select(scores: torch.Tensor, ratio: float, granularity: str, heads: int) -> torch.Tensor:
    """Bool keep mask ``[L, H, T]`` from ``scores`` (``[L, H, T]`` for ``head``, ``[L, T]`` otherwise)."""
    T = scores.shape[-1]
    k = kept_count(T, ratio)
    if granularity == "global":
        flat = scores.reshape(-1)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(kept_count(flat.numel(), k / T)).indices] = True
        return keep.view(scores.shape).unsqueeze(1).expand(-1, heads, -1).clone()
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(-1, scores.topk(k, dim=-1).indices, True)
    return keep if granularity == "head" else keep.unsqueeze(1).expand(-1, heads, -1).clone()


@dataclass
class Press(ABC):
    """Scores a segment's tokens and keeps the best ``ratio`` of them (see the module docstring)."""

    ratio: float = 1.0
    name: ClassVar[str] = ""
    granularity: ClassVar[str] = "head"
    needs_observation: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not 0.0 < float(self.ratio) <= 1.0:
            raise CompressError(f"{self.name}: kept ratio must be in (0, 1], not {self.ratio!r}")

    @property
    def compression_ratio(self) -> float:
        """The evicted fraction (kvpress's ``compression_ratio``)."""
        return 1.0 - self.ratio

    @abstractmethod
    def score(self, segment: KVSegment, obs: Observation | None) -> torch.Tensor:
        """Higher = keep: ``[L, H, T]`` for per-head presses, ``[L, T]`` for per-layer / global ones."""

    @torch.inference_mode()
    def compress(self, segment: KVSegment, model: torch.nn.Module | None = None,
                 context: KVSegment | None = None) -> KVSegment | CompressedSegment:
        """The compressed segment; ``segment`` itself (unscored, not a wrapper) when nothing would be
        dropped: at ``ratio == 1``, for an empty segment, or when the budget keeps every entry."""
        if not isinstance(segment, KVSegment):
            raise CompressError(f"can only compress an uncompressed KVSegment, not {type(segment).__name__}")
        L, H, T, _ = segment.keys.shape
        if self.ratio >= 1.0 or T == 0:
            return segment
        obs = None
        if self.needs_observation:
            if model is None:
                raise CompressError(f"{self.name} scores against an observation window: it needs the model")
            obs = observe(model, segment, context, getattr(self, "window"))
        scores = self.score(segment, obs).float().cpu()
        keep = select(scores, self.ratio, self.granularity, H)
        return segment if bool(keep.all()) else CompressedSegment.from_keep(segment, keep)
