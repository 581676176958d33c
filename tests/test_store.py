"""KV store: eviction policies, the byte-budgeted store, and the Ray store actor."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from kvjudge.cache.eviction import EVICTION_POLICIES, LRUPolicy, make_policy
from kvjudge.cache.segments import KVSegment
from kvjudge.cache.store import KVStore, call, to_host


@dataclass
class Blob:
    nbytes: int


def segment(t: int = 3, seed: int = 0, start: int = 0) -> KVSegment:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 2, t, 4, generator=g)
    v = torch.randn(2, 2, t, 4, generator=g)
    return KVSegment(k, v, start, tuple(range(100, 100 + t)))


# --- policies ----------------------------------------------------------------------------------


def test_registry_and_unknown_policy():
    assert EVICTION_POLICIES["lru"] is LRUPolicy
    assert isinstance(make_policy("lru"), LRUPolicy)
    with pytest.raises(ValueError, match=r"unknown eviction policy 'nope'; known: lru"):
        make_policy("nope")
    with pytest.raises(ValueError, match="known: lru"):
        KVStore(10, eviction="nope")


def test_lru_policy_order():
    p = make_policy("lru")
    for k in "abc":
        p.insert(k, 1)
    assert p.victim() == "a"
    p.touch("a")
    assert p.victim() == "b"
    p.remove("b")
    assert p.victim() == "c"
    p.insert("c", 5)  # re-insert counts as a use
    assert p.victim() == "a"
    p.touch("zzz")  # unknown: no-op
    p.remove("a")
    p.remove("c")
    assert len(p) == 0
    with pytest.raises(KeyError):
        p.victim()


# --- store -------------------------------------------------------------------------------------


def test_store_evicts_least_recently_used_and_get_refreshes():
    s = KVStore(30)
    for k in "abc":
        assert s.put(k, Blob(10))
    assert s.get("a") is not None  # a is now the most recent: b is the LRU
    assert s.put("d", Blob(10))
    assert set(s.keys()) == {"a", "c", "d"}
    assert s.put("e", Blob(15))  # needs two evictions: c then a
    assert set(s.keys()) == {"d", "e"}
    assert s.bytes_used == 25
    assert s.stats()["evictions"] == 3
    assert not s.contains("b") and s.get("b") is None


def test_contains_and_meta_do_not_touch():
    s = KVStore(20)
    s.put("a", Blob(10), {"agent": "x"})
    s.put("b", Blob(10))
    assert s.contains("a") and s.meta("a") == {"agent": "x"}
    assert s.meta("b") == {} and s.meta("zz") is None
    s.put("c", Blob(10))  # a is still the LRU
    assert s.keys() == ["b", "c"]
    assert s.stats()["hits"] == 0 and s.stats()["misses"] == 0


def test_budget_never_exceeded_random_puts():
    rng = random.Random(1234)
    budget = 1000
    s = KVStore(budget)
    accepted = rejected = 0
    for i in range(2000):
        key = f"k{rng.randrange(60)}"
        size = rng.choice([0, 1, rng.randrange(1, 400), rng.randrange(400, 1200)])
        ok = s.put(key, Blob(size))
        assert ok == (size <= budget)
        accepted += ok
        rejected += not ok
        assert s.bytes_used <= budget
        assert s.bytes_used == sum(s.get(k).nbytes for k in s.keys()) if i % 97 == 0 else True
        if rng.random() < 0.2:
            s.get(f"k{rng.randrange(60)}")
        if rng.random() < 0.05:
            s.delete(f"k{rng.randrange(60)}")
    st = s.stats()
    assert st["puts"] == accepted and st["rejected"] == rejected
    assert st["bytes"] == sum(s._items[k][1] for k in s.keys())
    assert st["entries"] == len(s.keys())


def _counters(store: KVStore) -> dict:
    return {k: v for k, v in store.stats().items() if k not in ("bytes_by_node", "bytes_read_by_node", "started_at", "bytes_saved")}


def test_oversize_item_rejected_and_store_unchanged():
    s = KVStore(100)
    assert s.put("a", Blob(60))
    assert not s.put("big", Blob(101))
    assert not s.put("a", Blob(500))  # refusing a replacement keeps the old entry
    assert s.keys() == ["a"] and s.get("a").nbytes == 60
    assert _counters(s) == {
        "entries": 1, "bytes": 60, "budget_bytes": 100, "hits": 1, "misses": 0,
        "evictions": 0, "puts": 1, "rejected": 2,
    }
    assert s.put("exact", Blob(100))  # exactly the budget fits, evicting a
    assert s.keys() == ["exact"] and s.bytes_used == 100


def test_replace_same_key_accounting():
    s = KVStore(100)
    s.put("a", Blob(40), {"v": 1})
    s.put("b", Blob(40))
    assert s.put("a", Blob(60), {"v": 2})  # 40 (b) + 60: fits without evicting once a's 40 is gone
    assert s.bytes_used == 100 and set(s.keys()) == {"a", "b"}
    assert s.meta("a") == {"v": 2} and s.stats()["evictions"] == 0
    assert s.put("a", Blob(10))
    assert s.bytes_used == 50 and len(s) == 2
    assert s.put("b", Blob(100))  # must evict a (replacement of b itself is no eviction)
    assert s.keys() == ["b"] and s.bytes_used == 100
    assert s.stats()["evictions"] == 1


def test_stats_counters_exact():
    s = KVStore(25)
    s.put("a", Blob(10))
    s.put("b", Blob(10))
    s.get("a")
    s.get("a")
    s.get("x")
    assert s.get_many(["b", "y", "a"])[1] is None
    s.put("c", Blob(10))  # get_many touched b then a, so b is the LRU and goes
    assert s.keys() == ["a", "c"]
    assert not s.put("d", Blob(30))  # over budget: rejected, nothing evicted
    assert s.delete("a") is True and s.delete("c") is True and s.delete("a") is False
    assert _counters(s) == {
        "entries": 0, "bytes": 0, "budget_bytes": 25, "hits": 4, "misses": 2,
        "evictions": 1, "puts": 3, "rejected": 1,
    }


def test_real_segments_local_store_and_to_host():
    seg = segment(5)
    h = KVStore(budget_bytes=seg.nbytes * 2)
    assert to_host(seg) is seg
    assert call(h, "put", "k", seg, {"n": 5})
    got = call(h, "get", "k")
    assert torch.equal(got.keys, seg.keys) and got.token_ids == seg.token_ids
    assert call(h, "get_many", ["k", "nope"])[1] is None
    assert call(h, "contains", "k") and call(h, "keys") == ["k"] and call(h, "meta", "k") == {"n": 5}
    assert call(h, "stats")["bytes"] == seg.nbytes
    with pytest.raises(ValueError):
        KVStore(-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_host_moves_cuda_segment():
    seg = segment(3).to("cuda")
    host = to_host(seg)
    assert host.keys.device.type == "cpu" and torch.equal(host.values, seg.values.cpu())


# --- Ray ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_ctx():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_store_actor_round_trip(ray_ctx):
    from kvjudge.cache.store_actor import get_or_create_store

    seg = segment(4, seed=7, start=3)
    store = get_or_create_store(name="t-roundtrip", budget_bytes=seg.nbytes * 3)
    again = get_or_create_store(name="t-roundtrip", budget_bytes=1)  # existing one, budget kept
    assert call(store, "put", "k", seg, {"agent": "a0"})
    got = call(again, "get", "k")
    assert isinstance(got, KVSegment)
    assert torch.equal(got.keys, seg.keys) and torch.equal(got.values, seg.values)
    assert got.start == 3 and got.token_ids == seg.token_ids
    many = call(store, "get_many", ["k", "missing"])
    assert torch.equal(many[0].keys, seg.keys) and many[1] is None
    assert call(store, "contains", "k") and call(store, "keys") == ["k"]
    st = call(store, "stats")
    assert st["budget_bytes"] == seg.nbytes * 3 and st["hits"] == 2 and st["misses"] == 1


def test_store_outlives_writer_actor(ray_ctx):
    ray = ray_ctx
    from kvjudge.cache.store_actor import get_or_create_store, get_store, kill_store

    @ray.remote(num_cpus=0)
    class Writer:
        def write(self, name: str, key: str, seed: int, create: bool) -> bool:
            from kvjudge.cache.store_actor import get_or_create_store, get_store

            store = get_or_create_store(name=name, budget_bytes=1 << 20) if create else get_store(name)
            return ray.get(store.put.remote(key, segment(6, seed=seed), {"writer": seed}))

    # "t-owned": the driver created it and the writer finds it by name. "t-by-writer": the writer
    # creates it itself, so it must come out detached rather than owned by (and dying with) the writer.
    get_or_create_store(name="t-owned", budget_bytes=1 << 20)
    w = Writer.remote()
    assert ray.get(w.write.remote("t-owned", "k", 11, False))
    assert ray.get(w.write.remote("t-by-writer", "k", 12, True))
    ray.kill(w, no_restart=True)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(w.write.remote("t-owned", "k2", 0, False), timeout=10)
    for name, seed in (("t-owned", 11), ("t-by-writer", 12)):
        got = call(get_store(name), "get", "k")
        assert got is not None and torch.equal(got.keys, segment(6, seed=seed).keys)
        assert call(get_store(name), "meta", "k") == {"writer": seed}
    assert kill_store("t-by-writer") and not kill_store("t-nonexistent")


def test_get_store_waits_for_a_store_that_appears_and_names_one_that_never_does():
    """An actor started right after the store's creation may look it up first: get_store looks again
    for wait_s, then fails in one line naming the store."""
    import threading
    import time

    import ray

    from kvjudge.cache.store_actor import get_or_create_store, get_store, kill_store

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(ValueError, match="no KV store actor 'late-store' in namespace 'kvjudge' \\(looked for 0.5 s\\)"):
            get_store("late-store", "kvjudge", wait_s=0.5)
        threading.Timer(0.6, lambda: get_or_create_store("late-store", namespace="kvjudge")).start()
        t0 = time.monotonic()
        handle = get_store("late-store", "kvjudge", wait_s=20)
        assert time.monotonic() - t0 >= 0.5 and ray.get(handle.stats.remote())["entries"] == 0
    finally:
        kill_store("late-store", namespace="kvjudge")
        if started:
            ray.shutdown()
