"""One matrix over every registered judge method x candidate-KV mode x output mode x tiny model.

The invariants every method keeps, whatever it does inside (fp32, CPU):
- a well-formed verdict (the method, the modes, a winner in 1..N or a recorded unparseable answer,
  one label score per candidate in ``label`` output and none in ``generate`` output);
- one candidate in ``judge_prefix`` mode: the method answers exactly as dense (scores within 1e-4,
  the same decoded text);
- once the candidates' pieces are encoded, a shuffle only re-indexes: nothing new is encoded.
"""

from __future__ import annotations

import pytest

from kvjudge.judges.candidate import CANDIDATE_KV_MODES, OUTPUT_MODES
from kvjudge.judges.judge import Judge
from kvjudge.judges.methods import known_methods
from kvjudge.judges.parse import parse_choice
from kvjudge.judges.prompt import JudgeInputError

from helpers import PROBLEM, agent_candidates

FEW = 8  # decode budget in generate output (tiny random models ramble)


def _call(judge: Judge, cands, method: str):
    """The verdict, or ``None`` when the method refuses ``generate`` output in one line (a gate that scores
    label log-probs has nothing to score there); any other refusal fails the test."""
    try:
        return judge.judge(PROBLEM, cands, method=method)
    except JudgeInputError as exc:
        if judge.output != "generate" or "\n" in str(exc) or "label output" not in str(exc):
            raise
        return None


def _judge(lm, mode: str, output: str) -> Judge:
    return Judge(lm, candidate_kv=mode, output=output, max_new_tokens=FEW)


def _well_formed(v, method: str, mode: str, output: str, n: int) -> None:
    assert v.method == method and v.candidate_kv == mode and v.output == output
    assert v.latency_ms >= 0 and v.prefilled_tokens >= 0 and v.encoded_tokens >= 0
    if output == "label":
        assert len(v.scores) == n and v.answer_text is None
        assert v.winner == max(range(n), key=lambda i: v.scores[i]) + 1
    else:
        # a gate decodes up to three times (two arms and the dense fallback)
        assert v.scores == [] and v.answer_text is not None and 0 <= v.decoded_tokens <= 3 * FEW
        assert (v.winner, v.parse_rule) == parse_choice(v.answer_text, n)
    assert v.gate in (None, "accepted", "fallback")


@pytest.mark.parametrize("output", OUTPUT_MODES)
@pytest.mark.parametrize("mode", CANDIDATE_KV_MODES)
@pytest.mark.parametrize("method", known_methods())
def test_every_method_gives_a_well_formed_verdict_and_shuffles_only_reindex(tiny, method, mode, output):
    judge = _judge(tiny, mode, output)
    cands = agent_candidates(tiny)
    judge.judge(PROBLEM, cands, method="naive")  # every piece encoded once (a gate may not reuse on its first call)
    first = _call(judge, cands, method)
    if first is None:
        return
    _well_formed(first, method, mode, output, len(cands))
    shuffled = judge.judge(PROBLEM, [cands[2], cands[0], cands[1]], method=method)
    _well_formed(shuffled, method, mode, output, len(cands))
    assert shuffled.encoded_tokens == 0, f"{method} encoded {shuffled.encoded_tokens} tokens on a shuffle"


@pytest.mark.parametrize("output", OUTPUT_MODES)
@pytest.mark.parametrize("method", known_methods())
def test_one_candidate_in_judge_prefix_mode_equals_dense(tiny, method, output):
    judge = _judge(tiny, "judge_prefix", output)
    cands = agent_candidates(tiny)[:1]
    dense = judge.judge(PROBLEM, cands, method="dense")
    for _ in range(2):  # the second call runs on whatever state the first left (anchors, memo)
        v = _call(judge, cands, method)
        if v is None:
            return
        if output == "label":
            assert v.winner == 1 and v.scores == pytest.approx(dense.scores, abs=1e-4)
        else:
            assert v.answer_text == dense.answer_text
