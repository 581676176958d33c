"""Running a causal LM over token ids against KV segments, and memoising segment encodings.

No Ray here: this is the tensor engine the judge and the agents host.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from kvjudge.cache.keys import segment_key  # torch-free home of the key; re-exported here
from kvjudge.cache.compat import cache_kwargs, output_cache
from kvjudge.cache.segments import KVSegment, from_cache, joined_ids, rotate_keys, to_cache


def rotary_inv_freq(model: torch.nn.Module) -> torch.Tensor:
    """The model's own RoPE inverse frequencies ``[D/2]`` (fp32)."""
    for _, module in model.named_modules():
        freq = getattr(module, "inv_freq", None)
        if isinstance(freq, torch.Tensor):
            return freq.detach().float()
    raise ValueError(f"{type(model).__name__} has no rotary embedding (inv_freq): not a RoPE model")


@torch.inference_mode()
def check_reindexable(model: torch.nn.Module, inv_freq: torch.Tensor) -> None:
    """Refuse (one line) models whose cached keys cannot be moved by one half-split RoPE rotation:
    partial or interleaved rotary, per-layer frequencies, sliding-window layers. One token is
    encoded at positions 0 and 7 and the layer-0 keys compared after rotating the first by 7."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    name = type(model).__name__
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise ValueError(f"{name} uses sliding-window attention: its cache drops tokens, KV reuse is unsupported")
    dev = next(model.parameters()).device
    keys = []
    for pos in (0, 7):
        out = model(input_ids=torch.tensor([[1]], device=dev), position_ids=torch.tensor([[pos]], device=dev),
                    use_cache=True)
        keys.append(output_cache(out).layers[0].keys[0].float())
    if keys[0].shape[-1] != 2 * inv_freq.numel():
        raise ValueError(f"{name} rotates {2 * inv_freq.numel()} of {keys[0].shape[-1]} key dims (partial RoPE): "
                         "KV re-indexing is unsupported")
    moved = rotate_keys(keys[0], 7, inv_freq)
    if not torch.allclose(moved, keys[1], atol=1e-2 * (1 + keys[1].abs().max().item())):
        raise ValueError(f"{name}: cached keys do not follow half-split RoPE (interleaved rotary?): "
                         "KV re-indexing is unsupported")


class KVRunner:
    """Forward passes with explicit positions over a model, counting passes and memoising segments.

    ``forward_calls`` counts every model forward and ``forward_tokens`` the tokens run through them;
    ``encode_tokens`` is the part of ``forward_tokens`` spent encoding contexts and segments.
    """

    def __init__(
        self, model: torch.nn.Module, model_id: str, max_segments: int = 4096, max_bytes: int = 2 << 30
    ) -> None:
        self.model = model
        self.model_id = model_id
        self.inv_freq = rotary_inv_freq(model)
        check_reindexable(model, self.inv_freq)
        self.forward_calls = 0
        self.forward_tokens = 0
        self.encode_tokens = 0  # the part of forward_tokens spent encoding contexts / segments
        # the memo keeps the most recently used segments within both a count and a byte budget
        # (a 512-token segment of a 3B model is ~60 MB in bf16)
        self.max_segments = max_segments
        self.max_bytes = max_bytes
        self.memo_bytes = 0
        self._memo: OrderedDict[str, KVSegment] = OrderedDict()
        # optional second-level lookup (e.g. the shared KV store): key -> segment or None
        self.fetch: Callable[[str], KVSegment | None] | None = None
        self.fetched = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def forward(
        self, ids: Sequence[int], past: KVSegment | list[KVSegment] | None = None, keep_cache: bool = False
    ) -> tuple[torch.Tensor, KVSegment | None]:
        """Run ``ids`` after ``past`` (one segment, or segments placed back to back, from 0); return
        next-token log-probs ``[V]`` (fp32) of the last position and, with ``keep_cache``, the KV of
        past + ids as one segment from position 0."""
        segs = [past] if isinstance(past, KVSegment) else past
        start = sum(s.length for s in segs) if segs else 0
        if segs and segs[0].start != 0:
            raise ValueError("past KV must start at position 0")
        dev = self.device
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=dev)
        positions = torch.arange(start, start + len(ids), device=dev).unsqueeze(0)
        cache = to_cache(segs, self.model.config) if segs else None
        out = self.model(
            input_ids=input_ids,
            position_ids=positions,
            **cache_kwargs(self.model, cache),
            use_cache=keep_cache or cache is not None,
            logits_to_keep=1,
        )
        self.forward_calls += 1
        self.forward_tokens += len(ids)
        logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        kv = None
        if keep_cache:
            if not segs:
                known = tuple(ids)
            else:
                past_ids = joined_ids(segs)
                known = past_ids + tuple(ids) if past_ids else ()
            kv = from_cache(output_cache(out), 0, None, known)
        return logprobs, kv

    @torch.inference_mode()
    def forward_partial(
        self, segs: list[KVSegment], redo: list[torch.Tensor], ids: Sequence[int], keep_cache: bool = False
    ) -> tuple[torch.Tensor, KVSegment | None]:
        """Selective recompute (EPIC / CacheBlend): ``segs`` are placed back to back from position 0;
        ``redo[i]`` (bool ``[len(segs[i])]``) marks the tokens of segment ``i`` that are recomputed in the
        real context, the others are reused as cached; then ``ids`` (the suffix) follow. One forward runs
        the recomputed tokens and the suffix against the reused KV with a 4-D mask: every token attends
        to the reused and recomputed tokens at positions up to its own. Nothing redone == :meth:`forward`
        (naive); everything redone after an exact first segment == a dense prefill. Returns log-probs
        ``[V]`` of the last position and, with ``keep_cache``, the whole KV from position 0 in
        position order.

        Library internal (listed in :mod:`kvjudge.cache.compat`): transformers uses a 4-D
        ``attention_mask`` (here additive, ``[1, 1, Q, K]``) as given, bypassing its own mask creation.
        """
        if not any(bool(m.any()) for m in redo):
            return self.forward(ids, past=segs, keep_cache=keep_cache)
        if segs[0].start != 0:
            raise ValueError("past KV must start at position 0")
        dev, dtype = self.device, segs[0].keys.dtype
        keep_k, keep_v, kept_pos, new_pos, new_ids = [], [], [], [], []
        for seg, m in zip(segs, redo):
            m = m.to(torch.bool).cpu()
            if m.numel() != seg.length or (m.any() and len(seg.token_ids) != seg.length):
                raise ValueError(f"redo mask of {m.numel()} for a segment of {seg.length} tokens (with ids)")
            pos = torch.arange(seg.start, seg.start + seg.length)
            keep_k.append(seg.keys[:, :, ~m.to(seg.keys.device)])
            keep_v.append(seg.values[:, :, ~m.to(seg.keys.device)])
            kept_pos += pos[~m].tolist()
            new_pos += pos[m].tolist()
            new_ids += [seg.token_ids[i] for i in torch.nonzero(m).flatten().tolist()]
        end = segs[-1].start + segs[-1].length
        new_pos += list(range(end, end + len(ids)))
        new_ids += list(ids)
        keys, values = torch.cat(keep_k, dim=2), torch.cat(keep_v, dim=2)  # [L, H, T_kept, D]
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=((keys[i].unsqueeze(0), values[i].unsqueeze(0))
                                             for i in range(keys.shape[0])), config=self.model.config)
        kv_pos = torch.tensor(kept_pos + new_pos, device=dev)
        q_pos = torch.tensor(new_pos, device=dev)
        mask = torch.zeros(len(new_pos), len(kv_pos), dtype=dtype, device=dev)
        mask.masked_fill_(kv_pos[None, :] > q_pos[:, None], torch.finfo(dtype).min)
        out = self.model(
            input_ids=torch.tensor([new_ids], dtype=torch.long, device=dev),
            position_ids=q_pos.unsqueeze(0),
            attention_mask=mask[None, None],
            **cache_kwargs(self.model, cache),
            use_cache=True,
            logits_to_keep=1,
        )
        self.forward_calls += 1
        self.forward_tokens += len(new_ids)
        logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        kv = None
        if keep_cache:  # back into position order: a plain segment from position 0
            full = from_cache(output_cache(out))
            order = torch.argsort(kv_pos).to(full.keys.device)
            every = joined_ids(segs) + tuple(ids)
            kv = KVSegment(full.keys[:, :, order], full.values[:, :, order], 0, every if len(every) == len(order) else ())
        return logprobs, kv

    def remember(self, key: str, seg: KVSegment) -> KVSegment:
        """Keep ``seg`` under ``key`` (replacing what was there): later lookups of the key return it."""
        old = self._memo.pop(key, None)
        if old is not None:
            self.memo_bytes -= old.nbytes
        self._memo[key] = seg
        self.memo_bytes += seg.nbytes
        # never evict the segment just stored: callers use it right away
        while len(self._memo) > 1 and (len(self._memo) > self.max_segments or self.memo_bytes > self.max_bytes):
            _, dropped = self._memo.popitem(last=False)
            self.memo_bytes -= dropped.nbytes
        return seg

    def lookup(self, key: str) -> KVSegment | None:
        seg = self._memo.get(key)
        if seg is not None:
            self._memo.move_to_end(key)
        return seg

    def context(self, ids: Sequence[int]) -> KVSegment:
        """KV of ``ids`` encoded from position 0 (memoised)."""
        key = segment_key(self.model_id, (), ids)
        seg = self.lookup(key)
        if seg is None:
            _, seg = self.forward(ids, keep_cache=True)
            self.encode_tokens += len(ids)
            seg = self.remember(key, seg)
        return seg

    def encode(self, context_ids: Sequence[int], segment_ids: Sequence[int], keep_context: bool = True) -> KVSegment:
        """KV of ``segment_ids`` encoded right after ``context_ids`` (memoised per content hash; an empty
        context encodes the segment alone from position 0). ``keep_context=False`` runs context and
        segment in one pass and memoises only the segment: for contexts used once (an agent's prompt),
        whose KV would only crowd the memo."""
        key = segment_key(self.model_id, context_ids, segment_ids)
        seg = self.lookup(key)
        if seg is None and self.fetch is not None:
            seg = self.fetch(key)
            if seg is not None and seg.length == len(segment_ids):
                self.fetched += 1
                return self.remember(key, self._adopt(seg, len(context_ids)))
            seg = None
        if seg is None and not context_ids:  # alone from position 0 (same key as :meth:`context`)
            _, seg = self.forward(segment_ids, keep_cache=True)
            self.encode_tokens += len(segment_ids)
            seg = self.remember(key, seg)
        if seg is None and not keep_context and segment_key(self.model_id, (), context_ids) not in self._memo:
            _, full = self.forward(list(context_ids) + list(segment_ids), keep_cache=True)
            self.encode_tokens += len(context_ids) + len(segment_ids)
            part = full.slice(len(context_ids), full.length)
            seg = self.remember(key, KVSegment(part.keys.clone(), part.values.clone(), part.start, part.token_ids))
        if seg is None:
            ctx = self.context(context_ids)
            _, full = self.forward(segment_ids, past=ctx, keep_cache=True)
            self.encode_tokens += len(segment_ids)
            part = full.slice(ctx.length, full.length)  # a view of prefix + segment: copy it out
            seg = self.remember(key, KVSegment(part.keys.clone(), part.values.clone(), part.start, part.token_ids))
        return seg

    def _adopt(self, segment: KVSegment, start: int) -> KVSegment:
        segment = segment.to(self.device, next(self.model.parameters()).dtype)
        return segment.moved_to(start, self.inv_freq)
