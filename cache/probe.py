"""Cheap probes of what a model computes in the judge's real context, without a full prefill.

:func:`fresh_keys` runs the whole prompt only up to one layer's attention and reads the keys that
layer would cache there (CacheBlend's layer-1 check: layer 0 is context-free per token, layer 1 is
the first whose keys depend on the context). Its cost is about one layer of a dense prefill.

Library internals (listed in :mod:`kvjudge.cache.compat`): attention modules found by their
``q_proj`` / ``layer_idx`` attributes; a forward pre-hook reads their keyword arguments
``hidden_states`` and ``position_embeddings`` (the post-scaling ``(cos, sin)``) and applies their
``k_proj`` / ``k_norm`` / ``head_dim``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvjudge.cache.segments import rotate_half


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's attention modules in layer order (those with ``q_proj`` / ``o_proj`` / ``layer_idx``)."""
    mods = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "o_proj") and hasattr(m, "layer_idx")]
    if not mods:
        raise ValueError(f"{type(model).__name__}: no attention modules with q_proj/o_proj found")
    return sorted(mods, key=lambda m: m.layer_idx)


class _Stop(Exception):
    """Ends the probe's forward once the probed layer's input is known."""


@torch.inference_mode()
def fresh_keys(model: torch.nn.Module, ids: Sequence[int], layer: int = 1) -> torch.Tensor:
    """Post-RoPE keys ``[H_kv, T, D]`` (fp32) that attention layer ``layer`` computes for ``ids`` encoded
    from position 0 in one pass; the forward stops before that layer's attention runs."""
    mods = attention_modules(model)
    if layer >= len(mods):
        raise ValueError(f"{type(model).__name__} has {len(mods)} attention layers, no layer {layer}")
    got: dict[str, torch.Tensor] = {}

    def probe(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        d = getattr(module, "head_dim", cos.shape[-1])
        k = module.k_proj(hidden).view(1, hidden.shape[1], -1, d)
        if getattr(module, "k_norm", None) is not None:  # Qwen3-style per-head key norm
            k = module.k_norm(k)
        k = k.transpose(1, 2).float()  # [1, H_kv, T, D]
        c, s = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
        got["keys"] = (k * c + rotate_half(k) * s)[0]
        raise _Stop

    dev = next(model.parameters()).device
    handle = mods[layer].register_forward_pre_hook(probe, with_kwargs=True)
    try:
        model(input_ids=torch.tensor([list(ids)], device=dev), use_cache=False, logits_to_keep=1)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got["keys"]
