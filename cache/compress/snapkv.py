"""``snapkv``: SnapKV (Li et al., 2024): the attention the observation window's queries pay to each
token, averaged over the window and over the query heads of each KV group, smoothed by 1-D pooling;
each (layer, KV head) keeps its best tokens, and the window itself is always kept (as kvpress does).

The window is the segment's own last ``window`` tokens (see :mod:`kvjudge.cache.compress.observe`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvjudge.cache.compress.base import Press
from kvjudge.cache.compress.observe import Observation
from kvjudge.cache.segments import KVSegment


@dataclass
class SnapKVPress(Press):
    window: int = 8
    kernel: int = 5
    name = "snapkv"
    granularity = "head"
    needs_observation = True

    def score(self, segment: KVSegment, obs: Observation | None) -> torch.Tensor:
        L, H, T, _ = segment.keys.shape
        out = []
        for probs in obs.probs:  # [H_q, w, C + T]
            a = probs[:, :, obs.context_length:].mean(1)  # [H_q, T]
            a = a.view(H, -1, T).mean(1)  # [H, T]
            a = F.avg_pool1d(a.unsqueeze(1), self.kernel, stride=1, padding=self.kernel // 2,
                             count_include_pad=False).squeeze(1)
            a[:, T - obs.window:] = a.max() + 1.0  # keep the window
            out.append(a)
        return torch.stack(out)  # [L, H, T]
