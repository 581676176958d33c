"""KVCOMM-style anchor pool: measured KV deviations reused to correct naively placed segments.

Pure torch. An *anchor* is one measurement, taken with a real dense prefill, of how far the KV of a
candidate placed naively (encoded alone after the judge prefix, then re-indexed to its slot) is
from the KV of the same tokens in the real judge prompt; and the same for the glue piece that
follows it. All tensors are kept in a position-free frame: keys rotated so the segment starts at
position 0 (``[L, H, T, D]``). Because RoPE is linear, a delta measured at one slot is moved to
another slot by rotating it, exactly like the keys themselves.

The approximation (after Ye et al., "KVCOMM", NeurIPS 2025), for a new segment with base ``K``
(``n`` tokens, frame 0) and the anchors ``a`` whose segment has at least ``n`` tokens:

* placeholder tokens: ``w[a, t] = softmax_a(-mean_{l>=1,h,d} |K[l,h,t,d] - K_a[l,h,t,d]| / tau)``,
  ``dK[t] = sum_a w[a, t] dK_a[t]`` (first ``n`` tokens of each anchor); values likewise with
  V-based distances;
* following glue (``m`` tokens): ``w[a, l, h, d] = softmax_a(-||G[l,h,:,d] - G_a[l,h,:m,d]||_2 / tau)``
  over the glue's base keys (values for the value delta);
* layer 0 is never corrected (its KV depends on the token alone);
* reuse or new anchor: ``d_a = ||V[:, :, :k] - V_a[:, :, :k]||_F`` on the first ``k`` tokens
  (all layers), ``H = entropy_2(softmax(-d / tau))``; fewer than ``min_anchors`` usable anchors or
  ``H > gamma * log2(#usable)`` means "measure a new anchor" (the caller runs dense prefill);
  otherwise the top-p anchors by weight get an activation;
* eviction: past ``max_anchors``, drop the least-activated of the oldest ``window`` anchors.

A new anchor with the same ``key`` (same slot of the same full prompt) replaces the old one.
Anchors of one candidate text measured at different slots share their base values, so the entropy
test cannot tell them apart and asks for a new anchor: the layout sensitivity that Liang et al.
(2026) report for anchor methods under shuffles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from kvjudge.cache.segments import KVSegment, rotate_keys


@dataclass
class Anchor:
    """One measured deviation; every tensor is ``[L, H, T, D]`` in the frame that starts at 0."""

    key: str  # what was measured: (prompt, slot); re-measuring the same key replaces the anchor
    slot: int
    base_k: torch.Tensor
    base_v: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    glue_k: torch.Tensor | None = None  # base KV of the following glue (None for the last slot)
    glue_v: torch.Tensor | None = None
    glue_dk: torch.Tensor | None = None
    glue_dv: torch.Tensor | None = None
    activations: int = 0
    born: int = 0

    @property
    def length(self) -> int:
        return self.base_k.shape[2]


@dataclass
class Correction:
    """Deltas to add to a segment (and its following glue), frame 0."""

    dk: torch.Tensor
    dv: torch.Tensor
    glue_dk: torch.Tensor | None = None
    glue_dv: torch.Tensor | None = None


def to_frame0(seg: KVSegment, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys rotated so the segment starts at position 0, and its values (fp32)."""
    return rotate_keys(seg.keys.float(), -seg.start, inv_freq), seg.values.float()


def apply(seg: KVSegment, dk: torch.Tensor, dv: torch.Tensor, inv_freq: torch.Tensor) -> KVSegment:
    """``seg`` plus frame-0 deltas ``dk``/``dv`` (rotated to the segment's own positions)."""
    keys = (seg.keys.float() + rotate_keys(dk, seg.start, inv_freq)).to(seg.keys.dtype)
    values = (seg.values.float() + dv).to(seg.values.dtype)
    return KVSegment(keys, values, seg.start, seg.token_ids)


def _token_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[1, 1, T, 1]``: mean |x - y| per token over layers, heads and channels of ``[L, H, T, D]``."""
    return (x - y).abs().mean(dim=(0, 1, 3), keepdim=True)


def _channel_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[L, H, 1, D]``: L2 distance per channel over the tokens of ``[L, H, T, D]``."""
    return torch.linalg.vector_norm(x - y, dim=2, keepdim=True)


@dataclass
class AnchorConfig:
    """Hyper-parameters of an anchor pool (KVCOMM's defaults)."""

    gamma: float = 0.3  # entropy threshold, as a fraction of log2(#anchors)
    max_anchors: int = 20
    window: int = 5  # eviction looks at this many oldest anchors
    top_p: float = 0.9  # anchors whose weights sum to this get an activation on reuse
    probe_tokens: int = 32  # tokens compared by the entropy test
    min_anchors: int = 2  # fewer usable anchors -> measure a new one
    tau: float = 1.0  # softmax temperature

    def anchor_config(self) -> "AnchorConfig":
        return AnchorConfig(**{f.name: getattr(self, f.name) for f in fields(AnchorConfig)})


@dataclass
class AnchorPool(AnchorConfig):
    """Anchors of one pool (one source agent for KVCOMM, one display slot for PAL-KV)."""

    anchors: list[Anchor] = field(default_factory=list)
    _clock: int = 0

    def usable(self, n: int) -> list[Anchor]:
        return [a for a in self.anchors if a.length >= n]

    def _weights(self, dist: torch.Tensor) -> torch.Tensor:
        return torch.softmax(-dist / self.tau, dim=0)

    def needs_anchor(self, base_v: torch.Tensor) -> bool:
        """Entropy test on the first ``probe_tokens`` values; bumps activations when reusing."""
        n = base_v.shape[2]
        pool = self.usable(n)
        if len(pool) < self.min_anchors:
            return True
        k = min(n, self.probe_tokens)
        dist = torch.stack([torch.linalg.vector_norm(base_v[:, :, :k] - a.base_v[:, :, :k]) for a in pool])
        w = self._weights(dist)
        entropy = float(-(w * torch.log2(w.clamp_min(1e-30))).sum())
        if entropy > self.gamma * math.log2(len(pool)):
            return True
        order = torch.argsort(w, descending=True)
        mass = 0.0
        for i in order.tolist():
            pool[i].activations += 1
            mass += float(w[i])
            if mass >= self.top_p:
                break
        return False

    def correction(
        self, base_k: torch.Tensor, base_v: torch.Tensor, glue_k: torch.Tensor | None, glue_v: torch.Tensor | None
    ) -> Correction | None:
        """Estimated deltas for a segment with frame-0 base KV ``[L, H, n, D]`` (None: no usable anchor).

        Streams over the anchors (one anchor's tensors live at a time, upcast to fp32), so memory stays
        at a few segments whatever the pool size; anchors may be stored in the model's dtype.
        """
        n = base_k.shape[2]
        pool = self.usable(n)
        if not pool:
            return None
        out = Correction(self._blend(pool, base_k, "base_k", "dk", _token_distance),
                         self._blend(pool, base_v, "base_v", "dv", _token_distance))
        if glue_k is not None and glue_v is not None:
            gpool = [a for a in pool if a.glue_k is not None and a.glue_k.shape[2] >= glue_k.shape[2]]
            if gpool:
                out.glue_dk = self._blend(gpool, glue_k, "glue_k", "glue_dk", _channel_distance)
                out.glue_dv = self._blend(gpool, glue_v, "glue_v", "glue_dv", _channel_distance)
        return out

    def _blend(self, pool: list[Anchor], base: torch.Tensor, stored: str, delta: str, dist) -> torch.Tensor:
        """``sum_a softmax_a(-dist(base, a.stored) / tau) * a.delta`` over the first ``T`` tokens of each
        anchor, layers 1.. only (layer 0 stays zero); fp32 ``[L, H, T, D]`` for ``base`` ``[L, H, T, D]``.
        One anchor is upcast at a time."""
        t = base.shape[2]
        b = base[1:].float()
        w = self._weights(torch.stack([dist(b, getattr(a, stored)[1:, :, :t].float()) for a in pool]))
        out = torch.zeros_like(base, dtype=torch.float32)
        for a, wa in zip(pool, w):
            out[1:].addcmul_(getattr(a, delta)[1:, :, :t].float(), wa)
        return out

    def add(self, anchor: Anchor) -> None:
        """Insert a measured anchor (replacing one with the same key), then evict."""
        self._clock += 1
        anchor.born = self._clock
        self.anchors = [a for a in self.anchors if a.key != anchor.key]
        self.anchors.append(anchor)
        while len(self.anchors) > self.max_anchors:
            oldest = sorted(self.anchors, key=lambda a: a.born)[: self.window]
            victim = min(oldest, key=lambda a: (a.activations, a.born))
            self.anchors.remove(victim)
