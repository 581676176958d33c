"""`kvjudge run --address` against a separately started `ray start --head` cluster (multi-process)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOPOLOGY = """
name: cluster-smoke
defaults: {model: tiny-llama, max_new_tokens: 8}
agents:
  a: {role: solver, prompt: "Solve: {problem}"}
  b: {role: solver, prompt: "Answer briefly: {problem}"}
edges: []
judge: {method: naive}
resources: {judge_resource: judge}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_against_a_ray_start_head_cluster(tmp_path):
    """A separately started multi-process cluster with a custom `judge` resource, joined by address."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="kvjr-", dir="/tmp")  # short: Ray's socket paths have a length limit
    start = [ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
             '--resources={"judge": 1}', "--include-dashboard=false", "--disable-usage-stats",
             f"--temp-dir={temp_dir}", "--block"]
    # a loopback test cluster: Ray's token authentication off for it and for its clients
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # --block keeps the cluster's processes under our process group: we stop exactly this cluster
    head = subprocess.Popen(start, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env)
    try:
        status = [ray_cli, "status", f"--address=127.0.0.1:{port}"]
        deadline = time.time() + 90
        while subprocess.run(status, capture_output=True, timeout=60, env=env).returncode != 0:
            assert time.time() < deadline and head.poll() is None, "ray start --head did not come up"
            time.sleep(2)
        topo_file = tmp_path / "topo.yaml"
        topo_file.write_text(TOPOLOGY)
        probs = tmp_path / "p.jsonl"
        probs.write_text('{"id": "q1", "prompt": "What is 2 + 2?"}\n{"id": "q2", "prompt": "Name a prime."}\n')
        out = tmp_path / "out"
        proc = subprocess.run(
            [sys.executable, "-m", "kvjudge.app.cli", "run", str(topo_file), "--problems", str(probs),
             "--address", f"127.0.0.1:{port}", "--out", str(out), "--no-dashboard"],
            capture_output=True, text=True, timeout=300, env=env,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert sorted((r["id"], r["status"]) for r in records) == [("q1", "ok"), ("q2", "ok")]  # in order of completion
        assert all(r["verdict"]["reused"] for r in records)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        # anything the cluster daemonised out of our group still names its temp dir
        subprocess.run(["pkill", "-9", "-f", temp_dir], capture_output=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


# a sim agent's candidate segment: 16 tokens x 4 layers x 8 heads x 64 dims x fp32, keys + values = 256 KiB,
# above the store's adoption threshold, so the bytes stay in the producing node's object store
SIM_KV = "sim:tokens_per_s=160,answer_tokens=16,kv_layers=4,kv_heads=8,head_dim=64"
SPREAD = f"""
name: spread
defaults: {{model: "{SIM_KV}", max_new_tokens: 32}}
agents:
  a1: {{role: solver, prompt: "Solve: {{problem}}"}}
  a2: {{role: refiner, prompt: "Improve: {{previous}} for {{problem}}"}}
edges: [{{source: a1, target: a2}}]
judge: {{method: naive}}
resources: {{judge_resource: judge, agent_replicas: 4}}
"""


def _ray_node(ray_cli: str, env: dict, temp_dir: str, *args: str) -> subprocess.Popen:
    """``ray start --block`` in its own process group (stopped by :func:`_stop`)."""
    cmd = [ray_cli, "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           "--block", *args]
    log = open(Path(temp_dir) / f"start-{len(os.listdir(temp_dir))}.log", "w")  # noqa: SIM115 (closed with the dir)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _logs(temp_dir: str) -> str:
    return "\n".join(p.read_text()[-800:] for p in sorted(Path(temp_dir).glob("start-*.log")))


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):  # workers first, the head last
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    for p in reversed(procs):
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def test_replicas_spread_over_nodes_and_the_judge_reads_kv_where_it_was_made(tmp_path, monkeypatch):
    """Head (1 CPU, the `judge` resource) + two worker nodes (2 CPUs each) on loopback: 4 agent replicas
    cannot fit on one node, the judge is pinned to the head, and every candidate segment stays on the
    worker node that made it, from where the judge reads it."""
    import ray

    from kvjudge.topologies import load_topology_text
    from kvjudge.runtime.cluster import NAMESPACE
    from kvjudge.runtime.runner import run

    ray_cli = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="kvjm-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    assert os.environ.get("RAY_AUTH_MODE") == "disabled"  # conftest: this process is a client too
    procs = [_ray_node(ray_cli, env, temp_dir, "--head", f"--port={port}", "--num-cpus=1",
                       '--resources={"judge": 1}', "--include-dashboard=false")]
    address = f"127.0.0.1:{port}"
    try:
        status = [ray_cli, "status", f"--address={address}"]
        deadline = time.time() + 90
        while subprocess.run(status, capture_output=True, timeout=60, env=env).returncode != 0:
            assert time.time() < deadline and procs[0].poll() is None, "ray start --head did not come up"
            time.sleep(2)
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
        try:
            for count in (2, 3):  # one at a time: two nodes starting together on one host can trip each other
                procs.append(_ray_node(ray_cli, env, temp_dir, f"--address={address}", "--num-cpus=2",
                                       '--resources={"agents": 2}'))
                deadline = time.time() + 120
                while len([n for n in ray.nodes() if n["Alive"]]) < count:
                    assert time.time() < deadline and procs[-1].poll() is None, \
                        f"a worker node did not join: {_logs(temp_dir)}"
                    time.sleep(1)
            nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
            head = next(i for i, r in nodes.items() if r.get("judge"))
            workers = {i for i, r in nodes.items() if r.get("agents")}
            assert len(workers) == 2 and head not in workers

            class Start:
                info: dict = {}
                replicas: dict = {}  # the last status: replicas that came up after the run started are in it

                def start(self, info):
                    Start.info = info

                def status(self, **kw):
                    Start.replicas = kw.get("replicas", Start.replicas)

                def __getattr__(self, name):
                    return lambda *a, **k: None

            problems = [{"id": f"q{i}", "prompt": f"What is {i} + {i}?"} for i in range(8)]
            # every replica up before the first problem (as bench run does): on a loaded machine the second
            # worker's replicas can still be starting when the first two have finished all 8 problems
            counts = run(load_topology_text(SPREAD), problems, tmp_path, reporter=Start(), concurrency=8,
                         wait_all_replicas=True)
        finally:
            ray.shutdown()
        assert counts["done"] == 8 and counts["failed"] == 0
        replica_nodes = [r["node_id"] for r in Start.replicas[SIM_KV]]
        assert len(replica_nodes) == 4 and set(replica_nodes) == workers  # spread: both workers, never the head
        records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
        assert sorted(r["id"] for r in records) == sorted(p["id"] for p in problems)
        assert all(r["verdict"]["store_fetched"] == 2 for r in records)  # both candidates came from the store
        store = max((r["store"] for r in records), key=lambda s: s["hits"])
        seg = 2 * 16 * 4 * 8 * 64 * 4
        # bytes live on the agent nodes that made them, and the judge (on the head) read them from there
        assert set(store["bytes_by_node"]) <= workers and sum(store["bytes_by_node"].values()) == 16 * seg
        assert set(store["bytes_read_by_node"]) <= workers and sum(store["bytes_read_by_node"].values()) == 16 * seg
        assert len(store["bytes_by_node"]) == 2  # both workers produced segments
    finally:
        _stop(procs)
        subprocess.run(["pkill", "-9", "-f", temp_dir], capture_output=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
