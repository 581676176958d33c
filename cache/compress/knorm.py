"""``knorm``: keep the keys with the *lowest* L2 norm, per (layer, KV head) (Devoto et al., 2024).

RoPE is a rotation, so the norm of a stored (post-RoPE) key equals that of the raw key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvjudge.cache.compress.base import Press
from kvjudge.cache.compress.observe import Observation
from kvjudge.cache.segments import KVSegment


@dataclass
class KnormPress(Press):
    name = "knorm"
    granularity = "head"

    def score(self, segment: KVSegment, obs: Observation | None) -> torch.Tensor:
        return -segment.keys.float().norm(dim=-1)  # [L, H, T]
