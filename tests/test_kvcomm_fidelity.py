"""KVCOMM / PAL-KV / random gate / DG-JKR behave as the reference runs them (tiny models, fp32, CPU)."""

from __future__ import annotations

import itertools
from dataclasses import fields

import pytest
import torch

from kvjudge.cache.anchors import Anchor, AnchorPool, correction
from kvjudge.cache.segments import CompressedSegment, KVSegment, place
from kvjudge.experiments.judging import compress_candidates
from kvjudge.judges.base import JudgeCase
from kvjudge.judges.catalog import METHOD_OPTIONS
from kvjudge.judges.judge import Judge
from kvjudge.judges.methods import METHODS, make_method
from kvjudge.judges.methods.random_gate import exact_coverage_choice
from kvjudge.judges.prompt import JudgeInputError, build_prompt
from kvjudge.models import LoadedModel, byte_tokenizer, tiny_model
from kvjudge.models.tiny import spec_id

from helpers import PROBLEM, TEXTS as CANDIDATES
SOURCES = ["a", "b", "c"]


def test_catalog_equals_the_dataclass_fields():
    assert set(METHOD_OPTIONS) == set(METHODS)
    for name, cls in METHODS.items():
        assert METHOD_OPTIONS[name] == tuple(f.name for f in fields(cls) if f.init), name


def _shuffles(judge, method):
    """Judge every order of the three candidates; returns the verdicts."""
    out = []
    for order in itertools.permutations(range(3)):
        out.append(judge.judge(PROBLEM, [CANDIDATES[i] for i in order], method=method,
                               sources=[SOURCES[i] for i in order]))
    return out


@pytest.mark.parametrize("method", ["kvcomm", "pal_kv"])
def test_one_anchor_per_agent_and_content_across_shuffles(llama, method, monkeypatch):
    judge = Judge(llama)
    impl = judge.method(method)
    tests = []
    real_test = AnchorPool.needs_anchor
    monkeypatch.setattr(AnchorPool, "needs_anchor",
                        lambda pool, v, mask=None: tests.append(v.shape[2]) or real_test(pool, v, mask))
    verdicts = _shuffles(judge, method)
    assert len(tests) == 3  # one reuse decision per (agent, content), made the first time it is seen
    # all three contents are new to empty pools: measured once, then reused in every other order
    assert [v.decision["measured"] for v in verdicts] == [True] + [False] * 5
    assert [v.reused for v in verdicts] == [False] + [True] * 5
    assert len(impl.decisions) == 3
    assert {agent: len(p.anchors) for agent, p in impl.pools.items()} == {"a": 1, "b": 1, "c": 1}
    dense = judge.judge(PROBLEM, CANDIDATES, method="dense", sources=SOURCES)
    assert verdicts[0].scores == pytest.approx(dense.scores, abs=1e-6)  # the measuring call answers from dense


def test_decision_is_per_agent_and_pal_kv_corrects_from_every_agent(llama):
    judge = Judge(llama)
    kv, pal = judge.method("kvcomm"), judge.method("pal_kv")
    _shuffles(judge, "kvcomm")
    _shuffles(judge, "pal_kv")
    assert pal.decisions == kv.decisions  # same decisions (each agent's own pool), same reuse rate
    case = judge.case(PROBLEM, CANDIDATES, SOURCES)
    _, items = kv.items(judge.engine, case)
    assert [len(kv.anchors_for(it)) for it in items] == [1, 1, 1]
    assert [len(pal.anchors_for(it)) for it in items] == [3, 3, 3]
    # the by-position variant draws only on anchors measured at the candidate's slot; all three were
    # measured in the first order (a, b, c), so slot k finds exactly the anchor measured at slot k
    by_slot = make_method("pal_kv", pool_by="slot")
    by_slot.pools, by_slot.decisions = pal.pools, pal.decisions
    assert [[a.slot for a in by_slot.anchors_for(it)] for it in items] == [[0], [1], [2]]
    with pytest.raises(JudgeInputError, match="pool_by"):
        make_method("kvcomm", pool_by="shared")


def _isolated_pieces(engine, case):
    """Pieces with every candidate encoded alone from position 0 (2601.08343's setting), then placed."""
    runner, prompt = engine.runner, case.prompt
    kinds, segs = [], []
    for kind, slot, ids in prompt.pieces()[:-1]:
        seg = runner.context(ids) if kind in ("prefix", "candidate") else runner.encode(prompt.prefix, ids)
        kinds.append((kind, slot))
        segs.append(seg)
    return [(k, s, seg) for (k, s), seg in zip(kinds, place(segs, runner.inv_freq))]


def _case(lm, candidates, exact_first):
    case = JudgeCase(build_prompt(lm.tokenizer, PROBLEM, candidates), tuple(SOURCES[: len(candidates)]))
    case.exact_first = exact_first
    return case


@pytest.mark.parametrize("n", [1, 3])
def test_kvcomm_with_an_exact_anchor_reproduces_dense_when_slot_one_deviates(tiny, monkeypatch, n):
    judge = Judge(tiny)
    engine = judge.engine
    monkeypatch.setattr(engine, "pieces", lambda case: _isolated_pieces(engine, case))
    cands = CANDIDATES[:n]
    dense = engine.dense(_case(tiny, cands, False))[0].scores
    naive = make_method("naive")(engine, _case(tiny, cands, False)).scores
    assert (naive - dense).abs().max() > 1e-4  # the context mismatch is real, even for slot 1
    kv = make_method("kvcomm")
    first = kv(engine, _case(tiny, cands, False))
    assert first.decision["measured"] and not first.reused
    second = kv(engine, _case(tiny, cands, False))
    assert not second.decision["measured"] and second.reused
    assert second.scores.tolist() == pytest.approx(dense.tolist(), abs=1e-4)
    if n == 1:  # told slot 1 is exact, KVCOMM leaves it as it is: naive, not dense
        left = make_method("kvcomm")(engine, _case(tiny, cands, True))
        assert left.scores.tolist() == pytest.approx(naive.tolist(), abs=1e-6)


@pytest.mark.parametrize("n", [1, 7, 40, 100, 160])
def test_exact_coverage_choice_takes_exactly_round_coverage_n(n):
    for cov in (0.0, 0.3125, 0.825, 1.0):
        for seed in (42, 123, 456):
            pick = exact_coverage_choice(n, cov, seed)
            assert len(pick) == n and sum(pick) == round(cov * n)
            assert pick == exact_coverage_choice(n, cov, seed)  # seeded
    if n >= 40:
        assert exact_coverage_choice(n, 0.5, 42) != exact_coverage_choice(n, 0.5, 123)
    with pytest.raises(JudgeInputError, match="coverage"):
        exact_coverage_choice(n, 1.5, 0)


@pytest.mark.parametrize("arm", ["naive", "kvcomm"])
def test_random_gate_honours_the_arm_and_the_protocol_choice(llama, arm):
    judge = Judge(llama)
    reference = make_method(arm)  # an independent copy of the arm, fed the same records
    gate = judge.method("random_gate", arm=arm, coverage=0.6, seed=42)
    records = [list(p) for p in itertools.permutations(CANDIDATES)][:5]
    choice = exact_coverage_choice(len(records), 0.6, 42)
    accepted = 0
    for cands, take in zip(records, choice):
        gate.accept = take
        v = judge.judge(PROBLEM, cands, method="random_gate", sources=SOURCES)
        assert v.decision["accepted"] == take and v.decision["arm"] == arm
        assert v.gate == ("accepted" if take else "fallback")
        if take:
            want = reference(judge.engine, judge.case(PROBLEM, cands, SOURCES))
            assert v.decision["measured"] == bool((want.decision or {}).get("measured"))
        else:
            want = judge.engine.dense(judge.case(PROBLEM, cands, SOURCES))[0]
            assert not v.decision["measured"]
        assert v.scores == pytest.approx(want.scores.tolist(), abs=1e-6)
        accepted += take
    assert accepted == round(0.6 * len(records))
    with pytest.raises(JudgeInputError, match="arm"):
        make_method("random_gate", arm="dense")


def test_dg_jkr_reports_its_kvcomm_arm_measuring(llama):
    judge = Judge(llama)
    first = judge.judge(PROBLEM, CANDIDATES, method="dg_jkr", sources=SOURCES)
    again = judge.judge(PROBLEM, CANDIDATES, method="dg_jkr", sources=SOURCES)
    assert first.decision["measured"] and not first.decision["kvcomm_reused"]
    assert not again.decision["measured"] and again.decision["kvcomm_reused"]
    for v in (first, again):
        assert {"agreed", "naive", "kvcomm"} <= set(v.decision) and v.gate in ("accepted", "fallback")


def test_isolated_mode_needs_the_anchor_and_the_anchor_restores_dense(llama):
    """The engine's own ``isolated`` candidate-KV mode (slot 1 not exact): naive differs from dense,
    KVCOMM with the anchor it measured for that very candidate reproduces dense."""
    judge = Judge(llama, candidate_kv="isolated")
    dense = judge.judge(PROBLEM, CANDIDATES[:1], method="dense")
    naive = judge.judge(PROBLEM, CANDIDATES[:1], method="naive")
    assert max(abs(a - b) for a, b in zip(naive.scores, dense.scores)) > 1e-4
    first = judge.judge(PROBLEM, CANDIDATES[:1], method="kvcomm")
    second = judge.judge(PROBLEM, CANDIDATES[:1], method="kvcomm")
    assert first.decision["measured"] and not second.decision["measured"] and second.reused
    assert second.scores == pytest.approx(dense.scores, abs=1e-4)
    # generate output: the measuring call answers with dense's text, the corrected cache decodes it too
    gen = dict(output="generate", max_new_tokens=6)
    dense_text = judge.judge(PROBLEM, CANDIDATES[:2], method="dense", **gen).answer_text
    texts = [judge.judge(PROBLEM, CANDIDATES[:2], method="kvcomm", **gen) for _ in range(2)]
    assert [v.decision["measured"] for v in texts] == [True, False]
    assert [v.answer_text for v in texts] == [dense_text, dense_text]


@pytest.mark.parametrize("method", ["kvcomm", "pal_kv", "dg_jkr", "random_gate"])
def test_generate_output_with_one_candidate_decodes_as_dense(llama, method):
    judge = Judge(llama, output="generate", max_new_tokens=6)
    judge.method("random_gate", arm="kvcomm", accept=True)
    dense = judge.judge(PROBLEM, CANDIDATES[:1], method="dense")
    for _ in range(2):  # also once the method has state
        v = judge.judge(PROBLEM, CANDIDATES[:1], method=method)
        assert v.answer_text == dense.answer_text and v.winner == dense.winner
        assert "measured" in v.decision


def _dense_on_kept(engine, case) -> list:
    """The placed pieces with every KV taken from the real judge prompt's dense prefill: prefix and glue
    whole, each compressed candidate as the very (layer, head, token) entries it kept, cut from the
    real KV (so only the entries differ from the naive pieces, not which ones are there)."""
    _, real = engine.dense(case, keep_cache=True)
    out = []
    for _, _, seg in engine.pieces(case):
        cut = real.slice(seg.start, seg.start + seg.length)
        out.append(CompressedSegment.from_keep(cut, seg.keep_mask()) if isinstance(seg, CompressedSegment) else cut)
    return out


@pytest.mark.parametrize("press", ["knorm", "streaming", "laprox"])  # per-head, per-layer and global kept sets
@pytest.mark.parametrize("anchors_from", ["compressed", "uncompressed"])
def test_kvcomm_corrects_a_compressed_candidate_on_its_kept_entries(press, anchors_from):
    """Store compression (``judge_prefix`` candidate KV, ratio 0.5): KVCOMM corrects the compressed
    candidates -- its scores move away from naive's on the same compressed KV -- and with the exact
    anchor of each candidate (measured on it compressed, or uncompressed before the store compressed
    it) it reproduces dense on the kept entries (:func:`_dense_on_kept`)."""
    lm = LoadedModel(tiny_model("tiny-llama").float(), byte_tokenizer(), spec_id("tiny-llama", {}))  # private:
    judge = Judge(lm, candidate_kv="judge_prefix")  # compression switches its attention to the masking wrapper
    engine, kv = judge.engine, make_method("kvcomm")
    judge.prefetch(PROBLEM, CANDIDATES)
    if anchors_from == "uncompressed":
        assert kv(engine, judge.case(PROBLEM, CANDIDATES, SOURCES)).decision["measured"]
    compress_candidates(judge, PROBLEM, CANDIDATES, {"method": press, "ratio": 0.5})
    case = judge.case(PROBLEM, CANDIDATES, SOURCES)
    assert all(isinstance(seg, CompressedSegment) for kind, _, seg in engine.pieces(case) if kind == "candidate")
    if anchors_from == "compressed":
        first = kv(engine, case)
        assert first.decision["measured"] and first.decision["new_anchors"] == 3
        for (kind, slot, seg) in engine.pieces(case):  # each anchor holds exactly its candidate's kept entries
            if kind == "candidate":
                assert torch.equal(kv.pool(SOURCES[slot]).anchors[0].mask, seg.keep_mask())
        case = judge.case(PROBLEM, CANDIDATES, SOURCES)
    naive = make_method("naive")(engine, case).scores
    got = kv(engine, case)
    assert got.reused and not got.decision["measured"]
    assert (got.scores - naive).abs().max() > 1e-3  # a correction was applied
    want = engine.score_pieces(case, _dense_on_kept(engine, case)).scores
    assert (want - naive).abs().max() > 1e-3  # ... and there was something to correct
    assert got.scores.tolist() == pytest.approx(want.tolist(), abs=1e-4)


def test_dg_jkr_kvcomm_arm_is_not_naive_on_compressed_candidates():
    """Under store compression DG-JKR's KVCOMM arm corrects (reused, scores off naive's), so the gate
    compares two different answers, as it does uncompressed."""
    lm = LoadedModel(tiny_model("tiny-llama").float(), byte_tokenizer(), spec_id("tiny-llama", {}))
    judge = Judge(lm, candidate_kv="judge_prefix")
    judge.prefetch(PROBLEM, CANDIDATES)
    compress_candidates(judge, PROBLEM, CANDIDATES, {"method": "knorm", "ratio": 0.25})
    dg = judge.method("dg_jkr")
    judge.judge(PROBLEM, CANDIDATES, method="dg_jkr", sources=SOURCES)  # measures the anchors
    again = judge.judge(PROBLEM, CANDIDATES, method="dg_jkr", sources=SOURCES)
    assert again.decision["kvcomm_reused"] and not again.decision["measured"]
    case = judge.case(PROBLEM, CANDIDATES, SOURCES)
    arm, naive = dg._second(judge.engine, case), make_method("naive")(judge.engine, case)
    assert (arm.scores - naive.scores).abs().max() > 1e-3


def _random_anchor(key, L, H, T, D, gen, glue=5) -> Anchor:
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return Anchor(key, 0, r(L, H, T, D), r(L, H, T, D), r(L, H, T, D), r(L, H, T, D), r(L, H, glue, D), r(L, H, glue, D))


def test_masked_correction_reduces_to_the_original_rule():
    """All-kept masks (on the segment and on the anchors) give the unmasked correction; a mask keeps
    each entry's blend to the anchors that measured it (closed form with two anchors)."""
    gen = torch.Generator().manual_seed(0)
    L, H, n, D = 3, 2, 6, 4
    anchors = [_random_anchor(i, L, H, n + i, D, gen) for i in range(3)]
    bk, bv = torch.randn(L, H, n, D, generator=gen), torch.randn(L, H, n, D, generator=gen)
    plain = correction(anchors, bk, bv, glue_len=4, tau=0.7)
    full = torch.ones(L, H, n, dtype=torch.bool)
    for a in anchors:
        a.mask = torch.ones(L, H, a.length, dtype=torch.bool)
    masked = correction(anchors, bk, bv, glue_len=4, tau=0.7, mask=full)
    for name in ("dk", "dv", "glue_dk", "glue_dv"):
        assert torch.allclose(getattr(masked, name), getattr(plain, name), atol=1e-6), name
    # anchor 1 measured only token 2 of (layer 1, head 0): every other kept entry of layer >= 1 is
    # anchor 0's delta alone (entries the segment dropped get none); that one entry blends both by the
    # token distance over the entries both hold
    two = [_random_anchor(i, L, H, n, D, gen) for i in range(2)]
    two[1].mask = torch.zeros(L, H, n, dtype=torch.bool)
    two[1].mask[1, 0, 2] = True
    keep = torch.rand(L, H, n, generator=gen) > 0.3
    keep[1, 0, 2] = True
    got = correction(two, bk, bv, tau=1.0, mask=keep)
    d0 = ((bk - two[0].base_k).abs().sum(-1) * keep).sum((0, 1)) / (keep.sum((0, 1)) * D)  # [n]
    d1 = (bk - two[1].base_k)[1, 0, 2].abs().mean()
    w = torch.softmax(torch.stack([-d0[2], -d1]), 0)
    expected = two[0].dk * keep.unsqueeze(-1)
    expected[0] = 0
    expected[1, 0, 2] = w[0] * two[0].dk[1, 0, 2] + w[1] * two[1].dk[1, 0, 2]
    assert torch.allclose(got.dk, expected, atol=1e-6)
