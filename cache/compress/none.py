"""``none``: no compression; the segment is stored as it is (today's behaviour, byte for byte)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvjudge.cache.segments import KVSegment


@dataclass
class NoPress:
    ratio: float = 1.0
    name = "none"

    def compress(self, segment: KVSegment, model: torch.nn.Module | None = None,
                 context: KVSegment | None = None) -> KVSegment:
        return segment
