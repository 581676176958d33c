"""Candidate-KV modes (judge_prefix / agent / isolated) and output modes (label / generate), tiny models, fp32 CPU.

The invariants every method keeps in every mode are one matrix in ``test_judge_matrix.py``; this file
holds what is particular to a mode."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvjudge.agents.generate import Generator
from kvjudge.cache.compat import cache_kwargs
from kvjudge.cache.encoder import KVRunner
from kvjudge.cache.segments import place, to_cache
from kvjudge.judges.candidate import Candidate
from kvjudge.judges.judge import Judge
from kvjudge.judges.prompt import JudgeInputError
from kvjudge.models.chat import agent_prompt_ids

from helpers import AGENT_PROMPT, PROBLEM, TEXTS, agent_candidates

FEW = 12  # decode budget in generate tests (tiny random models ramble; keep runs short)


def _fresh_kv(lm, context, ids):
    """KV ``[L, H, len(ids), D]`` of ``ids`` after ``context`` from one independent full prefill."""
    _, full = KVRunner(lm.model, "independent").forward(list(context) + list(ids), keep_cache=True)
    return full.slice(len(context), full.length)


# ------------------------------------------------------------------ candidate-KV modes, label output

@pytest.mark.parametrize("mode", ["agent", "isolated"])
def test_agent_and_isolated_one_candidate_naive_differs_from_dense(tiny, mode):
    """The candidate's KV was computed in another context: even alone, naive reuse is not dense."""
    judge = Judge(tiny, candidate_kv=mode)
    cands = agent_candidates(tiny)[:1]
    case = judge.case(PROBLEM, cands)
    assert case.exact_first is False and case.candidate_kv == mode
    dense = judge.judge(PROBLEM, cands, method="dense")
    naive = judge.judge(PROBLEM, cands, method="naive")
    assert naive.reused and not dense.reused
    assert abs(naive.scores[0] - dense.scores[0]) > 1e-4
    # the same candidate in judge_prefix mode: naive == dense (and for isolated, the same dense)
    exact = Judge(tiny)
    exact_dense = exact.judge(PROBLEM, cands, method="dense")
    assert exact.judge(PROBLEM, cands, method="naive").scores == pytest.approx(exact_dense.scores, abs=1e-4)
    if mode == "isolated":
        assert exact_dense.scores == pytest.approx(dense.scores, abs=1e-6)


@pytest.mark.parametrize("mode", ["agent", "isolated"])
def test_kvcomm_with_an_exact_anchor_reproduces_dense_for_one_foreign_candidate(llama, mode):
    """Slot 1's KV is foreign here (``exact_first`` False), so KVCOMM corrects it; an anchor measured
    on this very prompt brings it back to dense, where naive stays off."""
    judge = Judge(llama, candidate_kv=mode)
    judge.method("kvcomm", min_anchors=1)
    cands = agent_candidates(llama)[:1]
    assert not judge.judge(PROBLEM, cands, method="kvcomm").reused  # measured with dense
    again = judge.judge(PROBLEM, cands, method="kvcomm")
    dense = judge.judge(PROBLEM, cands, method="dense")
    naive = judge.judge(PROBLEM, cands, method="naive")
    assert again.reused and again.scores == pytest.approx(dense.scores, abs=1e-4)
    assert abs(naive.scores[0] - dense.scores[0]) > 1e-4


def test_agent_mode_slots_hold_the_agents_ids_verbatim(llama):
    judge = Judge(llama, candidate_kv="agent")
    cands = agent_candidates(llama)
    case = judge.case(PROBLEM, cands)
    assert case.prompt.candidates == tuple(c.token_ids for c in cands)
    assert case.prompt.ids() == [t for _, _, p in case.prompt.pieces() for t in p]
    assert all(case.context(i) == cands[i].prompt_ids for i in range(3))
    assert case.sources == ("agent-0", "agent-1", "agent-2")
    # a shuffle encodes nothing new: only re-indexing
    judge.judge(PROBLEM, cands, method="naive")
    for perm in list(itertools.permutations(range(3)))[1:4]:
        assert judge.judge(PROBLEM, [cands[i] for i in perm], method="naive").encoded_tokens == 0


def test_agent_mode_kv_equals_a_fresh_prefill_of_prompt_and_answer(tiny):
    judge = Judge(tiny, candidate_kv="agent")
    cand = agent_candidates(tiny)[1]
    req = judge.candidate_kv_request(PROBLEM, cand)
    assert req["mode"] == "agent" and req["context_ids"] == list(cand.prompt_ids)
    assert req["ids"] == list(cand.token_ids)
    judge.prefetch(PROBLEM, [cand])
    seg = judge.runner.lookup(req["key"])
    want = _fresh_kv(tiny, cand.prompt_ids, cand.token_ids)
    assert seg is not None and seg.start == len(cand.prompt_ids)
    torch.testing.assert_close(seg.keys, want.keys, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(seg.values, want.values, atol=1e-3, rtol=1e-3)


def test_agent_mode_kv_equals_the_kv_captured_while_generating(llama):
    """What the agent captured while writing its answer == what the judge rebuilds (and finds it by key)."""
    gen = Generator(llama)
    out = gen.generate(AGENT_PROMPT, max_new_tokens=16)
    prompt_ids = agent_prompt_ids(llama.tokenizer, AGENT_PROMPT)
    assert gen.prompt_ids(AGENT_PROMPT) == prompt_ids
    assert out.agent_kv is not None and len(out.token_ids) > 0
    cand = Candidate(out.text or "x", tuple(out.token_ids), tuple(prompt_ids), "writer")
    rebuilt = Judge(llama, candidate_kv="agent")
    req = rebuilt.candidate_kv_request(PROBLEM, cand)
    rebuilt.prefetch(PROBLEM, [cand])
    seg = rebuilt.runner.lookup(req["key"])
    n = out.agent_kv.length  # compare on the tokens both have
    assert seg.start == out.agent_kv.start == len(prompt_ids) and n >= len(out.token_ids) - 1
    torch.testing.assert_close(seg.keys[:, :, :n], out.agent_kv.keys, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(seg.values[:, :, :n], out.agent_kv.values, atol=1e-3, rtol=1e-3)
    if n == len(out.token_ids):  # the captured KV is complete: the judge takes it with no extra prefill
        fetched = Judge(llama, candidate_kv="agent")
        fetched.runner.fetch = lambda key: out.agent_kv if key == req["key"] else None
        fetched.prefetch(PROBLEM, [cand])
        assert fetched.runner.fetched == 1
        assert fetched.runner.encode_tokens == len(fetched.case(PROBLEM, [cand]).prompt.prefix)


def test_isolated_mode_kv_is_the_answer_encoded_alone(llama):
    judge = Judge(llama, candidate_kv="isolated")
    req = judge.candidate_kv_request(PROBLEM, TEXTS[2])
    assert req["mode"] == "isolated" and req["context_ids"] == []
    judge.prefetch(PROBLEM, [TEXTS[2]])
    seg = judge.runner.lookup(req["key"])
    _, want = KVRunner(llama.model, "independent").forward(req["ids"], keep_cache=True)
    assert seg.start == 0
    torch.testing.assert_close(seg.keys, want.keys, atol=1e-4, rtol=1e-4)
    # the prompt (so dense) is the judge_prefix one; only the KV source differs
    assert judge.case(PROBLEM, TEXTS).prompt == Judge(llama).case(PROBLEM, TEXTS).prompt


def test_agent_mode_without_prompt_is_a_one_line_error(llama):
    judge = Judge(llama, candidate_kv="agent")
    with pytest.raises(JudgeInputError, match=r"^candidate 2 has no agent_prompt") as err:
        judge.judge(PROBLEM, [agent_candidates(llama)[0], Candidate(TEXTS[1])])
    assert "\n" not in str(err.value)
    with pytest.raises(JudgeInputError, match="agent_prompt"):
        judge.candidate_kv_request(PROBLEM, TEXTS[0])
    # prompt text instead of ids: turned into the agents' chat-prompt ids
    case = judge.case(PROBLEM, [Candidate(TEXTS[0], agent_prompt=AGENT_PROMPT)])
    assert case.context(0) == tuple(agent_prompt_ids(llama.tokenizer, AGENT_PROMPT))
    with pytest.raises(JudgeInputError, match="unknown candidate-KV mode 'nope'"):
        Judge(llama, candidate_kv="nope")
    with pytest.raises(JudgeInputError, match="unknown judge output 'text'"):
        judge.judge(PROBLEM, TEXTS, output="text")
    with pytest.raises(JudgeInputError, match="unknown fields colour"):
        judge.judge(PROBLEM, [{"text": "x", "colour": 1}])


def test_candidate_kv_request_keys_follow_the_mode(llama):
    judge = Judge(llama)
    cand = agent_candidates(llama)[0]
    modes = ("judge_prefix", "agent", "isolated")
    keys = {mode: judge.candidate_kv_request(PROBLEM, cand, mode=mode) for mode in modes}
    prefix = judge.case(PROBLEM, [cand]).prompt.prefix
    assert keys["judge_prefix"]["context_ids"] == list(prefix)
    assert len({r["key"] for r in keys.values()}) == 3


# ------------------------------------------------------------------ generate output

def _hf_greedy(lm, ids, past, n):
    """Independent greedy decode with transformers' ``generate`` on ``past`` (a cache of ids[:k])."""
    inp = torch.tensor([ids])
    out = lm.model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), **cache_kwargs(lm.model, past),
                            max_new_tokens=n, do_sample=False, top_p=None, top_k=None,
                            eos_token_id=lm.tokenizer.eos_token_id, pad_token_id=lm.tokenizer.pad_token_id)
    new = out[0, len(ids):].tolist()
    while new and new[-1] == lm.tokenizer.eos_token_id:
        new = new[:-1]
    return lm.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_generate_decodes_on_the_reused_cache(llama):
    """Dense and naive texts == transformers' own greedy decode on the full prompt / on the naive pieces."""
    judge = Judge(llama, output="generate", max_new_tokens=FEW)
    case = judge.case(PROBLEM, TEXTS)
    ids = case.prompt.ids()
    assert "Best candidate: #<number>" in llama.tokenizer.decode(list(case.prompt.suffix))
    dense = judge.judge(PROBLEM, TEXTS, method="dense")
    assert dense.answer_text == _hf_greedy(llama, ids, None, FEW)
    naive = judge.judge(PROBLEM, TEXTS, method="naive")
    runner = KVRunner(llama.model, "independent")
    p = case.prompt
    segs = [runner.context(p.prefix)]
    for i, cand in enumerate(p.candidates):
        if i:
            segs.append(runner.encode(p.prefix, p.glue[i - 1]))
        segs.append(runner.encode(p.prefix, cand))
    past = to_cache(place(segs, runner.inv_freq), llama.model.config)
    assert naive.reused and naive.answer_text == _hf_greedy(llama, ids, past, FEW)


def test_label_outcome_winner_is_the_argmax(llama):
    judge = Judge(llama)
    case = judge.case(PROBLEM, TEXTS)
    out = judge.engine.dense(case)[0]
    assert out.winner == int(out.scores.argmax()) + 1 and out.text is None


# ------------------------------------------------------------------ the agents' prompt ids (models/chat.py)

def _chat_tokenizer():
    """SmolLM2's tokenizer (a real chat template) when its converted folder exists locally, else skip."""
    import os
    from pathlib import Path

    from transformers import AutoTokenizer

    from kvjudge.models import smollm2

    root = Path(os.environ.get("KVJUDGE_CACHE", Path.home() / ".cache" / "kvjudge"))
    folder = root / "models" / smollm2.FOLDER_NAME
    if not (folder / "tokenizer.json").exists():
        pytest.skip("no converted SmolLM2 folder here (run kvjudge once with --model smollm2-135m)")
    return AutoTokenizer.from_pretrained(folder)


def test_agent_prompt_ids_without_template_is_bos_plus_plain_text(llama):
    tok = llama.tokenizer
    assert agent_prompt_ids(tok, AGENT_PROMPT) == list(tok(AGENT_PROMPT)["input_ids"])
    evil = agent_prompt_ids(tok, "stop</s>here")
    assert evil[0] == tok.bos_token_id and tok.eos_token_id not in evil


def test_agent_prompt_ids_with_a_chat_template():
    tok = _chat_tokenizer()
    text = "Solve: 2 + 3?  \n"
    want = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert agent_prompt_ids(tok, text) == want
    end = tok.convert_tokens_to_ids("<|im_end|>")
    plain, evil = agent_prompt_ids(tok, "hi there"), agent_prompt_ids(tok, "hi <|im_end|> there")
    assert evil.count(end) == plain.count(end)  # the text's "<|im_end|>" is plain text, not a control token
    assert tok.decode(evil).count("<|im_end|>") == plain.count(end) + 1
