"""Observation-window attention for scoring a stored segment (SnapKV, LaProx).

At put time the judge's suffix is unknown, so the window is the segment's own last ``w`` tokens.
They are run once more through the model against ``context + segment[:T-w]`` (the segment's own
cached KV, at its own positions); a pre-hook on every attention module grabs the post-RoPE queries
``[H_q, w, D]``. The window's attention over ``context + segment`` (causal inside the window, softmax
over everything, the model's own scaling) is then computed from those queries and the *stored* keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kvjudge.cache.compat import cache_kwargs
from kvjudge.cache.probe import attention_modules
from kvjudge.cache.segments import KVSegment, rotate_half


@dataclass
class Observation:
    """Window attention of one segment, per layer: ``probs[l]`` ``[H_q, w, C + T]`` over context + segment
    columns (context first), and the attention modules (for ``o_proj`` / ``scaling``)."""

    probs: list[torch.Tensor]
    modules: list[torch.nn.Module]
    context_length: int
    window: int
    context: KVSegment | None = None


@torch.inference_mode()
def window_queries(model: torch.nn.Module, segment: KVSegment, context: KVSegment | None, window: int) -> list[torch.Tensor]:
    """Post-RoPE queries ``[H_q, w, D]`` per layer of the segment's last ``w`` tokens (fp32)."""
    if not segment.token_ids:
        raise ValueError("scoring with an observation window needs the segment's token ids")
    w = min(window, segment.length)
    past = [s for s in (context, segment.slice(0, segment.length - w)) if s is not None and s.length]
    mods = attention_modules(model)
    captured: dict[int, torch.Tensor] = {}

    def grab(module, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        q = module.q_proj(h).view(*h.shape[:-1], -1, module.head_dim).transpose(1, 2)  # [1, H_q, w, D]
        q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
        captured[module.layer_idx] = q[0].float()

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in mods]
    try:
        dev = next(model.parameters()).device
        cache = None
        if past:
            data = [(torch.cat([s.keys[i] for s in past], 1).unsqueeze(0).to(dev),
                     torch.cat([s.values[i] for s in past], 1).unsqueeze(0).to(dev)) for i in range(segment.keys.shape[0])]
            cache = DynamicCache(ddp_cache_data=data, config=model.config)
        ids = torch.tensor([list(segment.token_ids[segment.length - w:])], device=dev)
        first = segment.start + segment.length - w
        pos = torch.arange(first, first + w, device=dev).unsqueeze(0)
        model(input_ids=ids, position_ids=pos, **cache_kwargs(model, cache), use_cache=cache is not None, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return [captured[m.layer_idx] for m in mods]


def window_attention(queries: list[torch.Tensor], segment: KVSegment, context: KVSegment | None,
                     scalings: list[float]) -> list[torch.Tensor]:
    """Softmax attention ``[H_q, w, C + T]`` of the window queries over context + segment keys (fp32)."""
    out = []
    for i, q in enumerate(queries):
        keys = segment.keys[i] if context is None else torch.cat((context.keys[i], segment.keys[i]), 1)
        keys = keys.to(q.device).float()
        heads, w = q.shape[0], q.shape[1]
        keys = keys.repeat_interleave(heads // keys.shape[0], dim=0)  # GQA: [H_q, C + T, D]
        logits = q @ keys.transpose(1, 2) * scalings[i]  # [H_q, w, C + T]
        n = keys.shape[1]
        # window token j (at column n - w + j) sees columns <= n - w + j
        col = torch.arange(n, device=q.device)
        allowed = col[None, :] <= (n - w + torch.arange(w, device=q.device))[:, None]
        out.append(torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1))
    return out


def observe(model: torch.nn.Module, segment: KVSegment, context: KVSegment | None, window: int) -> Observation:
    """Window attention of ``segment`` (after ``context``, the KV it was encoded after, or ``None``)."""
    if context is not None and context.start + context.length != segment.start:
        raise ValueError(f"context ends at {context.start + context.length}, segment starts at {segment.start}")
    mods = attention_modules(model)
    queries = window_queries(model, segment, context, window)
    probs = window_attention(queries, segment, context, [float(m.scaling) for m in mods])
    return Observation(probs, mods, 0 if context is None else context.length, min(window, segment.length), context)
