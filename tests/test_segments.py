"""RoPE re-indexing and cache assembly against independent forward passes."""

from __future__ import annotations

import pytest
import torch

from kvjudge.cache.compat import output_cache
from kvjudge.cache.encoder import KVRunner
from kvjudge.cache.segments import concat, from_cache, place, rotate_keys, to_cache

PREFIX = "<judge prefix> Problem: add two numbers.\n"
SEGMENT = "def add(a, b):\n    return a + b\n"


def _ids(lm, text):
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def _encode_at(lm, ids, offset):
    """KV of ``ids`` run from position ``offset`` (an independent dense pass)."""
    pos = torch.arange(offset, offset + len(ids)).unsqueeze(0)
    out = lm.model(input_ids=torch.tensor([ids]), position_ids=pos, use_cache=True)
    return from_cache(output_cache(out))


def test_reindex_matches_encoding_at_new_position(tiny):
    """A segment encoded at p and re-indexed to q has the keys of the same segment encoded at q."""
    prefix, seg = _ids(tiny, PREFIX), _ids(tiny, SEGMENT)
    runner = KVRunner(tiny.model, tiny.model_id)
    at_p = runner.encode(prefix, seg)  # positions len(prefix) ..
    shift = 200
    reference = _encode_at(tiny, prefix + seg, shift)  # same prefix, everything shifted by 200
    ref_seg = reference.slice(len(prefix), len(prefix) + len(seg))
    moved = at_p.moved_to(len(prefix) + shift, runner.inv_freq)
    assert moved.start == ref_seg.start + shift  # from_cache numbers positions from 0
    assert torch.allclose(moved.keys, ref_seg.keys, atol=1e-4), (moved.keys - ref_seg.keys).abs().max()
    assert torch.allclose(moved.values, ref_seg.values, atol=1e-4)
    # and the rotation really moved something: the un-moved keys are far off
    assert (at_p.keys - ref_seg.keys).abs().max() > 1e-2


def test_rotation_composes_and_inverts(llama):
    inv = KVRunner(llama.model, llama.model_id).inv_freq
    k = torch.randn(2, 2, 5, inv.numel() * 2)
    there = rotate_keys(rotate_keys(k, 17, inv), 25, inv)
    assert torch.allclose(there, rotate_keys(k, 42, inv), atol=1e-5)
    assert torch.allclose(rotate_keys(there, -42, inv), k, atol=1e-5)


def test_assembled_cache_then_suffix_equals_one_pass(tiny):
    """Prefix + segment placed back to back, then a suffix with explicit positions == one full pass."""
    runner = KVRunner(tiny.model, tiny.model_id)
    prefix, seg, suffix = _ids(tiny, PREFIX), _ids(tiny, SEGMENT), _ids(tiny, "\nAnswer: #")
    pieces = place([runner.context(prefix), runner.encode(prefix, seg)], runner.inv_freq)
    logp, _ = runner.forward(suffix, past=concat(pieces))
    full, kv = runner.forward(prefix + seg + suffix, keep_cache=True)
    assert torch.allclose(logp, full, atol=1e-4)
    # the same segments passed as a list are joined layer by layer inside the cache
    listed, kv_listed = runner.forward(suffix, past=pieces, keep_cache=True)
    assert torch.equal(listed, logp)
    assert kv_listed.token_ids == tuple(prefix + seg + suffix) == kv.token_ids
    torch.testing.assert_close(kv_listed.keys, kv.keys, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="re-index"):
        runner.forward(suffix, past=[pieces[0], pieces[0]])


def test_to_cache_round_trip(llama):
    runner = KVRunner(llama.model, llama.model_id)
    seg = runner.context(_ids(llama, PREFIX))
    back = from_cache(to_cache(seg, llama.model.config), token_ids=seg.token_ids)
    assert torch.equal(back.keys, seg.keys) and torch.equal(back.values, seg.values)


def test_models_whose_keys_cannot_be_reindexed_are_refused(llama):
    import pytest

    from kvjudge.cache.encoder import check_reindexable, rotary_inv_freq

    inv = rotary_inv_freq(llama.model)
    check_reindexable(llama.model, inv)  # the real rotation passes
    with pytest.raises(ValueError, match="do not follow half-split RoPE"):
        check_reindexable(llama.model, inv * 1.5)  # a rotation that is not the model's
    with pytest.raises(ValueError, match="partial RoPE"):
        check_reindexable(llama.model, inv[: inv.numel() // 2])


def test_memo_keeps_to_its_byte_budget(llama):
    runner = KVRunner(llama.model, llama.model_id)
    ctx = _ids(llama, "context ")
    one = runner.encode(ctx, _ids(llama, "segment number one"))
    runner.max_bytes = runner.memo_bytes + 2 * one.nbytes  # the context, `one` and two more segments
    for text in ("segment number two", "segment number six", "segment number ten"):
        runner.encode(ctx, _ids(llama, text))
        assert runner.memo_bytes <= runner.max_bytes
        assert runner.memo_bytes == sum(s.nbytes for s in runner._memo.values())
    calls = runner.forward_calls
    again = runner.encode(ctx, _ids(llama, "segment number ten"))  # most recent: still memoised
    assert runner.forward_calls == calls
    again = runner.encode(ctx, _ids(llama, "segment number one"))  # oldest: evicted, encoded anew
    assert runner.forward_calls > calls
    torch.testing.assert_close(again.keys, one.keys)
