"""KV segments: the keys/values of a run of tokens, with the positions their keys were rotated for.

Pure torch, no model and no Ray. Shapes use ``L`` layers, ``H`` KV heads (before GQA's
``repeat_kv``), ``T`` tokens and ``D`` head dim.

Keys in a transformers cache are stored *after* RoPE, values are never rotated. Because
``R(p + d) = R(d) R(p)``, moving a segment by ``d`` positions is one more rotation by ``d``:
``k' = k cos(d w) + rotate_half(k) sin(d w)`` with the model's own inverse frequencies ``w``.
The rotation is done in fp32 and is exact up to rounding (no ``attention_scaling`` is involved:
the angle is computed from ``inv_freq`` directly, not from the scaled cos/sin tables).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The half-split rotation used by Llama / Qwen2 / Mistral RoPE: ``[-x2, x1]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_keys(keys: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate post-RoPE keys ``[..., T, D]`` by ``delta`` positions (same shape and dtype back)."""
    if delta == 0:
        return keys
    angle = float(delta) * inv_freq.to(device=keys.device, dtype=torch.float32)  # [D/2]
    angle = torch.cat((angle, angle))  # [D]
    k = keys.float()
    out = k * angle.cos() + rotate_half(k) * angle.sin()
    return out.to(keys.dtype)


@dataclass
class KVSegment:
    """Keys/values ``[L, H, T, D]`` of ``token_ids``; keys are rotated for positions ``start..start+T-1``."""

    keys: torch.Tensor
    values: torch.Tensor
    start: int
    token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.keys.shape != self.values.shape or self.keys.dim() != 4:
            raise ValueError(f"keys {tuple(self.keys.shape)} / values {tuple(self.values.shape)} must be equal [L, H, T, D]")
        if self.token_ids and len(self.token_ids) != self.length:
            raise ValueError(f"{len(self.token_ids)} token ids for {self.length} cached tokens")

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    def moved_to(self, start: int, inv_freq: torch.Tensor) -> "KVSegment":
        """The same segment re-indexed so that its first token sits at position ``start``."""
        if start == self.start:
            return self
        return KVSegment(rotate_keys(self.keys, start - self.start, inv_freq), self.values, start, self.token_ids)

    def slice(self, begin: int, end: int) -> "KVSegment":
        """Tokens ``begin:end`` (segment-relative) as their own segment."""
        ids = self.token_ids[begin:end] if self.token_ids else ()
        return KVSegment(self.keys[:, :, begin:end], self.values[:, :, begin:end], self.start + begin, ids)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "KVSegment":
        return KVSegment(self.keys.to(device, dtype), self.values.to(device, dtype), self.start, self.token_ids)


def joined_ids(segments: list[KVSegment]) -> tuple[int, ...]:
    """Token ids of back-to-back ``segments`` (raises unless their positions are contiguous)."""
    if not segments:
        raise ValueError("no segments to join")
    pos = segments[0].start
    for seg in segments:
        if seg.start != pos:
            raise ValueError(f"segment placed at {seg.start}, expected {pos}: re-index it first")
        pos += seg.length
    return tuple(t for s in segments for t in s.token_ids) if all(s.token_ids for s in segments) else ()


def concat(segments: list[KVSegment]) -> KVSegment:
    """Join segments that are already placed back to back (positions must be contiguous)."""
    ids = joined_ids(segments)
    return KVSegment(
        torch.cat([s.keys for s in segments], dim=2),
        torch.cat([s.values for s in segments], dim=2),
        segments[0].start,
        ids,
    )


def place(segments: list[KVSegment], inv_freq: torch.Tensor, start: int = 0) -> list[KVSegment]:
    """Re-index ``segments`` so they sit back to back from position ``start``."""
    out, pos = [], start
    for seg in segments:
        out.append(seg.moved_to(pos, inv_freq))
        pos += seg.length
    return out


def to_cache(segments: KVSegment | list[KVSegment], config) -> "transformers.DynamicCache":  # noqa: F821
    """A transformers ``DynamicCache`` (batch 1) holding ``segments`` back to back from position 0.

    A list is joined one layer at a time while the cache copies it in (the cache's layers copy what
    they are given), so besides ``segments`` only the cache's copy and one layer in flight exist: no
    whole joined prompt is ever materialised next to them.
    """
    from transformers import DynamicCache

    segs = [segments] if isinstance(segments, KVSegment) else list(segments)
    joined_ids(segs)
    if segs[0].start != 0:
        raise ValueError(f"a cache must start at position 0, not {segs[0].start}")

    def layer(name: str, i: int) -> torch.Tensor:
        parts = [getattr(s, name)[i] for s in segs]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).unsqueeze(0)

    data = ((layer("keys", i), layer("values", i)) for i in range(segs[0].keys.shape[0]))  # lazy: one layer
    return DynamicCache(ddp_cache_data=data, config=config)


def from_cache(cache, begin: int = 0, end: int | None = None, token_ids: tuple[int, ...] = ()) -> KVSegment:
    """Positions ``begin:end`` of a batch-1 transformers cache as a segment (keys rotated for those positions)."""
    keys = torch.stack([layer.keys[0, :, begin:end] for layer in cache.layers])
    values = torch.stack([layer.values[0, :, begin:end] for layer in cache.layers])
    return KVSegment(keys, values, begin, tuple(token_ids))
