"""The one module that knows which transformers release renamed what (tested: 5.23.0 and 5.24.0).

transformers 5.24 renamed the KV cache everywhere from ``past_key_values`` to ``cache``: the forward
keyword of every model and attention module, the field of every model output, the keyword attention
hooks see. The old names still work until 5.40 but print ``past_key_values/cache_params are
deprecated`` (a logger line and a ``FutureWarning``) on the user's terminal. Our calls therefore
pass the name the installed release expects (:func:`cache_kwargs`), read outputs and hook keywords
under either name (:func:`output_cache`, :func:`hook_cache`) and never filter warnings.

It lives in ``cache/`` (ground floor) so that ``cache/`` itself can use it (``models/`` and
``cache/`` may not import each other). Imports no transformers at module level.

Every place in the tree that depends on transformers internals (keep this list current; the
constraints set ``.ci/constraints.txt`` pins the release the suite last passed with, and CI also
runs the internals tests against the newest release the ranges allow):

* forward calls with a cache (keyword via :func:`cache_kwargs`, outputs via :func:`output_cache`):
  ``cache/encoder.py`` (``KVRunner.forward``, ``check_reindexable``), ``judges/engine.py``
  (``_decode``), ``agents/generate.py`` (``_complete``; ``generate(...)`` output cache),
  ``cache/compress/observe.py`` (``window_queries``), ``experiments/diagnostics/attention.py``
  (``answer_attention``), ``experiments/diagnostics/hybrid.py`` (``hybrid_logprobs``),
  ``cache/encoder.py`` (``KVRunner.forward_partial``);
* attention-module hooks that read the module's keyword arguments (``hidden_states``,
  ``position_embeddings`` = post-scaling ``(cos, sin)``, the cache via :func:`hook_cache`) and its
  attributes ``q_proj`` / ``k_proj`` / ``o_proj`` / ``q_norm`` / ``k_norm`` / ``head_dim`` /
  ``scaling`` / ``layer_idx``: ``experiments/diagnostics/attention.py`` (``answer_rows``),
  ``cache/probe.py`` (``fresh_keys``, the layer-1 key probe of ``partial``'s blend, ``selective``'s
  risk features and ``diagnose hybrid``), ``cache/compress/observe.py`` (``grab``);
* a 4-D additive ``attention_mask`` passed to the model is used as given (``masking_utils``'s early exit):
  ``cache/encoder.py`` (``KVRunner.forward_partial``, the ``partial`` method);
* the masked attention function registered with ``AttentionInterface`` /
  ``AttentionMaskInterface`` (``config._attn_implementation``, ``ALL_ATTENTION_FUNCTIONS``,
  ``sdpa_attention_forward``) and ``MaskedCache(DynamicCache).update``: ``cache/compress/attention.py``;
* ``DynamicCache(ddp_cache_data=..., config=...)``, ``cache.layers[i].keys`` / ``.values``,
  ``cache.update``, ``get_seq_length``: ``cache/segments.py`` (``to_cache``, ``from_cache``),
  ``cache/encoder.py`` (``forward_partial``), ``cache/compress/observe.py``, ``agents/generate.py``
  (``_row_segment``), ``experiments/diagnostics/hybrid.py``;
* rotary embedding lookup (the first module with an ``inv_freq`` tensor) and the config fields
  ``rope_parameters`` / ``sliding_window`` / ``get_text_config``: ``cache/encoder.py``
  (``rotary_inv_freq``, ``check_reindexable``), ``models/loading.py``, ``models/tiny.py``;
* ``logits_to_keep=1`` on every forward above, ``use_cache``, ``position_ids``;
* generation keywords (``logits_processor``, ``stopping_criteria``, ``min_new_tokens``,
  ``return_dict_in_generate``, ``temperature/top_p/top_k=None``): ``agents/generate.py``;
* loading: ``from_pretrained(..., dtype=, local_files_only=)``, ``gguf_file=``,
  ``transformers.utils.logging``: ``models/loading.py``, ``models/smollm2.py``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

NEW_NAME = "cache"  # transformers >= 5.24
OLD_NAME = "past_key_values"  # transformers < 5.24 (deprecated, removed in 5.40)
FIRST_NEW = (5, 24)
TESTED = ("5.23.0", "5.24.0")


def _release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``5.24.0.dev0``."""
    parts = version.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def installed_default() -> str:
    """The cache keyword of the installed transformers release, from its version alone."""
    import transformers

    return NEW_NAME if _release(transformers.__version__) >= FIRST_NEW else OLD_NAME


@lru_cache(maxsize=None)
def _kwarg_of(cls: type) -> str:
    # Library internals: the named parameters of the model's forward (its deprecation decorator keeps
    # ``__wrapped__``, which ``inspect.signature`` follows) say which name this model class takes.
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        params = {}
    for name in (NEW_NAME, OLD_NAME):
        if name in params:
            return name
    return installed_default()


def cache_kwarg(model: Any) -> str:
    """The keyword ``model``'s forward takes the KV cache under: ``"cache"`` or ``"past_key_values"``."""
    return _kwarg_of(type(model))


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``model(**...)`` under the name the installed release expects."""
    return {cache_kwarg(model): cache}


def output_cache(out: Any) -> Any:
    """The cache a forward or ``generate`` returned (``out.cache`` or ``out.past_key_values``; ``None``
    when it returned none). Reads the dataclass field, never the deprecated alias property."""
    names = {f.name for f in dataclasses.fields(out)} if dataclasses.is_dataclass(out) else set()
    for name in (NEW_NAME, OLD_NAME):
        if name in names:
            return getattr(out, name)
    if isinstance(out, Mapping):
        return out.get(NEW_NAME, out.get(OLD_NAME))
    return None


def hook_cache(kwargs: Mapping[str, Any]) -> Any:
    """The cache an attention module was called with, from a ``with_kwargs`` hook's keyword arguments
    (``cache`` from 5.24, ``past_key_values`` before); ``None`` when the forward had none."""
    for name in (NEW_NAME, OLD_NAME):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None
