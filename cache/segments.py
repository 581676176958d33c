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


def joined_ids(segments: list) -> tuple[int, ...]:
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


@dataclass
class CompressedSegment:
    """A token-level compressed segment: ``length`` tokens of which only some keep their KV.

    Kept entries are packed ``[N, D]`` in (layer, head, token) order; ``counts[l, h]`` says how many
    belong to layer ``l`` / KV head ``h`` and ``index[n]`` which token (segment-relative) entry ``n``
    is. Kept keys stay rotated for their own positions ``start + index``: a gap left by an evicted
    token is just a position nobody attends to. ``length``, ``start`` and ``token_ids`` describe the
    *uncompressed* run, so the segment is placed, re-indexed and followed exactly as the original
    (the judge's suffix gets the same position ids as without compression).
    """

    keys: torch.Tensor
    values: torch.Tensor
    index: torch.Tensor
    counts: torch.Tensor
    start: int
    length: int
    token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        n = int(self.counts.sum())
        if self.keys.shape != self.values.shape or self.keys.dim() != 2 or self.keys.shape[0] != n:
            raise ValueError(f"keys {tuple(self.keys.shape)} / values {tuple(self.values.shape)} must be equal [N={n}, D]")
        if self.index.shape != (n,) or self.counts.dim() != 2:
            raise ValueError(f"index {tuple(self.index.shape)} must be [N={n}] and counts [L, H]")
        if self.token_ids and len(self.token_ids) != self.length:
            raise ValueError(f"{len(self.token_ids)} token ids for {self.length} tokens")

    @classmethod
    def from_keep(cls, segment: KVSegment, keep: torch.Tensor) -> "CompressedSegment":
        """The entries of ``segment`` where the bool mask ``keep`` ``[L, H, T]`` is true."""
        if keep.shape != segment.keys.shape[:3]:
            raise ValueError(f"keep mask {tuple(keep.shape)} does not match [L, H, T] = {tuple(segment.keys.shape[:3])}")
        keep = keep.to(segment.keys.device, torch.bool)
        tok = torch.arange(segment.length, device=keep.device, dtype=torch.int32).expand_as(keep)
        return cls(segment.keys[keep].clone(), segment.values[keep].clone(), tok[keep].clone(),
                   keep.sum(-1).to(torch.int64).cpu(), segment.start, segment.length, segment.token_ids)

    @property
    def kept_tokens(self) -> int:
        """Kept (layer, head, token) entries."""
        return self.keys.shape[0]

    @property
    def kept_ratio(self) -> float:
        L, H = self.counts.shape
        return self.kept_tokens / max(1, L * H * self.length)

    @property
    def nbytes(self) -> int:
        """Bytes held: kept keys and values plus the token index (``counts`` is negligible)."""
        return (self.keys.numel() * self.keys.element_size() * 2
                + self.index.numel() * self.index.element_size() + self.counts.numel() * 8)

    def moved_to(self, start: int, inv_freq: torch.Tensor) -> "CompressedSegment":
        """Re-indexed so that its first (original) token sits at ``start``: every kept key moves by the same delta."""
        if start == self.start:
            return self
        return CompressedSegment(rotate_keys(self.keys, start - self.start, inv_freq), self.values, self.index,
                                 self.counts, start, self.length, self.token_ids)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "CompressedSegment":
        return CompressedSegment(self.keys.to(device, dtype), self.values.to(device, dtype), self.index.to(device),
                                 self.counts, self.start, self.length, self.token_ids)

    def slice(self, begin: int, end: int) -> "CompressedSegment":
        raise ValueError("a compressed segment cannot be sliced")

    def keep_mask(self) -> torch.Tensor:
        """Bool ``[L, H, T]``: which (layer, head, token) entries were kept."""
        L, H = self.counts.shape
        mask = torch.zeros(L * H, self.length, dtype=torch.bool)
        rows = torch.repeat_interleave(torch.arange(L * H), self.counts.flatten())
        mask[rows, self.index.long().cpu()] = True
        return mask.view(L, H, self.length)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``i`` padded to its largest head: keys, values ``[H, P, D]`` and the valid mask ``[H, P]``."""
        L, H = self.counts.shape
        flat = self.counts.flatten()
        offsets = torch.cat((torch.zeros(1, dtype=torch.int64), flat.cumsum(0)))
        counts = self.counts[i].tolist()
        P, D = max(counts), self.keys.shape[1]
        keys = self.keys.new_zeros(H, P, D)
        values = self.values.new_zeros(H, P, D)
        valid = torch.zeros(H, P, dtype=torch.bool, device=self.keys.device)
        for h, n in enumerate(counts):
            a = int(offsets[i * H + h])
            keys[h, :n], values[h, :n], valid[h, :n] = self.keys[a:a + n], self.values[a:a + n], True
        return keys, values, valid


AnySegment = KVSegment | CompressedSegment


def _compacted_layer(segs: list, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer ``i`` of mixed segments joined per head, valid entries first: ``[H, S, D]`` x2 and ``[H, S]``."""
    ks, vs, ms = [], [], []
    for s in segs:
        if isinstance(s, CompressedSegment):
            k, v, m = s.layer(i)
        else:
            k, v = s.keys[i], s.values[i]
            m = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
        ks.append(k), vs.append(v), ms.append(m)
    k, v, m = torch.cat(ks, 1), torch.cat(vs, 1), torch.cat(ms, 1)
    order = torch.sort((~m).to(torch.int8), dim=1, stable=True).indices  # valid entries first, in order
    take = order.unsqueeze(-1).expand_as(k)
    return k.gather(1, take), v.gather(1, take), m.gather(1, order)


def _sparse_cache(segs: list, config):
    """A masked cache for segments some of which are compressed (see :mod:`kvjudge.cache.compress.attention`).

    Every layer is padded to one common length ``P`` (the most entries any (layer, head) keeps) so the
    cache is rectangular for transformers; which of the ``P`` slots are real is a per-(layer, head)
    mask the registered attention function applies.
    """
    # function-body import: kvjudge.cache.compress imports this module (cycle), and transformers is
    # only needed here, when a compressed segment is assembled
    from kvjudge.cache.compress.attention import MaskedCache

    layers = [_compacted_layer(segs, i) for i in range(segs[0].counts.shape[0] if isinstance(segs[0], CompressedSegment)
                                                       else segs[0].keys.shape[0])]
    P = max(int(m.sum(1).max()) for _, _, m in layers)
    data, masks = [], []
    for k, v, m in layers:
        k, v, m = k[:, :P], v[:, :P], m[:, :P]
        if k.shape[1] < P:  # pad short layers with masked slots
            pad = P - k.shape[1]
            k = torch.cat((k, k.new_zeros(k.shape[0], pad, k.shape[2])), 1)
            v = torch.cat((v, v.new_zeros(v.shape[0], pad, v.shape[2])), 1)
            m = torch.cat((m, m.new_zeros(m.shape[0], pad)), 1)
        data.append((k.unsqueeze(0), v.unsqueeze(0)))
        masks.append(m)
    return MaskedCache(data, masks, config)


def to_cache(segments: AnySegment | list[AnySegment], config) -> "transformers.DynamicCache":  # noqa: F821
    """A transformers ``DynamicCache`` (batch 1) holding ``segments`` back to back from position 0.

    A list is joined one layer at a time while the cache copies it in (the cache's layers copy what
    they are given), so besides ``segments`` only the cache's copy and one layer in flight exist: no
    whole joined prompt is ever materialised next to them.

    When any segment is a :class:`CompressedSegment` the result is a masked cache whose attention
    sees only the kept entries (and the model's attention is switched, once, to the masking wrapper
    that delegates unchanged calls to its original implementation).
    """
    from transformers import DynamicCache

    segs = [segments] if isinstance(segments, (KVSegment, CompressedSegment)) else list(segments)
    joined_ids(segs)
    if segs[0].start != 0:
        raise ValueError(f"a cache must start at position 0, not {segs[0].start}")
    if any(isinstance(s, CompressedSegment) for s in segs):
        return _sparse_cache(segs, config)

    def layer(name: str, i: int) -> torch.Tensor:
        parts = [getattr(s, name)[i] for s in segs]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).unsqueeze(0)

    data = ((layer("keys", i), layer("values", i)) for i in range(segs[0].keys.shape[0]))  # lazy: one layer
    return DynamicCache(ddp_cache_data=data, config=config)


def from_cache(cache, begin: int = 0, end: int | None = None, token_ids: tuple[int, ...] = ()) -> KVSegment:
    """Positions ``begin:end`` of a batch-1 transformers cache as a segment (keys rotated for those positions)."""
    if getattr(cache, "keep_masks", None) is not None:
        raise ValueError("a masked (compressed) cache cannot be read back as a segment")
    keys = torch.stack([layer.keys[0, :, begin:end] for layer in cache.layers])
    values = torch.stack([layer.values[0, :, begin:end] for layer in cache.layers])
    return KVSegment(keys, values, begin, tuple(token_ids))
