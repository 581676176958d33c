"""Hostile inputs and faults around a run: one-line errors, no traceback, nothing finished lost."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from kvjudge.app.cli import main, read_text
from kvjudge.judges.actor import _JudgeActorImpl
from kvjudge.topologies import load_topology_text
from kvjudge.runtime.cluster import ClusterError, connect
from kvjudge.runtime.results import ResultsError, ResultsLog
from kvjudge.runtime.runner import Orchestrator, RunError

from helpers import small_topology

SMALL = small_topology(max_new_tokens=6, method="naive")


def _cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvjudge.app.cli", *argv], capture_output=True, text=True,
                          timeout=timeout)


def _one_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=3, namespace="kvjudge", include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# ---------------------------------------------------------------- results files
def test_second_run_into_the_same_folder_is_refused(tmp_path, capsys):
    with ResultsLog(tmp_path / "results.jsonl"):
        assert main(["run", "progressive_refinement", "--model", "tiny-llama", "--problems", "humaneval",
                     "--limit", "1", "--out", str(tmp_path), "--no-dashboard"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another kvjudge run is writing to" in err[0]


def test_out_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    _one_line(_cli("run", "progressive_refinement", "--model", "tiny-llama", "--limit", "1", "--out", str(f)),
              "is not a folder")


def test_disk_full_keeps_what_was_written(tmp_path, monkeypatch):
    log = ResultsLog(tmp_path / "results.jsonl", key=lambda r: r["id"])
    log.append({"id": "p1", "status": "ok"})
    real_open = Path.open

    def full(self, mode="r", *args, **kwargs):
        if mode == "a" and self.name == "results.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(ResultsError, match="no space left on device; records written so far are kept"):
        log.append({"id": "p2", "status": "ok"})
    monkeypatch.undo()
    log.close()
    assert [json.loads(x)["id"] for x in (tmp_path / "results.jsonl").read_text().splitlines()] == ["p1"]


def test_at_file_reads_regular_files_only(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        read_text("@/dev/zero")
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * ((1 << 20) + 1))
    with pytest.raises(ValueError, match="larger than 1 MiB"):
        read_text(f"@{big}")
    _one_line(_cli("judge", "--problem", "p", "--candidate", "@/dev/zero"), "not a regular file")


def test_eval_refuses_to_run_generated_code_without_isolation(tmp_path):
    env = {**os.environ, "KVJUDGE_SANDBOX_ISOLATION": "none"}
    proc = subprocess.run([sys.executable, "-m", "kvjudge.app.cli", "eval", "humaneval", "--model", "tiny-llama",
                           "--limit", "1", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=120, env=env)
    _one_line(proc, "no sandbox isolation available")
    assert not (tmp_path / "o" / "generation").exists()  # refused before any work


# ---------------------------------------------------------------- the cluster
def test_unreachable_address_fails_fast(tmp_path):
    if ray.is_initialized():
        pytest.skip("Ray is already connected in this process")
    t0 = time.time()
    with pytest.raises(ClusterError, match="cannot connect to the Ray cluster at '127.0.0.1:1'"):
        connect("127.0.0.1:1")
    assert time.time() - t0 < 15 and not ray.is_initialized()
    _one_line(_cli("run", "progressive_refinement", "--model", "tiny-llama", "--limit", "1",
                   "--address", "127.0.0.1:1", "--out", str(tmp_path / "o")), "cannot connect to the Ray cluster")


def test_infeasible_resources_name_the_resource(local_ray):
    topo = load_topology_text(SMALL + "resources: {agent_num_cpus: 1000}\n")
    orch = Orchestrator(topo)
    t0 = time.time()
    try:
        with pytest.raises(RunError, match=r"needs CPU=1000 on one node, but the largest node has CPU=3"):
            orch.start()
    finally:
        orch.stop()
    assert time.time() - t0 < 30


def test_lost_store_costs_only_speed(local_ray):
    """The store actor dies mid-run: it comes back empty, the judge re-encodes, problems still succeed."""
    orch = Orchestrator(load_topology_text(SMALL))
    orch.start()
    try:
        first = orch.run_problem({"id": "p1", "prompt": "What is 2 + 2?"})
        assert first["status"] == "ok" and first["verdict"]["store_fetched"] == 2
        ray.kill(orch.store, no_restart=False)
        second = orch.run_problem({"id": "p2", "prompt": "Name a prime number."})
        assert second["status"] == "ok", second.get("error")
        assert orch.store_restarts >= 1
    finally:
        orch.stop()


def test_prompt_longer_than_the_context_is_a_failed_record(local_ray):
    orch = Orchestrator(load_topology_text(SMALL))
    orch.start()
    try:
        rec = orch.run_problem({"id": "huge", "prompt": "word " * 5000})  # > tiny-llama's 8192 positions
        assert rec["status"] == "failed" and "more than the model's 8192 positions" in rec["error"]
    finally:
        orch.stop()


def test_judge_refuses_more_candidates_than_its_labels():
    actor = _JudgeActorImpl("tiny-llama", "dense", {}, None, None)
    assert actor.check_candidates("p", 9) is None
    assert "too many candidates: 10 given" in actor.check_candidates("p", 10)
