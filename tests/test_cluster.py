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
        assert [(r["id"], r["status"]) for r in records] == [("q1", "ok"), ("q2", "ok")]
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
