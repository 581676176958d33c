"""``streaming``: StreamingLLM (Xiao et al., 2024): keep the first ``n_sink`` tokens (attention sinks)
and the most recent ones, the same set in every layer and head.

Inside a stored candidate the "sinks" are the candidate's first tokens (the judge prompt's real sink,
its BOS, is in the prefix, which is never compressed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvjudge.cache.compress.base import Press
from kvjudge.cache.compress.observe import Observation
from kvjudge.cache.segments import KVSegment


@dataclass
class StreamingPress(Press):
    n_sink: int = 4
    name = "streaming"
    granularity = "layer"

    def score(self, segment: KVSegment, obs: Observation | None) -> torch.Tensor:
        L, _, T, _ = segment.keys.shape
        scores = torch.arange(T, dtype=torch.float32)  # recent first
        scores[: self.n_sink] = float(T + 1)  # sinks before everything
        return scores.expand(L, T)
