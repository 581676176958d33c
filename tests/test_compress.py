"""Token-level compression of stored segments, checked against independent computations."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from transformers import DynamicCache

from kvjudge.cache.compress.registry import COMPRESSION_METHODS, PRESSES, CompressError, compress_segment, make_press, select
from kvjudge.cache.compress.laprox import LaProxPress, laprox_scores
from kvjudge.cache.compat import cache_kwargs
from kvjudge.cache.encoder import KVRunner
from kvjudge.cache.segments import CompressedSegment, KVSegment, place, to_cache
from kvjudge.experiments.bench import compress as compress_bench
from kvjudge.experiments.bench.compress import bench_compress
from kvjudge.judges import catalog as judge_catalog
from kvjudge.judges.methods import METHODS
from kvjudge.models import LoadedModel, byte_tokenizer, tiny_model
from kvjudge.models.tiny import spec_id

PREFIX = "<judge prefix> Problem: what is 17 + 25? Candidate #1:\n"
CANDIDATE = "17 + 25: seven plus five is twelve, carry one; one plus two plus one is four. The answer is 42."
GLUE = "\n\nCandidate #2:\n"
SUFFIX = "\n\nWhich candidate is best? Best candidate: #"


def _model(name: str) -> LoadedModel:
    # private instances: compression switches the model's attention to the masking wrapper
    return LoadedModel(tiny_model(name).float(), byte_tokenizer(), spec_id(name, {}))


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def setup(request):
    lm = _model(request.param)
    runner = KVRunner(lm.model, lm.model_id)
    ids = lambda text: lm.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefix, cand, glue, suffix = ids(PREFIX), ids(CANDIDATE), ids(GLUE), ids(SUFFIX)
    ctx = runner.context(prefix)
    seg = runner.encode(prefix, cand)
    glue_seg = runner.encode(prefix, glue)
    return lm, runner, ctx, seg, glue_seg, suffix


def _judge_like(runner, ctx, cand, glue, suffix):
    """Suffix log-probs after prefix + candidate + glue, placed back to back (the judge's naive assembly)."""
    return runner.forward(suffix, past=place([ctx, cand, glue], runner.inv_freq))[0]


def test_registry_matches_torch_free_catalog():
    assert tuple(PRESSES) == COMPRESSION_METHODS


@pytest.mark.parametrize("method", list(PRESSES))
def test_ratio_one_is_the_segment_itself(setup, method):
    lm, runner, ctx, seg, glue, suffix = setup
    assert compress_segment(seg, lm.model, method, 1.0, context=ctx) is seg  # not a wrapper keeping everything
    # a ratio whose per-(layer, head) budget still keeps every token drops nothing either
    almost = 1.0 - 0.4 / seg.length
    assert round(almost * seg.length) == seg.length
    assert compress_segment(seg, lm.model, method, almost, context=ctx) is seg
    # and below that budget every press does drop entries (so the identity above is not vacuous)
    low = compress_segment(seg, lm.model, method, 0.5, context=ctx)
    assert (low is seg) if method == "none" else isinstance(low, CompressedSegment)


def test_none_is_the_segment_itself(setup):
    lm, _, ctx, seg, _, _ = setup
    assert compress_segment(seg, lm.model, "none", 0.1, context=ctx) is seg


@pytest.mark.parametrize("method", [m for m in PRESSES if m != "none"])
@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
def test_stored_bytes_follow_ratio(setup, method, ratio):
    lm, _, ctx, seg, _, _ = setup
    comp = compress_segment(seg, lm.model, method, ratio, context=ctx)
    L, H, T, _ = seg.keys.shape
    expected = round(ratio * T) / T  # the per-(layer, head) rounding
    assert comp.kept_tokens == L * H * round(ratio * T)
    assert abs(comp.nbytes / seg.nbytes - expected) < 0.03 * expected + 0.01
    assert comp.length == seg.length and comp.start == seg.start and comp.token_ids == seg.token_ids


@pytest.mark.parametrize("method", ["laprox", "knorm", "snapkv"])
def test_compressed_cache_is_consistent_and_prefills(setup, method):
    lm, runner, ctx, seg, glue, suffix = setup
    comp = compress_segment(seg, lm.model, method, 0.2, context=ctx)
    placed = place([ctx, comp, glue], runner.inv_freq)
    cache = to_cache(placed, lm.model.config)
    lengths = {layer.keys.shape[2] for layer in cache.layers}
    assert len(lengths) == 1  # one padded length for every layer
    keep = comp.keep_mask()
    for i, mask in enumerate(cache.keep_masks):
        # every (layer, head) sees the whole prefix and glue plus exactly its own kept candidate tokens
        assert mask.sum(1).tolist() == (ctx.length + glue.length + keep[i].sum(-1)).tolist()
    logprobs, _ = runner.forward(suffix, past=placed)
    assert torch.isfinite(logprobs).all()
    assert not torch.allclose(logprobs, _judge_like(runner, ctx, seg, glue, suffix), atol=1e-4)


def test_masked_attention_equals_dropping_tokens(setup):
    """Streaming keeps the same tokens in every layer and head: a cache that simply lacks the evicted
    tokens (kept keys at their own positions, suffix at the uncompressed positions) must agree."""
    lm, runner, ctx, seg, glue, suffix = setup
    comp = compress_segment(seg, lm.model, "streaming", 0.3, n_sink=2)
    kept = comp.keep_mask()[0, 0].nonzero().flatten()
    assert (comp.keep_mask() == comp.keep_mask()[:1, :1]).all()
    placed = place([ctx, seg, glue], runner.inv_freq)
    data = []
    for i in range(seg.keys.shape[0]):
        k = torch.cat((placed[0].keys[i], placed[1].keys[i][:, kept], placed[2].keys[i]), 1)
        v = torch.cat((placed[0].values[i], placed[1].values[i][:, kept], placed[2].values[i]), 1)
        data.append((k.unsqueeze(0), v.unsqueeze(0)))
    start = ctx.length + seg.length + glue.length  # positions are not compacted
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([suffix]), position_ids=torch.arange(start, start + len(suffix))[None],
                       **cache_kwargs(lm.model, DynamicCache(ddp_cache_data=data, config=lm.model.config)),
                       use_cache=True)
    expected = torch.log_softmax(out.logits[0, -1].float(), -1)
    got = _judge_like(runner, ctx, comp, glue, suffix)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_dense_calls_unchanged_after_masked_ones(setup):
    lm, runner, ctx, seg, glue, suffix = setup
    before = _judge_like(runner, ctx, seg, glue, suffix)
    _judge_like(runner, ctx, compress_segment(seg, lm.model, "knorm", 0.3), glue, suffix)
    assert torch.equal(_judge_like(runner, ctx, seg, glue, suffix), before)


def test_moved_compressed_segment_equals_compressing_the_moved_one(setup):
    lm, runner, ctx, seg, glue, suffix = setup
    comp = compress_segment(seg, lm.model, "streaming", 0.25)
    moved_first = compress_segment(seg.moved_to(ctx.length + 7, runner.inv_freq), lm.model, "streaming", 0.25)
    a = comp.moved_to(ctx.length + 7, runner.inv_freq)
    assert torch.allclose(a.keys, moved_first.keys, atol=1e-5) and torch.equal(a.values, moved_first.values)


def test_compressed_segment_pickles(setup):
    lm, runner, ctx, seg, glue, suffix = setup
    comp = compress_segment(seg, lm.model, "laprox", 0.25, context=ctx)
    back = pickle.loads(pickle.dumps(comp))
    assert back.nbytes == comp.nbytes and torch.equal(back.keep_mask(), comp.keep_mask())
    assert torch.equal(_judge_like(runner, ctx, back, glue, suffix), _judge_like(runner, ctx, comp, glue, suffix))


def test_laprox_score_matches_written_out_formula():
    """Two query heads sharing one KV head (GQA), head dim 1, d_model 2, a window of 2 queries, 3 columns.

    C_j = sum_h A_h[:, j] (W_O^h v_j)^T; score_j = ||C_j||_F / ||sum_j C_j||_F.
    """
    A = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]],    # head 0: [w=2, N=3]
                      [[0.2, 0.2, 0.6], [0.7, 0.1, 0.2]]])   # head 1
    v = torch.tensor([[[1.0], [-2.0], [0.5]]])                # [H_kv=1, N=3, D=1]
    w_o = torch.tensor([[1.0, 2.0], [0.0, -1.0]])             # [d_model=2, H_q * D = 2]: column h is W_O^h
    C = []
    for j in range(3):
        c = torch.zeros(2, 2)
        for h in range(2):
            u = w_o[:, h] * v[0, j, 0]  # W_O^h v_j  [d_model]
            for q in range(2):
                c[q] += A[h, q, j] * u
        C.append(c)
    O = sum(C)
    raw = torch.tensor([c.norm() for c in C])
    assert torch.allclose(laprox_scores(A, v, w_o, slice(0, 3), normalize=False), raw)
    assert torch.allclose(laprox_scores(A, v, w_o, slice(1, 3)), raw[1:] / O.norm())
    # the heads interact: the joint norm is not the sum of per-head norms
    per_head = torch.tensor([sum((A[h, :, j].norm() * (w_o[:, h] * v[0, j, 0]).norm()).item() for h in range(2))
                             for j in range(3)])
    assert not torch.allclose(raw, per_head)


def test_global_selection_gives_layers_different_counts():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 2.0, 0.5, 0.1]])  # layer 0 dominates
    keep = select(scores, 0.5, "global", heads=2)
    assert keep.sum().item() == 2 * 2 * 2  # L * H * round(0.5 * 4)
    assert keep[0].all() and not keep[1].any()
    per_layer = select(scores, 0.5, "layer", heads=2)
    assert per_layer[0].sum() == per_layer[1].sum() == 4


def test_laprox_budget_is_model_wide(setup):
    """Shrinking one layer's values shrinks its output contributions: LaProx moves that layer's budget
    elsewhere while the model-wide total stays ``L * round(ratio * T)``."""
    lm, _, ctx, seg, _, _ = setup
    values = seg.values.clone()
    values[1] *= 1e-3
    weak = KVSegment(seg.keys, values, seg.start, seg.token_ids)
    comp = LaProxPress(ratio=0.25, normalize=False).compress(weak, lm.model, ctx)
    counts = comp.counts[:, 0]
    L, _, T, _ = seg.keys.shape
    assert counts.sum().item() == L * round(0.25 * T)
    assert counts[1] < counts[0] and counts[1] < round(0.25 * T) < counts.max()


def test_bad_settings_are_one_line_errors(setup):
    lm, _, _, seg, _, _ = setup
    with pytest.raises(CompressError, match="unknown compression method"):
        make_press("zip", 0.5)
    with pytest.raises(CompressError, match="kept ratio"):
        make_press("knorm", 0.0)
    with pytest.raises(CompressError, match="bad options"):
        make_press("knorm", 0.5, window=3)
    with pytest.raises(CompressError, match="needs the model"):
        compress_segment(seg, None, "laprox", 0.5)
    with pytest.raises(CompressError, match="uncompressed"):
        compress_segment(compress_segment(seg, None, "knorm", 0.5), None, "knorm", 0.5)


def test_bench_compress_sweep(tmp_path):
    path = tmp_path / "cands.jsonl"
    path.write_text('{"task_id": "t/1", "problem": "What is 2+3?", "candidates": ["5", "The answer is 7", '
                    '"2+3=5 so five"], "sources": ["a1", "a2", "a3"]}\n')
    out = bench_compress(path, _model("tiny-llama"), methods=("knorm", "laprox"), ratios=(1.0, 0.25),
                         judge_methods=("naive",), candidate_kv="judge_prefix", seeds=(42, 123), out_dir=tmp_path)
    pts = {(p["method"], p["ratio"]): p for p in out["points"]}
    assert set(pts) == {(m, r) for m in ("knorm", "laprox") for r in (1.0, 0.25)}
    for m in ("knorm", "laprox"):
        assert pts[(m, 1.0)]["jcr_vs_uncompressed"] == 1.0
        assert pts[(m, 1.0)]["jcr"] == out["uncompressed"]["naive"]["jcr"]
        assert abs(pts[(m, 0.25)]["store_ratio"] - 0.25) < 0.1
        assert pts[(m, 1.0)]["score_shift"] < 1e-5 < pts[(m, 0.25)]["score_shift"]
    assert out["candidate_kv"] == "judge_prefix"
    assert (tmp_path / "compress.json").is_file() and (tmp_path / "compress_jcr.png").is_file()


def _record_judge_all(monkeypatch) -> list:
    """Spy on the bench's per-call judging: ``[(methods, {(seed, method): (winner, latency, scores, gate,
    decision)} or None where the call raised)]``."""
    calls = []
    real = compress_bench._judge_all

    def spy(judge, b, seeds, methods):
        try:
            out = real(judge, b, seeds, methods)
        except Exception:
            calls.append((list(methods), None))
            raise
        calls.append((list(methods), out))
        return out

    monkeypatch.setattr(compress_bench, "_judge_all", spy)
    return calls


def test_bench_compress_ratio_one_repeats_every_judge_method(tmp_path, monkeypatch):
    """At ratio 1.0 every judge method -- the stateful ones too (KVCOMM's pools and decisions, DG-JKR's
    arms, the random gate's draws) -- takes the same decisions with the same scores as on the
    uncompressed KV, for every press; at 0.5 the same sweep does move scores (the check can fail)."""
    path = tmp_path / "cands.jsonl"
    sets = [("t/1", "What is 2+3?", ["5", "The answer is 7", "2+3=5 so five"]),
            ("t/2", "What is 4*4?", ["16", "4*4 = 20", "sixteen, 16"])]
    path.write_text("".join(json.dumps({"task_id": t, "problem": p, "candidates": c, "sources": ["a1", "a2", "a3"]})
                            + "\n" for t, p, c in sets))
    presses = [m for m in PRESSES if m != "none"]
    jms = [m for m in METHODS if m not in getattr(judge_catalog, "CALIBRATED_METHODS", ())]
    assert {"kvcomm", "pal_kv", "dg_jkr", "random_gate"} <= set(jms)
    calls = _record_judge_all(monkeypatch)
    out = bench_compress(path, _model("tiny-llama"), methods=presses, ratios=(1.0, 0.5), judge_methods=jms,
                         candidate_kv="judge_prefix", seeds=(42, 123))
    # per set: the uncompressed reference, then for each press, ratio and judge method one call
    per_set = 1 + len(presses) * 2 * len(jms)
    assert len(calls) == len(sets) * per_set
    moved = 0.0
    for s in range(len(sets)):
        ref = calls[s * per_set][1]
        for i, (methods, got) in enumerate(calls[s * per_set + 1:(s + 1) * per_set]):
            ratio = (1.0, 0.5)[(i // len(jms)) % 2]
            (m,) = methods
            if got is None:  # a method that cannot read compressed KV (a point with an error, below)
                assert ratio < 1.0, (s, m)
                continue
            for seed in (42, 123):
                winner, _, scores, gate, decision = got[(seed, m)]
                diff = max(abs(x - y) for x, y in zip(scores, ref[(seed, m)][2]))
                if ratio == 1.0:
                    assert winner == ref[(seed, m)][0] and diff <= 1e-6, (s, m, seed, diff)
                    assert (gate, decision) == ref[(seed, m)][3:]
                elif m == "naive":
                    moved = max(moved, diff)
    assert moved > 1e-4
    for p in out["points"]:
        assert "error" not in p or p["ratio"] < 1.0, p
        if p["ratio"] == 1.0:
            assert p["jcr_vs_uncompressed"] == 1.0 and p["score_shift"] <= 1e-6, p
            unc = out["uncompressed"][p["judge_method"]]
            assert p["jcr"] == unc["jcr"] and p["store_ratio"] == 1.0
            assert (p["fallback_rate"], p["measured_rate"]) == (unc["fallback_rate"], unc["measured_rate"])
    unc = out["uncompressed"]
    assert unc["naive"]["fallback_rate"] is None and unc["dg_jkr"]["fallback_rate"] is not None
    assert unc["kvcomm"]["measured_rate"] > 0  # anchors were measured: the state the points start from matters
