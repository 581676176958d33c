"""The cache keyword / output / hook helpers of ``cache/compat.py`` on the installed transformers release."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers

from kvjudge.cache.compat import (
    NEW_NAME, OLD_NAME, TESTED, cache_kwarg, cache_kwargs, hook_cache, installed_default, output_cache,
)
from kvjudge.models.tiny import tiny_model


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def model(request):
    return tiny_model(request.param).eval()


def _release() -> tuple[int, int]:
    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()))


def test_keyword_follows_the_release(model):
    expected = NEW_NAME if _release() >= (5, 24) else OLD_NAME
    assert cache_kwarg(model) == expected == installed_default()
    assert list(cache_kwargs(model, "c")) == [expected]


def test_tested_releases_are_listed():
    assert {v.rsplit(".", 1)[0] for v in TESTED} >= {"5.23", "5.24"}


@torch.inference_mode()
def test_cached_forward_equals_dense_forward(model):
    """The cache passed under our keyword is really used: prompt + one token through the cache gives the
    dense forward's last logits (a name the model ignored would give the one-token-alone logits)."""
    ids = torch.tensor([[5, 9, 12, 40, 41]])
    out = model(input_ids=ids[:, :4], use_cache=True)
    cache = output_cache(out)
    assert cache is not None and cache.get_seq_length() == 4
    step = model(input_ids=ids[:, 4:], position_ids=torch.tensor([[4]]), **cache_kwargs(model, cache), use_cache=True)
    dense = model(input_ids=ids, use_cache=False).logits[0, -1]
    alone = model(input_ids=ids[:, 4:], position_ids=torch.tensor([[4]]), use_cache=False).logits[0, -1]
    assert torch.allclose(step.logits[0, -1], dense, atol=1e-4)
    assert not torch.allclose(alone, dense, atol=1e-2)  # the check above can fail
    assert output_cache(step) is cache and cache.get_seq_length() == 5


@torch.inference_mode()
def test_hook_reads_the_cache_the_forward_was_given(model):
    out = model(input_ids=torch.tensor([[3, 4]]), use_cache=True)
    cache = output_cache(out)
    seen = {}
    attn = next(m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx"))

    def grab(module, args, kwargs) -> None:
        seen["c"] = hook_cache(kwargs)

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=torch.tensor([[7]]), position_ids=torch.tensor([[2]]), **cache_kwargs(model, cache),
              use_cache=True)
    finally:
        handle.remove()
    assert seen["c"] is cache


def test_hook_and_output_accept_either_name():
    assert hook_cache({"past_key_values": "old"}) == "old"
    assert hook_cache({"cache": "new", "past_key_values": None}) == "new"
    assert hook_cache({"hidden_states": 1}) is None
    assert output_cache({"past_key_values": "old"}) == "old" and output_cache({"cache": "new"}) == "new"
    assert output_cache(object()) is None


def test_our_calls_print_no_deprecation():
    """A cached forward, its output's cache and ``generate`` through our helpers print nothing on stderr
    (transformers 5.24 prints `past_key_values ... deprecated` for the old names; a fresh process, because
    the library warns once per process)."""
    code = (
        "import torch\n"
        "from kvjudge.models.tiny import tiny_model\n"
        "from kvjudge.cache.compat import cache_kwargs, output_cache\n"
        "m = tiny_model('tiny-llama')\n"
        "c = output_cache(m(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True))\n"
        "out = m(input_ids=torch.tensor([[4]]), position_ids=torch.tensor([[3]]), **cache_kwargs(m, c), use_cache=True)\n"
        "assert output_cache(out) is c\n"
        "g = m.generate(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 2, dtype=torch.long),\n"
        "               max_new_tokens=2, do_sample=False, return_dict_in_generate=True, pad_token_id=0)\n"
        "assert output_cache(g) is not None\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert proc.stderr.strip() == "", proc.stderr[-2000:]
