"""``random``: keep a uniformly random subset per (layer, KV head): the floor every method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvjudge.cache.compress.base import Press
from kvjudge.cache.compress.observe import Observation
from kvjudge.cache.segments import KVSegment


@dataclass
class RandomPress(Press):
    seed: int = 0
    name = "random"
    granularity = "head"

    def score(self, segment: KVSegment, obs: Observation | None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.rand(segment.keys.shape[:3], generator=gen)
