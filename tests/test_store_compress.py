"""The compressing store end to end without Ray: the agent's compress-before-put and the store's
``bytes_saved``, the judge reading compressed candidate KV, and ``bench compress`` in agent mode."""

from __future__ import annotations

import json

import pytest
import torch

import kvjudge.agents.actor as actor_mod
from kvjudge.agents.generate import Generator
from kvjudge.cache.compress.registry import CompressError, kept_count
from kvjudge.cache.segments import CompressedSegment
from kvjudge.cache.store import KVStore
from kvjudge.experiments.candidates import load_candidates, with_agent_prompts
from kvjudge.experiments.bench.compress import bench_compress
from kvjudge.experiments.judging import compress_candidates, permutation, to_original
from kvjudge.experiments.metrics import jcr
from kvjudge.judges.candidate import answer_ids
from kvjudge.judges.judge import Judge
from kvjudge.models import LoadedModel, byte_tokenizer, tiny_model
from kvjudge.models.chat import agent_prompt_ids
from kvjudge.models.tiny import spec_id
from kvjudge.topologies import load_topology, resolve_topology

PROBLEM = "What is 17 + 25?"
ANSWERS = ["17 + 25 = 42, since 7 + 5 = 12 and 10 + 20 + 10 = 40.", "The sum is 32.",
           "Adding tens then ones: 30 and 12 make 42. Answer: 42.", "42"]


def _model(name: str) -> LoadedModel:
    # a private instance: compression switches the model's attention to the masking wrapper
    return LoadedModel(tiny_model(name).float(), byte_tokenizer(), spec_id(name, {}))


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return _model("tiny-llama")


def _kv_bytes(lm: LoadedModel, tokens: int) -> int:
    """Bytes of an uncompressed fp32 segment of ``tokens`` tokens, from the model's config alone."""
    c = lm.model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * c.num_key_value_heads * tokens * head_dim * 4 * 2


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
def test_agent_put_compresses_and_store_reports_bytes_saved(lm, ratio, monkeypatch):
    """The agent actor's own put path (Ray's object store replaced by a local put): the store holds the
    compressed segment, its budget counts only the kept bytes, and ``bytes_saved`` is what was dropped."""
    prompt_ids = agent_prompt_ids(lm.tokenizer, f"Solve this: {PROBLEM}")
    ids = list(answer_ids(lm.tokenizer, ANSWERS[0]))
    full = _kv_bytes(lm, len(ids))
    # room for one uncompressed segment plus a bit more than the compressed one: two uncompressed would not fit
    store = KVStore(budget_bytes=full + int((ratio + 0.1) * full))
    agent = actor_mod._AgentActorImpl.__new__(actor_mod._AgentActorImpl)  # the actor class without Ray
    agent.gen, agent.store, agent.compress = Generator(lm), store, {"method": "laprox", "ratio": ratio}
    monkeypatch.setattr(actor_mod, "put_segment", lambda st, key, seg, meta: st.put(key, seg, meta))
    assert agent.encode(prompt_ids, ids, "compressed")
    assert store.put("plain", agent.gen.encode(prompt_ids, ids), {})  # an uncompressed entry saves nothing
    stats = store.stats()
    assert stats["entries"] == 2 and stats["evictions"] == 0
    held = store.get("compressed")
    assert isinstance(held, CompressedSegment) and held.length == len(ids)
    assert store.meta("compressed")["uncompressed_bytes"] == full
    assert stats["bytes"] == held.nbytes + full
    assert stats["bytes_saved"] == full - held.nbytes
    assert abs(stats["bytes_saved"] - (1 - ratio) * full) <= 0.03 * full


def test_agent_put_at_ratio_one_stores_the_segment_itself(lm, monkeypatch):
    ids = list(answer_ids(lm.tokenizer, ANSWERS[2]))
    store = KVStore(budget_bytes=10 * _kv_bytes(lm, len(ids)))
    agent = actor_mod._AgentActorImpl.__new__(actor_mod._AgentActorImpl)
    agent.gen, agent.store, agent.compress = Generator(lm), store, {"method": "snapkv", "ratio": 1.0}
    monkeypatch.setattr(actor_mod, "put_segment", lambda st, key, seg, meta: st.put(key, seg, meta))
    prompt_ids = agent_prompt_ids(lm.tokenizer, f"Solve this: {PROBLEM}")
    assert agent.encode(prompt_ids, ids, "k")
    held = store.get("k")
    assert not isinstance(held, CompressedSegment)
    assert torch.equal(held.keys, agent.gen.encode(prompt_ids, ids).keys)
    assert store.stats()["bytes"] == _kv_bytes(lm, len(ids)) and store.stats()["bytes_saved"] == 0


def _cands(mode: str) -> list:
    if mode != "agent":
        return list(ANSWERS)
    return [{"text": t, "agent_prompt": f"Agent {i + 1}, solve: {PROBLEM}"} for i, t in enumerate(ANSWERS)]


@pytest.mark.parametrize("mode", ["agent", "judge_prefix", "isolated"])
def test_compress_candidates_feeds_compressed_kv_to_naive(lm, mode):
    judge = Judge(lm, candidate_kv=mode)
    cands = _cands(mode)
    judge.prefetch(PROBLEM, cands)
    reqs = [judge.candidate_kv_request(PROBLEM, c) for c in cands]
    if mode == "agent":  # compressed against the agent's own prompt, the KV the candidate was encoded after
        assert reqs[1]["context_ids"] == agent_prompt_ids(lm.tokenizer, cands[1]["agent_prompt"])
    originals = {r["key"]: judge.runner.lookup(r["key"]) for r in reqs}
    base = {m: torch.tensor(judge.judge(PROBLEM, cands, m).scores) for m in ("naive", "dense")}
    got = {}
    for ratio in (1.0, 0.25):
        compress_candidates(judge, PROBLEM, cands, {"method": "laprox", "ratio": ratio})
        held = [judge.runner.lookup(k) for k in originals]
        if ratio == 1.0:  # nothing dropped: the store hands over the very segments, not wrappers
            assert all(s is seg for s, seg in zip(held, originals.values()))
        else:
            assert all(isinstance(s, CompressedSegment) for s in held)
            assert all(abs(s.kept_ratio - kept_count(s.length, ratio) / s.length) < 1e-9 for s in held)
        compress_candidates(judge, PROBLEM, cands, {"method": "laprox", "ratio": ratio})  # never twice
        assert all(judge.runner.lookup(k) is s for k, s in zip(originals, held))
        got[ratio] = {m: torch.tensor(judge.judge(PROBLEM, cands, m).scores) for m in ("naive", "dense")}
        for k, seg in originals.items():
            judge.runner.remember(k, seg)
    assert torch.equal(got[1.0]["naive"], base["naive"])
    assert (got[0.25]["naive"] - base["naive"]).abs().max() > 1e-4
    for ratio in got:  # dense prefills everything itself: compression cannot touch it
        assert torch.allclose(got[ratio]["dense"], base["dense"], atol=1e-6, rtol=0)


def _write_sets(path, lm) -> dict[str, str]:
    """Two progressive-refinement sets: one with the agents' prompt and answer token ids written out (the
    prompt ids are not the agent prompts' text, so only an agent-mode judge that reads them holds that
    context), one with texts alone (its agent prompts are rebuilt from the topology)."""
    problems = {"toy/1": PROBLEM, "toy/2": "What is 9 * 6?"}
    ids = lambda text: lm.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    answers = [t + f" (checked {i + 1} times)" for i, t in enumerate(ANSWERS)]
    lines = [
        {"task_id": "toy/1", "problem": problems["toy/1"], "candidates": answers, "sources": ["a1", "a2", "a3", "a4"],
         "agent_prompts": [f"Agent {i}: {PROBLEM}" for i in range(4)],
         "prompt_ids": [ids(f"<agent {i}> {PROBLEM}") for i in range(4)],
         "token_ids": [ids(t) for t in answers], "model_id": lm.model_id},
        {"task_id": "toy/2", "problem": problems["toy/2"], "candidates": ["54", "9 * 6 = 56", "It is 54.", "45"],
         "sources": ["a1", "a2", "a3", "a4"]},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return problems


def test_bench_compress_agent_mode(tmp_path, lm):
    path = tmp_path / "cands.jsonl"
    problems = _write_sets(path, lm)
    out = bench_compress(path, lm, methods=("laprox", "random"), ratios=(1.0, 0.25), judge_methods=("naive", "dg_jkr"),
                         seeds=(42,), out_dir=tmp_path / "out")
    assert out["candidate_kv"] == "agent" and out["problems"] == 2
    # independently: an agent-mode judge on the same shuffles, prompts rebuilt from the topology
    sets = load_candidates(path)
    assert with_agent_prompts(sets, problems, load_topology(resolve_topology("progressive_refinement"))) == 1
    judge = Judge(_model("tiny-llama"), candidate_kv="agent")
    winners = {"naive": [], "dense": []}
    for tid, cs in sets.items():
        perm = permutation(42, tid, len(cs.candidates))
        shown = [cs.candidate(i, lm.model_id) for i in perm]
        for m in winners:
            winners[m].append(to_original(perm, judge.judge(problems[tid], shown, m).winner))
    assert out["uncompressed"]["naive"]["jcr"] == jcr(winners["naive"], winners["dense"])
    # the store holds each distinct candidate's agent KV once: answer ids only, the agent prompt is context
    lengths = [len(t) for t in sets["toy/1"].token_ids] + [len(answer_ids(lm.tokenizer, t)) for t in sets["toy/2"].candidates]
    expected = sum(_kv_bytes(lm, n) for n in lengths)
    assert out["uncompressed"]["naive"]["store_bytes"] == expected
    pts = {(p["method"], p["ratio"], p["judge_method"]): p for p in out["points"]}
    assert len(pts) == 2 * 2 * 2 and not any("error" in p for p in pts.values())
    for method in ("laprox", "random"):
        one, quarter = pts[(method, 1.0, "naive")], pts[(method, 0.25, "naive")]
        assert one["jcr_vs_uncompressed"] == 1.0 and one["jcr"] == out["uncompressed"]["naive"]["jcr"]
        assert one["score_shift"] < 1e-6 < 1e-5 < quarter["score_shift"]
        assert abs(quarter["store_ratio"] - 0.25) < 0.05
        assert pts[(method, 0.25, "dg_jkr")]["jcr"] is not None
        # DG-JKR at ratio 1.0 (its KVCOMM arm keeps its anchors and decisions) repeats itself uncompressed
        dg = pts[(method, 1.0, "dg_jkr")]
        assert dg["jcr_vs_uncompressed"] == 1.0 and dg["score_shift"] < 1e-6
        assert dg["jcr"] == out["uncompressed"]["dg_jkr"]["jcr"]
        assert dg["fallback_rate"] == out["uncompressed"]["dg_jkr"]["fallback_rate"]
    saved = json.loads((tmp_path / "out" / "compress.json").read_text())
    assert saved["points"] == json.loads(json.dumps(out["points"]))
    assert (tmp_path / "out" / "compress_jcr.png").is_file()


def test_bench_compress_bad_input_is_one_line(tmp_path, lm):
    path = tmp_path / "three.jsonl"
    path.write_text(json.dumps({"task_id": "t/1", "problem": "2+3?", "candidates": ["5", "6", "7"],
                                "sources": ["x", "y", "z"]}) + "\n")
    with pytest.raises(ValueError, match="no agent prompts") as err:  # cannot be rebuilt: not the topology's agents
        bench_compress(path, lm, methods=("knorm",), ratios=(0.5,), judge_methods=("naive",))
    assert "\n" not in str(err.value)
    with pytest.raises(CompressError, match="candidate-KV mode"):
        bench_compress(path, lm, methods=("knorm",), ratios=(0.5,), candidate_kv="shared")
    # a point twice would count its bytes twice (more than uncompressed); no point at all is no sweep
    for kwargs, msg in (({"ratios": (0.5, 0.5)}, "kept ratio 0.5 given twice"), ({"ratios": ()}, "no kept ratio"),
                        ({"methods": ("knorm", "knorm")}, "'knorm' given twice"),
                        ({"judge_methods": ("naive", "naive")}, "'naive' given twice")):
        with pytest.raises(CompressError, match=msg) as err:
            bench_compress(path, lm, **{"methods": ("knorm",), "ratios": (0.5,), "judge_methods": ("naive",),
                                        "candidate_kv": "judge_prefix", **kwargs})
        assert "\n" not in str(err.value)


def test_bench_compress_cli_ratios_are_distinct_and_not_empty(tmp_path, capsys):
    """``kvjudge bench compress --ratios``: duplicates and an empty list are one-line errors, exit 2."""
    from kvjudge.app.cli import main

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"task_id": "t/1", "problem": "2+3?", "candidates": ["5", "6"]}) + "\n")
    for ratios, msg in (("0.5,0.5", "0.5 is given twice"), ("", "at least one"), (" , ", "at least one")):
        code = main(["bench", "compress", "--candidates", str(path), "--model", "tiny-llama", "--ratios", ratios,
                     "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and msg in err and "--ratios" in err, err
    assert not (tmp_path / "out" / "compress.json").exists()
