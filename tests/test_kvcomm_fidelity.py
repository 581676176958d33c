"""KVCOMM / PAL-KV / random gate / DG-JKR behave as the reference runs them (tiny models, fp32, CPU)."""

from __future__ import annotations

import itertools
from dataclasses import fields

import pytest

from kvjudge.cache.anchors import AnchorPool
from kvjudge.cache.segments import place
from kvjudge.judges.base import JudgeCase
from kvjudge.judges.catalog import METHOD_OPTIONS
from kvjudge.judges.judge import Judge
from kvjudge.judges.methods import METHODS, make_method
from kvjudge.judges.methods.random_gate import exact_coverage_choice
from kvjudge.judges.prompt import JudgeInputError, build_prompt

PROBLEM = "Write a function add(a, b) that returns the sum of a and b."
CANDIDATES = [
    "def add(a, b):\n    return a + b",
    "def add(a, b):\n    return a - b  # wrong",
    "add = lambda a, b: sum([a, b])",
]
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
    monkeypatch.setattr(AnchorPool, "needs_anchor", lambda pool, v: tests.append(v.shape[2]) or real_test(pool, v))
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
