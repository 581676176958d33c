"""Masked attention over a compressed cache: the suffix attends only to the kept (layer, head) entries.

Compressed segments keep different tokens per layer (and per KV head), so a rectangular transformers
cache needs padding plus a per-(layer, head) mask, and transformers builds one mask for all layers.
This module

* defines :class:`MaskedCache`, a ``DynamicCache`` whose layers are padded to a common length ``P``
  and carry a bool mask ``[H, P]`` each; its ``update`` hands the layer's mask (thread-locally) to
* the attention wrapper registered with transformers' ``AttentionInterface`` under
  ``kvjudge_masked_<base>``: when a mask is pending for ``module.layer_idx`` it runs SDPA with
  ``mask = [keep (past, per head) | causal (new tokens)]``; otherwise it calls the model's original
  implementation ``<base>`` with the very same arguments (so dense calls are unchanged).

:func:`enable_masked_attention` switches a config to the wrapper (idempotent). The past is always
wholly before the new tokens, so the causal part only concerns the new tokens themselves.
"""

from __future__ import annotations

import sys
import threading

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "kvjudge_masked_"
_pending = threading.local()


class MaskedCache(DynamicCache):
    """``DynamicCache`` of padded layers ``[1, H, P, D]`` with a valid mask ``[H, P]`` per layer."""

    def __init__(self, data: list[tuple[torch.Tensor, torch.Tensor]], keep_masks: list[torch.Tensor], config) -> None:
        super().__init__(ddp_cache_data=data, config=config)
        self.keep_masks = keep_masks
        self.past_length = data[0][0].shape[2]
        enable_masked_attention(config)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        _pending.value = (layer_idx, self.keep_masks[layer_idx], self.past_length)
        return out


def _take_pending(layer_idx: int) -> tuple[torch.Tensor, int] | None:
    pending = getattr(_pending, "value", None)
    _pending.value = None
    if pending is None or pending[0] != layer_idx:
        return None
    return pending[1], pending[2]


def _model_eager(module: torch.nn.Module):
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward")


def _make_wrapper(base: str):
    def masked_attention(module, query, key, value, attention_mask, *args, **kwargs):
        pending = _take_pending(getattr(module, "layer_idx", -1))
        if pending is None:
            fn = ALL_ATTENTION_FUNCTIONS.get_interface(base, None) if base != "eager" else _model_eager(module)
            return fn(module, query, key, value, attention_mask, *args, **kwargs)
        keep, past = pending  # keep [H_kv, P]
        q_len, kv_len = query.shape[2], key.shape[2]
        if kv_len != past + q_len:
            raise RuntimeError(f"masked cache: {kv_len} keys for {past} cached + {q_len} new")
        heads = query.shape[1]
        keep = keep.to(query.device).repeat_interleave(heads // keep.shape[0], dim=0)  # [H_q, P]
        mask = torch.cat((keep[:, None, :].expand(heads, q_len, past),
                          torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril()
                          .expand(heads, q_len, q_len)), dim=-1).unsqueeze(0)
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, mask, *args, is_causal=False, **kwargs)

    return masked_attention


def enable_masked_attention(config) -> str:
    """Switch ``config`` (shared with the model's attention modules) to the masking wrapper of its
    current implementation; returns the registered name. Idempotent."""
    base = config._attn_implementation or "eager"
    if base.startswith(PREFIX):
        return base
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_wrapper(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    config._attn_implementation = name
    return name
