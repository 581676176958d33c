"""Batched generation equals batch-1 generation; each request's agent KV equals a fresh prefill;
the batch queue and the agent actor (without Ray) collect concurrent requests into one batch."""

import threading

import pytest
import torch

from kvjudge.agents.actor import _AgentActorImpl
from kvjudge.agents.batching import BatchQueue
from kvjudge.agents.generate import GenRequest, Generator
from kvjudge.cache.encoder import KVRunner, segment_key
from kvjudge.cache.store import KVStore
from kvjudge.models import LoadedModel, byte_tokenizer, tiny_model
from kvjudge.models.tiny import spec_id

REQUESTS = [
    GenRequest("Hi.", max_new_tokens=9),
    GenRequest("Count to three, please, and then stop counting.", max_new_tokens=14),
    GenRequest("A much longer prompt: it has many words in it so that the other rows get left padding.", 6),
    GenRequest("Sample me.", max_new_tokens=10, temperature=1.0, seed=5),
]


def fresh_kv(lm: LoadedModel, prompt_ids: list[int], answer_ids: list[int]):
    """The answer's KV from one independent dense prefill of prompt + answer."""
    _, full = KVRunner(lm.model, "independent").forward(list(prompt_ids) + list(answer_ids), keep_cache=True)
    return full.slice(len(prompt_ids), full.length)


def assert_kv_matches(lm, gen_out):
    assert gen_out.agent_kv is not None
    assert gen_out.agent_kv.start == len(gen_out.prompt_ids)
    assert gen_out.agent_kv.length == len(gen_out.token_ids)  # the last generated token included
    assert gen_out.agent_kv.token_ids == tuple(gen_out.token_ids)
    want = fresh_kv(lm, gen_out.prompt_ids, gen_out.token_ids)
    torch.testing.assert_close(gen_out.agent_kv.keys, want.keys, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(gen_out.agent_kv.values, want.values, atol=1e-3, rtol=1e-3)


def test_batched_equals_batch_one_token_for_token(llama):
    gen = Generator(llama)
    batched = gen.generate_batch(REQUESTS)
    assert len({len(o.prompt_ids) for o in batched}) == len(REQUESTS)  # prompts of different lengths
    for req, out in zip(REQUESTS, batched):
        alone = gen.generate_batch([req])[0]
        assert out.batch_size == len(REQUESTS) and alone.batch_size == 1
        assert out.token_ids == alone.token_ids and out.text == alone.text
        assert len(out.token_ids) == req.max_new_tokens  # each row kept its own budget
        assert out.prompt_ids == gen.prompt_ids(req.prompt)


def test_each_request_kv_equals_a_fresh_prefill(llama):
    for out in Generator(llama).generate_batch(REQUESTS):
        assert_kv_matches(llama, out)


def test_rows_that_stop_early_keep_their_answer_and_kv():
    """A stop token ends one row early while the others run on (it is fed pad tokens meanwhile)."""
    lm = LoadedModel(tiny_model("tiny-llama").float(), byte_tokenizer(), spec_id("tiny-llama", {}))
    gen = Generator(lm)
    reqs = [GenRequest("Hi.", 12), GenRequest("Count to three, please.", 12)]
    probe = gen.generate_batch(reqs[:1])[0]
    stop = probe.token_ids[4]  # make a token the first row writes a stop token
    lm.model.generation_config.eos_token_id = stop
    alone = [gen.generate_batch([r])[0] for r in reqs]
    batched = gen.generate_batch(reqs)
    assert len(alone[0].token_ids) <= 4 and stop not in alone[0].token_ids
    for a, b in zip(alone, batched):
        assert a.token_ids == b.token_ids
        if b.token_ids:
            assert_kv_matches(lm, b)


def test_sampling_in_a_batch_is_per_request_and_private(llama):
    gen = Generator(llama)
    before = torch.get_rng_state()
    a = gen.generate_batch([GenRequest("Write.", 10, 1.0, 7), GenRequest("Other prompt here.", 10, 1.0, 8)])
    assert torch.equal(torch.get_rng_state(), before)
    b = gen.generate_batch([GenRequest("Write.", 10, 1.0, 7)])
    c = gen.generate_batch([GenRequest("Write.", 10, 1.0, 9)])
    assert a[0].token_ids == b[0].token_ids  # batch mates do not change a request's draws
    assert c[0].token_ids != b[0].token_ids  # the seed matters


def test_batch_queue_collects_within_the_window_and_caps_the_batch():
    seen: list[list[int]] = []

    def run(items):
        seen.append(list(items))
        return [i * 10 for i in items]

    q = BatchQueue(run, max_batch=3, window_s=0.3)
    futures = [q.submit(i) for i in range(4)]
    assert [f.result(timeout=5) for f in futures] == [0, 10, 20, 30]
    q.close()
    assert [len(b) for b in seen] == [3, 1] and sorted(sum(seen, [])) == [0, 1, 2, 3]
    assert q.stats()["batches"] == 2 and q.stats()["items"] == 4


def test_batch_queue_hands_errors_to_every_caller():
    def run(items):
        raise RuntimeError("boom")

    q = BatchQueue(run, max_batch=4, window_s=0.2)
    futures = [q.submit(i) for i in range(2)]
    for f in futures:
        with pytest.raises(RuntimeError, match="boom"):
            f.result(timeout=5)
    q.close()


def test_actor_batches_concurrent_requests_and_publishes_agent_kv():
    """The actor class without Ray: three callers on threads land in one batch; the published agent
    KV sits under segment_key(model_id, prompt_ids, answer_ids) and equals a fresh prefill."""
    actor = _AgentActorImpl("tiny-llama", None, None, max_batch=8, window_s=0.5)
    assert actor.error is None
    actor.store = KVStore(1 << 26)
    prompts = ["Hi.", "Count to three, please.", "Name a colour."]
    results: dict[int, dict] = {}

    def call(i):
        results[i] = actor.generate({"agent": f"a{i}", "prompt": prompts[i], "max_new_tokens": 8,
                                     "publish_agent_kv": True})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    # ready() and encode() answer while the batch is collecting / running
    assert actor.encode([1, 2, 3], [4, 5], "k", {}) is True
    for t in threads:
        t.join(timeout=60)
    gen = Generator(actor.gen.lm)
    for i, res in results.items():
        assert res["batch_size"] == 3 and res["tokens_per_s"] > 0
        alone = gen.generate(prompts[i], max_new_tokens=8)
        assert res["token_ids"] == alone.token_ids and res["prompt_ids"] == alone.prompt_ids
        key = segment_key(actor.gen.model_id, res["prompt_ids"], res["token_ids"])
        assert res["store_key"] == key
        seg = actor.store.get(key)
        want = fresh_kv(actor.gen.lm, res["prompt_ids"], res["token_ids"])
        torch.testing.assert_close(seg.keys, want.keys, atol=1e-3, rtol=1e-3)
    plain = actor.generate({"agent": "x", "prompt": "Hi.", "max_new_tokens": 4})
    assert plain["store_key"] is None and plain["batch_size"] == 1
    assert actor.stats()["batches"] == 2 and actor.stats()["items"] == 4
