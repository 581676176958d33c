"""The simulated model: spec parsing, deterministic answers, sleep-bound batch timing, KV shapes,
the sim judge, the agent actor picking the sim generator, the judge and generator interfaces both
implementations meet, and a sim actor's modules loading no torch."""

import inspect
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from kvjudge.agents.actor import _AgentActorImpl, make_generator
from kvjudge.agents.base import GeneratorLike, GenRequest
from kvjudge.agents.generate import Generator
from kvjudge.agents.sim import SimGenerator
from kvjudge.cache.encoder import segment_key
from kvjudge.cache.store import KVStore
from kvjudge.judges.base import JudgeLike
from kvjudge.judges.judge import Judge
from kvjudge.judges.prompt import JudgeInputError
from kvjudge.judges.sim import SimJudge
from kvjudge.models import ModelLoadError
from kvjudge.models.sim import SimSpec, is_sim_spec, parse_sim_spec, tokenize


def test_spec_parsing():
    spec = parse_sim_spec("sim:tokens_per_s=20,batch_speedup=4,kv_layers=3,kv_heads=1,head_dim=6,answer_tokens=9")
    assert spec == SimSpec(20.0, 4.0, 3, 1, 6, 9)
    assert parse_sim_spec("sim: tokens_per_s = 2.5 ").tokens_per_s == 2.5
    assert is_sim_spec("sim") and is_sim_spec("sim:x") and not is_sim_spec("simple") and not is_sim_spec("tiny-llama")


@pytest.mark.parametrize("spec, words", [
    ("sim", "needs tokens_per_s"),
    ("sim:batch_speedup=2", "needs tokens_per_s"),
    ("sim:tokens_per_s=0", "must be > 0"),
    ("sim:tokens_per_s=-3", "must be > 0"),
    ("sim:tokens_per_s=fast", "not a number"),
    ("sim:tokens_per_s=5,kv_layers=1.5", "not an integer"),
    ("sim:tokens_per_s=5,kv_heads=0", "must be >= 1"),
    ("sim:tokens_per_s=5,batch_speedup=0.5", "must be >= 1"),
    ("sim:tokens_per_s=5,colour=red", "not one of"),
    ("sim:tokens_per_s=5,answer_tokens", "not one of"),
    ("sim:tokens_per_s=5,tokens_per_s=6", "given twice"),
    ("sim:tokens_per_s=nan", "must be > 0"),
])
def test_bad_specs_are_one_line_errors(spec, words):
    with pytest.raises(ModelLoadError) as err:
        parse_sim_spec(spec)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_answers_are_deterministic_functions_of_prompt_and_seed():
    gen = SimGenerator(parse_sim_spec("sim:tokens_per_s=1e6,answer_tokens=24"))
    a, b, c, d = gen.generate_batch([GenRequest("What is 2+2?", 64, seed=1), GenRequest("What is 2+2?", 64, seed=1),
                                     GenRequest("What is 2+2?", 64, seed=2), GenRequest("What is 3+3?", 64, seed=1)])
    assert a.text == b.text and a.token_ids == b.token_ids
    assert len({a.text, c.text, d.text}) == 3
    assert len(a.token_ids) == 24 and tokenize(a.text) == a.token_ids and a.text == a.text.strip()
    assert len(gen.generate("What is 2+2?", max_new_tokens=5).token_ids) == 5  # capped by the request
    alone = SimGenerator(parse_sim_spec("sim:tokens_per_s=1e6,answer_tokens=24")).generate("What is 2+2?", 64, seed=1)
    assert alone.text == a.text  # batch mates do not matter


def test_kv_has_the_declared_shape_and_positions():
    gen = SimGenerator(parse_sim_spec("sim:tokens_per_s=1e6,kv_layers=3,kv_heads=2,head_dim=4,answer_tokens=7"))
    out = gen.generate("Hello there", 16)
    assert out.agent_kv.keys.shape == (3, 2, 7, 4) == out.agent_kv.values.shape
    assert out.agent_kv.start == len(out.prompt_ids) == len(tokenize("Hello there"))
    assert out.agent_kv.token_ids == tuple(out.token_ids)
    seg = gen.encode([1, 2, 3], [4, 5])
    assert seg.keys.shape == (3, 2, 2, 4) and seg.start == 3 and seg.keys.flags.c_contiguous
    assert seg.nbytes == 2 * 3 * 2 * 2 * 4 * 4  # keys and values, fp32
    # keys depend on the position, values only on the token
    later = gen.encode([1, 2, 3, 9], [4, 5])
    assert np.array_equal(seg.values, later.values) and not np.array_equal(seg.keys, later.keys)


def _timed(gen, n):
    t0, c0 = time.perf_counter(), time.process_time()
    gen.generate_batch([GenRequest(f"p{i}", 64) for i in range(n)])
    return time.perf_counter() - t0, time.process_time() - c0


def test_batch_cost_follows_batch_speedup_and_uses_no_cpu():
    """20 tokens at 400 tok/s is 0.05 s alone; a batch of 4 costs 4x without batch speedup, 1x with
    batch_speedup=4 (ratios, not absolute times; sleeping, not spinning)."""
    serial = SimGenerator(parse_sim_spec("sim:tokens_per_s=400,answer_tokens=20"))
    batched = SimGenerator(parse_sim_spec("sim:tokens_per_s=400,answer_tokens=20,batch_speedup=4"))
    one, cpu_one = _timed(serial, 1)
    four, cpu_four = _timed(serial, 4)
    four_fast, _ = _timed(batched, 4)
    assert 3.0 < four / one < 5.0
    assert 0.7 < four_fast / one < 1.5
    assert cpu_one + cpu_four < 0.5 * (one + four)
    assert parse_sim_spec("sim:tokens_per_s=10,batch_speedup=2").batch_seconds(10, 6) == pytest.approx(3.0)


def test_sim_judge_is_deterministic_and_honours_its_interface():
    judge = SimJudge("sim:tokens_per_s=10,judge_s=0.05", method="dense")
    cands = ["alpha", "beta", "gamma"]
    t0 = time.perf_counter()
    v = judge.judge("Pick one.", cands)
    assert time.perf_counter() - t0 >= 0.05
    assert 1 <= v.winner <= 3 and v.scores[v.winner - 1] == max(v.scores) and not v.reused
    others = {judge.judge("Pick one.", cands, method=m).winner for m in ("naive", "kvcomm", "dg_jkr")}
    assert others == {v.winner}
    winners = {judge.judge(f"Problem {i}", cands).winner for i in range(30)}
    assert winners == {1, 2, 3}  # the hash spreads over the slots
    with pytest.raises(JudgeInputError):
        judge.judge("Pick one.", cands, method="nope")
    with pytest.raises(JudgeInputError):
        judge.judge("Pick one.", cands, candidate_kv="agent")  # no agent prompts
    gen_out = judge.judge("Pick one.", cands, output="generate")
    assert gen_out.scores == [] and gen_out.answer_text == f"Candidate #{gen_out.winner}"


def test_sim_judge_finds_what_the_sim_agent_published():
    """Agent mode: the judge's key for a candidate is the key the agent published its KV under."""
    actor = _AgentActorImpl("sim:tokens_per_s=1e6,answer_tokens=8", None, None)
    actor.store = KVStore(1 << 20)
    res = actor.generate({"agent": "a1", "prompt": "Solve it.", "publish_agent_kv": True})
    judge = SimJudge("sim:tokens_per_s=1e6", candidate_kv="agent", fetch=actor.store.get)
    cand = {"text": res["text"], "token_ids": res["token_ids"], "prompt_ids": res["prompt_ids"]}
    assert judge.candidate_kv_request("Solve it.", cand)["key"] == res["store_key"]
    assert res["store_key"] == segment_key(actor.gen.model_id, res["prompt_ids"], res["token_ids"])
    judge.judge("Solve it.", [cand, cand], method="naive")
    assert judge.fetched == 2


def test_actor_picks_the_sim_generator_and_batches():
    assert isinstance(make_generator("sim:tokens_per_s=50"), SimGenerator)
    bad = _AgentActorImpl("sim:speed=3", None, None)
    assert bad.error and "not one of" in bad.error
    actor = _AgentActorImpl("sim:tokens_per_s=200,answer_tokens=10,batch_speedup=8", None, None, window_s=0.2)
    out: list[dict] = []
    threads = [threading.Thread(target=lambda i=i: out.append(actor.generate({"agent": f"a{i}", "prompt": f"q{i}"})))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(r["batch_size"] for r in out) == [4, 4, 4, 4]
    assert actor.stats()["batches"] == 1


def test_segment_key_is_the_hash_of_int64_token_bytes():
    """The torch-free key equals the hash computed from torch's own int64 bytes (an independent path)."""
    import hashlib

    ctx, ids = [1, 2, 300, 70000], [5, 2**40, 0]
    h = hashlib.sha256(b"some-model")
    for part in (ctx, ids):
        h.update(len(part).to_bytes(8, "little"))
        h.update(torch.tensor(part, dtype=torch.int64).numpy().tobytes())
    assert segment_key("some-model", ctx, ids) == h.hexdigest()[:32]
    assert segment_key("some-model", tuple(ctx), ids) == segment_key("some-model", ctx, ids)
    assert segment_key("some-model", [], ctx + ids) != segment_key("some-model", ctx, ids)


def _signature_fits(protocol: type, impl: object, name: str) -> None:
    """``impl.name`` takes every parameter ``protocol.name`` declares, under the same name and default
    (an implementation may add optional parameters of its own)."""
    want = inspect.signature(getattr(protocol, name)).parameters
    have = inspect.signature(getattr(impl, name)).parameters
    for p in list(want.values())[1:]:  # past self
        assert p.name in have, f"{type(impl).__name__}.{name} lacks {p.name!r}"
        assert have[p.name].default == p.default, f"{type(impl).__name__}.{name}({p.name}) default differs"
    extra = [q for q in have.values() if q.name not in want and q.kind is not q.VAR_KEYWORD]
    assert all(q.default is not q.empty for q in extra), f"{type(impl).__name__}.{name} needs more arguments"


def _members(protocol: type) -> tuple[list[str], list[str]]:
    """(methods, properties) a protocol declares."""
    names = [n for n in vars(protocol) if not n.startswith("_")]
    props = [n for n in names if isinstance(vars(protocol)[n], property)]
    return [n for n in names if n not in props], props


def test_real_and_simulated_judges_meet_one_interface(llama):
    """Judge and SimJudge both take ``fetch`` in the constructor and meet JudgeLike: same method
    parameters, and the properties answer (no probing of ``lm`` / ``case`` / ``runner`` needed)."""
    real = Judge(llama, fetch=lambda key: None)
    sim = SimJudge("sim:tokens_per_s=1e6", fetch=lambda key: None)
    methods, props = _members(JudgeLike)
    assert set(methods) >= {"judge", "candidate_kv_request", "prefetch", "check_candidates"}
    assert set(props) == {"model_id", "device", "fetched"}
    for judge in (real, sim):
        assert isinstance(judge, JudgeLike)
        for name in methods:
            _signature_fits(JudgeLike, judge, name)
        assert isinstance(judge.model_id, str) and isinstance(judge.device, str) and judge.fetched == 0
    assert real.device == "cpu" and sim.device == "sim" and real.model_id == llama.model_id
    assert "too many candidates" in real.check_candidates("p", 10) and real.check_candidates("p", 2) is None
    assert sim.check_candidates("p", 10) is None
    # the constructor's fetch is the one used: a hit is counted, in both
    sim_hit = SimJudge("sim:tokens_per_s=1e6", fetch=lambda key: object())
    sim_hit.judge("p", ["a", "b"], method="naive")
    assert sim_hit.fetched == 2
    req = real.candidate_kv_request("p", "an answer")
    seg = Judge(llama).runner.encode(req["context_ids"], req["ids"])
    real_hit = Judge(llama, method="naive", fetch=lambda key: seg if key == req["key"] else None)
    real_hit.judge("p", ["an answer"])
    assert real_hit.fetched == 1


def test_real_and_simulated_generators_meet_one_interface(llama):
    methods, props = _members(GeneratorLike)
    assert set(props) == {"model_id", "max_positions"} and "compress" in methods
    real, sim = Generator(llama), SimGenerator(parse_sim_spec("sim:tokens_per_s=1e6"))
    for gen in (real, sim):
        assert isinstance(gen, GeneratorLike)
        for name in methods:
            _signature_fits(GeneratorLike, gen, name)
    assert real.max_positions == llama.model.config.max_position_embeddings and sim.max_positions is None
    seg = sim.encode([1, 2], [3, 4])
    assert sim.compress(seg, "knorm", 0.5, [1, 2]) is seg  # the simulation stores KV uncompressed


def test_sim_judge_refuses_unknown_methods_and_options_in_one_line():
    for kwargs, words in [({"method": "nope"}, "unknown judge method 'nope'"),
                          ({"method": "kvcomm", "method_options": {"colour": 1}}, "colour")]:
        with pytest.raises(JudgeInputError) as err:
            SimJudge("sim:tokens_per_s=5", **kwargs)
        assert words in str(err.value) and "\n" not in str(err.value)
    SimJudge("sim:tokens_per_s=5", method="kvcomm", method_options={"gamma": 0.5})  # a known option


SIM_ACTORS = """
import sys
from kvjudge.agents.actor import _AgentActorImpl
from kvjudge.judges.actor import _JudgeActorImpl
from kvjudge.cache.store import KVStore
from kvjudge.cache.store_actor import put_segment
agent = _AgentActorImpl("sim:tokens_per_s=1e6,answer_tokens=8", None, None)
agent.store = KVStore(1 << 20)
res = agent.generate({"agent": "a1", "prompt": "Solve it.", "publish_agent_kv": True})
assert res["store_key"] and agent.error is None
judge = _JudgeActorImpl("sim:tokens_per_s=1e6", "dg_jkr", {}, None, None)
assert judge.error is None and judge.judge.judge("p", ["a", "b"]).winner in (1, 2)
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers"})
print("HEAVY", heavy)
"""


def test_sim_actors_import_no_torch_or_transformers():
    """Building and using a simulated agent and judge (the actor classes, the store) in a fresh
    interpreter loads neither torch nor transformers."""
    proc = subprocess.run([sys.executable, "-c", SIM_ACTORS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]
