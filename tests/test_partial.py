"""``partial`` (EPIC first-K / CacheBlend deviation recompute): end points equal naive and dense, in
every candidate-KV mode (fp32, tiny models), and what it recomputes is what it says."""

from __future__ import annotations

import pytest
import torch

from kvjudge.cache.probe import fresh_keys
from kvjudge.judges.candidate import CANDIDATE_KV_MODES
from kvjudge.judges.judge import Judge
from kvjudge.judges.methods import make_method
from kvjudge.judges.prompt import JudgeInputError

from helpers import PROBLEM, TEXTS, agent_candidates

ALL = 10_000  # more tokens than any piece here


@pytest.mark.parametrize("output", ["label", "generate"])
@pytest.mark.parametrize("mode", CANDIDATE_KV_MODES)
def test_end_points_equal_naive_and_dense(tiny, mode, output):
    judge = Judge(tiny, candidate_kv=mode, output=output, max_new_tokens=6)
    cands = agent_candidates(tiny)
    dense = judge.judge(PROBLEM, cands, method="dense")
    naive = judge.judge(PROBLEM, cands, method="naive")
    for opts, want in (({"recompute_first": 0}, naive), ({"recompute_first": 0, "blend": 0.0}, naive),
                       ({"recompute_first": ALL}, dense), ({"recompute_first": 0, "blend": 1.0}, dense)):
        judge.method("partial", **opts)
        got = judge.judge(PROBLEM, cands, method="partial")
        if output == "label":
            assert got.scores == pytest.approx(want.scores, abs=1e-4), opts
        else:
            assert got.answer_text == want.answer_text, opts
    if output == "label" and mode != "judge_prefix":  # reuse really differs here, so the end points mean something
        assert max(abs(a - b) for a, b in zip(dense.scores, naive.scores)) > 1e-3


def test_recompute_first_moves_scores_between_and_counts_tokens(llama):
    judge = Judge(llama, candidate_kv="agent")
    cands = agent_candidates(llama)
    case = judge.case(PROBLEM, cands)
    placed = judge.engine.pieces(case)
    k = 4
    judge.method("partial", recompute_first=k)
    before = judge.runner.forward_tokens
    v = judge.judge(PROBLEM, cands, method="partial")
    want = sum(min(k, seg.length) for kind, _, seg in placed if kind != "prefix")
    assert v.decision["recomputed_tokens"] == want
    assert judge.runner.forward_tokens - before == want + len(case.prompt.suffix)
    assert v.prefilled_tokens == want + len(case.prompt.suffix)
    naive = judge.judge(PROBLEM, cands, method="naive")
    assert v.scores != pytest.approx(naive.scores, abs=1e-5)


def test_blend_picks_the_most_deviating_reused_tokens(llama):
    judge = Judge(llama, candidate_kv="isolated")
    case = judge.case(PROBLEM, TEXTS)
    method = make_method("partial", recompute_first=0, blend=0.2)
    masks, probe = method.redo(judge.engine, case)
    placed = judge.engine.pieces(case)
    ids = case.prompt.ids()[:probe]
    real = fresh_keys(llama.model, ids, 1)
    devs, chosen = [], []
    for (kind, _, seg), m in zip(placed, masks):
        if kind != "prefix":
            devs.append((real[:, seg.start:seg.start + seg.length] - seg.keys[1].float()).pow(2).sum(dim=(0, 2)))
            chosen.append(m)
        else:
            assert not m.any()
    devs, chosen = torch.cat(devs), torch.cat(chosen)
    assert int(chosen.sum()) == -(-len(devs) * 2 // 10)
    assert devs[chosen].min() >= devs[~chosen].max()  # the top share, by an independent recomputation


def test_fresh_keys_equal_the_keys_a_dense_prefill_caches(llama):
    judge = Judge(llama)
    ids = judge.case(PROBLEM, TEXTS).prompt.ids()
    _, kv = judge.runner.forward(ids, keep_cache=True)
    torch.testing.assert_close(fresh_keys(llama.model, ids, 1), kv.keys[1].float(), atol=1e-4, rtol=1e-4)


def test_bad_options_are_one_line_errors():
    for opts in ({"recompute_first": -1}, {"blend": 1.5}, {"recompute_first": 2.5}, {"depth": 3}):
        with pytest.raises(JudgeInputError) as err:
            make_method("partial", **opts)
        assert "\n" not in str(err.value)
