"""Scale-out on the simulated model (sleep-bound, so stable on a busy 2-core machine): problems in
flight and replicas speed a chain up, every problem is recorded exactly once, ``--resume`` after an
interrupt loses and duplicates nothing; the store keeps segments where they were made and never
holds their bytes."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from kvjudge.agents.actor import AgentActor
from kvjudge.cache.segments import KVSegment
from kvjudge.cache.store_actor import SegmentRef, get_or_create_store, get_segment, kill_store, put_segment
from kvjudge.experiments.bench.run import bench_run, synthetic_problems
from kvjudge.judges.actor import JudgeActor
from kvjudge.runtime.runner import Halted, Orchestrator, Replicas, run
from kvjudge.topologies import load_topology_text
from kvjudge.topologies.bound import lower_bound

# one request alone sleeps 8 / 80 = 0.1 s; batching buys nothing (batch_speedup 1), so only replicas add capacity
SIM = "sim:tokens_per_s=80,answer_tokens=8"
CHAIN = f"""
name: chain
defaults: {{model: "{SIM}", max_new_tokens: 32}}
agents:
  a1: {{role: solver, prompt: "Solve: {{problem}}"}}
  a2: {{role: refiner, prompt: "Improve: {{previous}} for {{problem}}"}}
  a3: {{role: refiner, prompt: "Check: {{previous}} for {{problem}}"}}
  a4: {{role: finalizer, prompt: "Final: {{previous}} for {{problem}}"}}
edges: [{{source: a1, target: a2}}, {{source: a2, target: a3}}, {{source: a3, target: a4}}]
judge: {{method: naive}}
"""
N = 16


class Clock:
    """A Reporter noting when problems start running (actors ready) and when each finishes;
    ``stop_after`` raises KeyboardInterrupt from the k-th ``problem`` event (a Ctrl-C)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.t0: float | None = None
        self.ends: list[float] = []
        self.stop_after = stop_after

    def start(self, info: dict) -> None:
        self.t0 = time.perf_counter()
        self.info = info

    def problem(self, record: dict) -> None:
        self.ends.append(time.perf_counter())
        if self.stop_after is not None and len(self.ends) >= self.stop_after:
            raise KeyboardInterrupt

    def agent(self, *args, **kwargs) -> None:
        pass

    def status(self, **fields) -> None:
        pass

    def close(self) -> None:
        pass

    @property
    def makespan(self) -> float:
        return self.ends[-1] - self.t0


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def sim_ray():
    # logical CPUs: sim agents sleep, so 4 replicas + the judge fit on any machine. Ray started the way
    # `kvjudge run` starts it for simulated models: zero-copy torch serialization off in the workers
    # (Ray imports torch in every worker when it is on, see runtime/cluster.py)
    from kvjudge.runtime.cluster import connect

    assert connect(None, num_cpus=8, torch_tensors=False)
    yield
    ray.shutdown()


def test_replicas_and_problems_in_flight_speed_a_chain_up(sim_ray, tmp_path):
    topo = load_topology_text(CHAIN)
    problems = synthetic_problems(N)
    clock = Clock()
    counts = run(topo, problems, tmp_path / "serial", reporter=clock, concurrency=1, replicas=1)
    assert counts["done"] == N and counts["failed"] == 0
    serial = clock.makespan
    out = bench_run(topo, None, N, concurrency=8, replicas=4, out_dir=tmp_path / "scaled")
    for label in ("serial", "scaled"):
        ids = _ids(tmp_path / label / "results.jsonl")
        assert sorted(ids) == sorted(p["id"] for p in problems) and len(set(ids)) == N  # each exactly once
    assert out["replicas"] == {SIM: 4} and out["concurrency"] == 8 and out["done"] == N
    assert out["startup_s"] > 0.0  # reported apart: the makespan starts with the first problem
    # independent floor for the serial run: 16 problems x 4 requests x 0.1 s, one at a time
    assert serial >= N * 4 * 0.1
    assert serial >= 3.0 * out["makespan_s"], (serial, out["makespan_s"])
    # the bench's bound: 16 x 4 x 0.1 s of work over 4 replicas; one problem's chain is 4 x 0.1 s
    assert out["work_bound_s"] == pytest.approx(1.6) and out["critical_path_s"] == pytest.approx(0.4)
    assert out["lower_bound_s"] == pytest.approx(1.6) and out["makespan_s"] >= out["lower_bound_s"]
    assert out["ratio_to_bound"] == pytest.approx(out["makespan_s"] / 1.6)
    assert 0.0 < out["agent_utilisation"] <= 1.0
    # naive reuses: the judge fetched every candidate from the store, from where the agents made it
    assert out["store"]["judge_fetches"] == N * 4
    assert sum(out["store"]["bytes_read_by_node"].values()) > 0
    assert set(out["store"]["bytes_read_by_node"]) <= set(out["store"]["bytes_by_node"])


def test_resume_after_an_interrupt_loses_and_duplicates_nothing(sim_ray, tmp_path):
    topo = load_topology_text(CHAIN)
    problems = synthetic_problems(10)
    results = tmp_path / "results.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(topo, problems, tmp_path, reporter=Clock(stop_after=3), concurrency=4, replicas=1)
    first = results.read_text().splitlines()
    assert len(first) == 3  # what finished before the Ctrl-C stays, nothing else
    with pytest.raises(ValueError, match="--resume"):
        run(topo, problems, tmp_path, reporter=Clock(), concurrency=4, replicas=1)
    counts = run(topo, problems, tmp_path, reporter=Clock(), concurrency=4, replicas=1, resume=True)
    assert counts["skipped"] == 3 and counts["done"] == 7
    lines = results.read_text().splitlines()
    assert lines[:3] == first
    ids = _ids(results)
    assert sorted(ids) == sorted(p["id"] for p in problems) and len(set(ids)) == len(ids)


def test_lower_bound_formula_on_a_two_round_diamond():
    topo = load_topology_text(f"""
name: diamond
rounds: 2
defaults: {{model: "{SIM}"}}
agents:
  a: {{role: solver, prompt: "{{problem}}"}}
  b: {{role: solver, prompt: "{{problem}} {{previous}}"}}
  c: {{role: solver, prompt: "{{problem}} {{previous}}"}}
  d: {{role: solver, prompt: "{{problem}} {{previous}}"}}
edges: [{{source: a, target: b}}, {{source: a, target: c}}, {{source: b, target: d}}, {{source: c, target: d}}]
judge: {{method: naive}}
""")
    gen = {"a": 1.0, "b": 2.0, "c": 5.0, "d": 1.0}
    costs = {"gen": gen, "enc": {"a": 0.5, "b": 0.0, "c": 0.0, "d": 0.25}, "judge": 3.0, "per_replica": {SIM: 2.0}}
    b = lower_bound(topo, 10, costs, {SIM: 2})
    assert b["critical_path_s"] == pytest.approx((1 + 5 + 1) + (1.5 + 5 + 1.25) + 3)
    assert b["work_bound_s"] == pytest.approx(10 * (2 * 9 + 0.75) / (2 * 2))
    assert b["judge_bound_s"] == pytest.approx(30.0)
    assert b["lower_bound_s"] == pytest.approx(max(b["critical_path_s"], b["work_bound_s"], 30.0))


@ray.remote(num_cpus=0)
class _Producer:
    def put(self, key: str, n: int) -> int:
        store = ray.get_actor("scale-store", namespace="kvjudge")
        seg = KVSegment(torch.arange(n, dtype=torch.float32).view(1, 1, n // 8, 8),
                        -torch.arange(n, dtype=torch.float32).view(1, 1, n // 8, 8), 0, tuple(range(n // 8)))
        assert put_segment(store, key, seg, {"agent": "p"})
        return ray.get_runtime_context().get_node_id()


def _actor_heap(self) -> dict:
    """Run inside the store actor: what its directory holds, and its resident memory."""
    held = [v[0] for v in self._items.values()]
    tensors = sum(1 for v in held if isinstance(v, (KVSegment, torch.Tensor)))
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"tensors": tensors, "rss": rss, "types": sorted({type(v).__name__ for v in held})}


def test_store_keeps_refs_not_bytes_and_outlives_the_producer(sim_ray):
    store = get_or_create_store("scale-store", budget_bytes=1 << 30, namespace="kvjudge")
    try:
        n = (1 << 20) // 4 // 2  # keys + values = 1 MiB of fp32
        before = ray.get(store.__ray_call__.remote(_actor_heap))
        producer = _Producer.remote()
        node = ray.get(producer.put.remote("k0", n))
        for i in range(1, 32):  # 32 MiB in all through the store's directory
            ray.get(producer.put.remote(f"k{i}", n))
        entry = ray.get(store.get.remote("k0"))
        assert isinstance(entry, SegmentRef) and entry.nbytes == 1 << 20 and entry.node == node
        assert len(entry.refs) == 1 and isinstance(entry.refs[0], ray.ObjectRef)
        after = ray.get(store.__ray_call__.remote(_actor_heap))
        assert after["tensors"] == 0 and after["types"] == ["SegmentRef"]
        assert after["rss"] - before["rss"] < 8 << 20  # 32 MiB registered, far less resident in the actor
        stats = ray.get(store.stats.remote())
        assert stats["bytes_by_node"] == {node: 32 << 20}
        assert get_segment(store, "k31") is not None  # (the store's adoption of the last put is done)
        ray.kill(producer, no_restart=True)  # the store owns the segments: they outlive their producer
        time.sleep(0.5)
        seg = get_segment(store, "k31")
        assert seg is not None and seg.keys.shape == (1, 1, n // 8, 8)
        assert torch.equal(seg.values.flatten(), -torch.arange(n, dtype=torch.float32))
    finally:
        kill_store("scale-store", namespace="kvjudge")


def test_sim_actors_import_no_torch_in_their_workers(sim_ray):
    """A simulated agent and judge, as Ray actors, load neither torch nor transformers."""
    agent = AgentActor.options(num_cpus=0).remote(SIM, None, None)
    judge = JudgeActor.options(num_cpus=0).remote(SIM, "naive", {}, None, None)
    # a lambda travels by value (a function of this module would make the actor import it, and torch)
    heavy = lambda actor: sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers"})  # noqa: E731
    try:
        infos = ray.get([agent.ready.remote(), judge.ready.remote()], timeout=120)
        assert "error" not in infos[0] and infos[1]["device"] == "sim" and infos[1]["gpus"] == 0
        out = ray.get(agent.generate.remote({"agent": "a1", "prompt": "Solve: 1+1"}), timeout=60)
        assert out["tokens"] == 8
        assert ray.get(agent.__ray_call__.remote(heavy)) == []
        assert ray.get(judge.__ray_call__.remote(heavy)) == []
    finally:
        for actor in (agent, judge):
            ray.kill(actor, no_restart=True)


@ray.remote(num_cpus=0)
class _SlowStart:
    """An actor whose ``ready()`` answers once the file ``gate`` exists (at once without one), or says
    it failed to load."""

    def __init__(self, name: str, gate: str | None = None, error: str | None = None) -> None:
        self.name, self.gate, self.error = name, gate, error

    def ready(self) -> dict:
        while self.gate and not os.path.exists(self.gate):
            time.sleep(0.05)
        return {"error": self.error, "node": "n"} if self.error else {"node": "n", "node_id": self.name}


def test_replicas_take_work_as_soon_as_they_are_ready(sim_ray, tmp_path):
    """The run starts once the judge and one replica per model are up; a slow replica joins its pool
    when it is ready, and one that fails to start is left out while the others serve."""
    gate = tmp_path / "go"
    orch = Orchestrator(load_topology_text(CHAIN))
    actors = [_SlowStart.remote("r0"), _SlowStart.remote("r1", str(gate)), _SlowStart.remote("r2", error="no weights")]
    orch.judge = _SlowStart.remote("judge")
    orch.pools = {SIM: Replicas(actors, ready=[False] * 3)}
    pool = orch.pools[SIM]
    assert [v["state"] for v in pool.view()] == ["starting"] * 3
    assert orch._await_ready() == {"node": "n", "node_id": "judge"}  # r1 is still held back by its gate
    assert pool.ready[0] and not pool.ready[1] and pool.view()[1]["state"] == "starting"
    assert pool.pick() == 0  # only the ready replica gets work
    got: list[int] = []  # a second request waits for an idle replica while r1 is starting (no queue on r0)
    waiter = threading.Thread(target=lambda: got.append(pool.pick()), daemon=True)
    waiter.start()
    waiter.join(1.0)
    assert waiter.is_alive() and not got
    pool.release(0)
    waiter.join(10)
    assert got == [0]
    pool.release(0)
    gate.touch()
    deadline = time.monotonic() + 60
    while (not pool.ready[1] or pool.view()[2]["state"] != "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pool.ready == [True, True, False] and pool.node_ids[1] == "r1"
    assert pool.view()[2]["state"] == "failed" and pool.view()[2]["error"] == "no weights"
    assert sorted(pool.pick() for _ in range(4)) == [0, 0, 1, 1]  # least-loaded over the ready two


def test_a_first_replica_that_fails_is_one_run_error(sim_ray):
    orch = Orchestrator(load_topology_text(CHAIN))
    orch.judge = _SlowStart.remote("judge")
    orch.pools = {SIM: Replicas([_SlowStart.remote("r0", error="cannot load")], ready=[False])}
    with pytest.raises(ValueError, match="agent model .* replica 1 failed to load on node n: cannot load"):
        orch._await_ready()


def test_a_request_waits_for_a_replica_coming_up_rather_than_queue_on_a_busy_one():
    """Pure (no Ray): while a replica is starting, a second request goes to it once it is ready, not
    behind the first request on the only ready replica; a stopped run ends the wait (Halted)."""
    pool = Replicas(["r0", "r1"], ready=[True, False])
    assert pool.pick() == 0
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(pool.pick()), daemon=True)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()
    pool.mark_ready(1, {"node": "n"})
    waiter.join(5)
    assert got == [1] and pool.load == [1, 1]
    busy = Replicas(["r0", "r1"], ready=[True, False])
    busy.pick()
    halt = threading.Event()
    halt.set()
    with pytest.raises(Halted):
        busy.pick(halt)
    busy.mark_failed(1, "no weights")  # nothing starting any more: least-loaded, queueing allowed
    assert busy.pick() == 0 and busy.load == [2, 0]
