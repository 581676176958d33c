"""The live dashboard: pure rendering at 80 and 140 columns, the LiveReporter's snapshot, the
metrics actor with ``kvjudge dashboard``, and one real ``kvjudge run`` inside a pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest
from rich.cells import cell_len
from rich.console import Console

from kvjudge.app.dashboard import LiveReporter, fmt_bytes, fmt_duration, plain_line, render
from kvjudge.app.watch import watch
from kvjudge.app.reporters import PlainReporter
from kvjudge.runtime.telemetry import METRICS_NAMESPACE, MetricsPublisher, Snapshot, SnapshotTracker

T0 = 1_700_000_000.0
STORE = {"entries": 12, "bytes": 150 * 1024 * 1024, "budget_bytes": 1024 ** 3, "hits": 20, "misses": 4,
         "evictions": 1, "puts": 16, "rejected": 0}
LEFT, RIGHT = "╭│╰", "╮│╯"


def info(agents, method="dg_jkr", total=10):
    agents = list(agents)
    return {"name": "progressive_refinement", "total": total, "agents": agents, "method": method,
            "judge_node": "cpu", "model": "tiny-llama", "edges": [[a, b] for a, b in zip(agents, agents[1:])],
            "replicas": {"tiny-llama": [{"node": "10.0.0.1", "state": "busy", "in_flight": 2,
                                         "tokens_per_s": 31.5, "batch": 3}]}}


def ok(pid, agreed=True, store=STORE, winner=2, method="dg_jkr", decision=None, gate=...):
    if gate is ...:
        gate = ("accepted" if agreed else "fallback") if method in ("dg_jkr", "random_gate") else None
    return {"id": pid, "status": "ok", "store": dict(store), "winner_agent": f"a{winner}",
            "verdict": {"method": method, "winner": winner, "reused": agreed, "latency_ms": 700.0,
                        "decision": decision if decision is not None else {"agreed": agreed}, "gate": gate}}


def feed(tracker, n_agents=4, failed_agent=None, problems=3, store=STORE, method="dg_jkr", total=10):
    names = [f"a{i}" for i in range(1, n_agents + 1)]
    tracker.start(info(names, method, total))
    for a in names:
        tracker.agent(a, "generating", round=1)
        tracker.agent(a, "done", tokens=128, tokens_per_s=64.0)
    for k in range(problems):
        tracker.problem(ok(f"HumanEval/{k}", agreed=k != 1, store=store))
    if failed_agent:
        tracker.agent(failed_agent, "failed")
    tracker.agent(names[-1], "generating", round=1)


def snapshot(**kw) -> Snapshot:
    t = SnapshotTracker()
    feed(t, **kw)
    t.status(in_flight=kw.get("problems", 3) and 2)
    s = t.snapshot
    s.started_at, s.updated_at = T0, T0 + 30
    return s


def text_at(s: Snapshot, width: int) -> list[str]:
    console = Console(width=width, record=True, color_system=None, file=io.StringIO())
    console.print(render(s, width, now=s.updated_at))
    return console.export_text().rstrip("\n").split("\n")


def _cells(line: str) -> list[str]:
    """The line as one entry per terminal cell (a wide character fills two)."""
    cells: list[str] = []
    for ch in line:
        cells += [ch] + [""] * (cell_len(ch) - 1)
    return cells


def check_frame(lines: list[str], width: int) -> None:
    """No line wider than ``width``; each box's sides stay in the columns of its corners."""
    assert lines
    for line in lines:
        assert cell_len(line) <= width, f"{cell_len(line)} > {width}: {line!r}"
        body = line.rstrip()
        assert body[0] in LEFT and body[-1] in RIGHT, f"broken frame: {line!r}"
    assert any(cell_len(line.rstrip()) == width for line in lines), "nothing spans the full width"
    grid = [_cells(line) + [" "] * (width - cell_len(line)) for line in lines]
    boxes = 0
    for i, row in enumerate(grid):
        for c, ch in enumerate(row):
            if ch != "╭":
                continue
            d = row.index("╮", c)
            bottom = next(k for k in range(i + 1, len(grid)) if grid[k][c] == "╰")
            assert grid[bottom][d] == "╯", f"box at line {i} col {c}: bottom corner not at col {d}"
            for k in range(i + 1, bottom):
                assert grid[k][c] == "│" and grid[k][d] == "│", f"box side moved: {lines[k]!r}"
            boxes += 1
    assert boxes >= 4


@pytest.mark.parametrize("width", [80, 140])
def test_few_agents(width):
    s = snapshot()
    lines = text_at(s, width)
    check_frame(lines, width)
    text = "\n".join(lines)
    for title in ("agents", "KV store", "judge", "progress", "cluster", "2 problem(s) in flight"):
        assert title in text
    for agent in ("a1", "a2", "a3", "a4"):
        assert re.search(rf"\b{agent}\b", text)
    assert "generating" in text and "done" in text
    assert "150.0 MiB / 1.0 GiB (15%)" in text and "entries 12" in text and "hits 20/24 (83%)" in text
    assert "reuse accepted 2" in text and "dense fallback 1" in text and "700 ms" in text
    assert "3/10" in text and "elapsed 00:30" in text and "ETA 01:10" in text
    assert "10.0.0.1" in text and "31.5" in text  # the replica row: node and tokens/s
    assert re.search(r"\ba2\b\s+a1\b", text)  # a2 is fed by a1
    assert "+" not in text  # nothing hidden


@pytest.mark.parametrize("width", [80, 140])
def test_many_agents_do_not_overflow(width):
    s = snapshot(n_agents=30, failed_agent="a17")
    lines = text_at(s, width)
    check_frame(lines, width)
    text = "\n".join(lines)
    assert "+19 more" in text  # 12 rows: 11 agents and the "+N more" line
    assert re.search(r"\ba17\b.*failed", text), "a failed agent is never hidden"
    assert re.search(r"\ba30\b.*generating", text), "a busy agent is never hidden"
    assert len(lines) < 45
    assert "failed" in text and "1 failed" in text


@pytest.mark.parametrize("width", [80, 140])
def test_failed_agent_and_problem(width):
    t = SnapshotTracker()
    feed(t, failed_agent="a2", problems=1)
    t.problem({"id": "HumanEval/1", "status": "failed", "error": "RayActorError: the actor died " + "x" * 300})
    s = t.snapshot
    s.started_at, s.updated_at = T0, T0 + 10
    lines = text_at(s, width)
    check_frame(lines, width)
    text = "\n".join(lines)
    assert re.search(r"\ba2\b.*failed", text)
    assert "failed 1" in text and "last failure: RayActorError" in text and "…" in text
    assert "HumanEval/1 (failed)" in text


@pytest.mark.parametrize("width", [80, 140])
def test_empty_store_and_no_problem_yet(width):
    t = SnapshotTracker()
    t.start(info(["solver", "critic"], method="random_gate", total=0))
    s = t.snapshot
    lines = text_at(s, width)
    check_frame(lines, width)
    text = "\n".join(lines)
    assert "empty" in text and "0 B / no budget" in text
    assert "accepted 0" in text and "dense fallback 0" in text
    assert "solver" in text and "critic" in text and "waiting" in text and "ETA --:--" in text


def test_narrow_console_keeps_the_frame():
    s = snapshot(n_agents=6)
    check_frame(text_at(s, 60), 60)


def test_gate_counters_per_method():
    t = SnapshotTracker()
    t.start(info(["a1"], method="random_gate"))
    for acc in (True, True, False):
        t.problem(ok("p", method="random_gate", decision={"accepted": acc}, agreed=acc))
    assert (t.snapshot.judge.accepted, t.snapshot.judge.dense_fallback, t.snapshot.judge.gated) == (2, 1, 3)
    t = SnapshotTracker()
    t.start(info(["a1"], method="kvcomm"))
    t.problem(ok("p", method="kvcomm", decision={"new_anchors": 3}))
    t.problem(ok("q", method="kvcomm", decision={"new_anchors": 0}))
    assert t.snapshot.judge.new_anchors == 3
    assert "new anchors 3" in "\n".join(text_at(t.snapshot, 80))


def test_snapshot_round_trips_through_a_dict():
    s = snapshot()
    back = Snapshot.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and back.judge.mean_latency_ms == 700.0


def test_formatters():
    assert fmt_bytes(0) == "0 B" and fmt_bytes(1536) == "1.5 KiB" and fmt_bytes(3 * 1024 ** 3) == "3.0 GiB"
    assert fmt_duration(None) == "--:--" and fmt_duration(75) == "01:15" and fmt_duration(3700) == "1:01:40"


def test_live_reporter_final_snapshot():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, height=40, color_system="truecolor")
    rep = LiveReporter(console=console, refresh_per_second=20)
    rep.start(info(["a1", "a2", "a3"], total=3))
    rep.agent("a1", "generating", round=1)
    rep.agent("a1", "done", tokens=100, tokens_per_s=50.0)
    rep.agent("a2", "generating", round=1)
    rep.agent("a2", "failed")
    rep.problem({"id": "p0", "status": "failed", "error": "boom"})
    for a in ("a1", "a2", "a3"):
        rep.agent(a, "waiting")
    for pid in ("p1", "p2"):
        for a in ("a1", "a2", "a3"):
            rep.agent(a, "generating", round=1)
            rep.agent(a, "done", tokens=10, tokens_per_s=20.0)
        rep.problem(ok(pid, agreed=pid == "p1", winner=3))
    time.sleep(0.15)
    rep.close()
    s = rep.snapshot
    assert s.finished and (s.done, s.failed, s.total) == (2, 1, 3)
    assert {a: st.state for a, st in s.agents.items()} == {"a1": "done", "a2": "done", "a3": "done"}
    assert s.agents["a1"].total_tokens == 120 and s.agents["a3"].tokens_per_s == 20.0
    assert (s.judge.accepted, s.judge.dense_fallback, s.judge.current, s.judge.last_winner) == (1, 1, "p2", "a3")
    assert s.store["entries"] == 12 and s.last_error == "boom"
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "finished" in screen and "progress" in screen and "3/3" in screen


def test_publisher_forwards_without_ray():
    buf = io.StringIO()
    pub = MetricsPublisher(PlainReporter(stream=buf), enabled=False)
    pub.start(info(["a1"], total=1))
    pub.agent("a1", "done", tokens=5, tokens_per_s=1.0)
    pub.problem(ok("p0", winner=1))
    pub.close()
    assert pub.actor is None and pub.snapshot.finished and pub.snapshot.done == 1
    assert "[1/1] p0: winner #1 (a1)" in buf.getvalue()


def test_watch_plain_and_live(capsys):
    s1, s2 = snapshot(), snapshot()
    s2.finished = True
    seq = iter([None, s1, s2])
    assert watch(lambda: next(seq), Console(file=io.StringIO()), 0.001, live=False) == "the run finished"
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("waiting") and "3/10 (3 ok, 0 failed)" in out[1] and "finished" in out[2]
    assert len(out) == 3
    seq = iter([s1, s2])
    buf = io.StringIO()
    assert watch(lambda: next(seq), Console(file=buf, force_terminal=True, width=90), 0.001, live=True) == "the run finished"
    assert "KV store" in buf.getvalue()
    assert "store 12 entries 150.0 MiB/1.0 GiB" in plain_line(s1)


def test_dashboard_module_is_pure_drawing():
    import ast
    from pathlib import Path

    import kvjudge.app.dashboard as dashboard

    tree = ast.parse(Path(dashboard.__file__).read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "ray" not in imported and not hasattr(dashboard, "connect_run")


def test_bench_run_table_rows():
    from kvjudge.app.render import bench_run_table

    result = {"topology": "chain", "model": "sim:tokens_per_s=80", "problems": 4, "done": 3, "failed": 1,
              "replicas": {"sim:tokens_per_s=80": 2}, "concurrency": 4, "startup_s": 0.5, "makespan_s": 2.0,
              "lower_bound_s": 1.6, "critical_path_s": 0.4, "work_bound_s": 1.6, "judge_bound_s": 0.0,
              "ratio_to_bound": 1.25, "throughput_per_s": 1.5, "agent_utilisation": 0.8, "mean_batch": 1.0,
              "bound_from": "sim spec", "store": {"bytes_by_node": {"abcdef0123456789": 3 * 2**20},
                                                  "bytes_read_by_node": {}, "judge_fetches": 12}}
    buf = io.StringIO()
    Console(file=buf, width=200).print(bench_run_table(result))
    text = buf.getvalue()
    assert "bench run chain on sim:tokens_per_s=80" in text and "3 ok / 4 (1 failed)" in text
    assert "1.25x" in text and "abcdef01: 3.00 MiB" in text and "80% (mean batch 1.0)" in text


def test_dashboard_bad_interval(capsys):
    from kvjudge.app.cli import main

    assert main(["dashboard", "--interval", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kvjudge dashboard: error: --interval must be > 0, got 0.0"]


def test_dashboard_unreachable_cluster_fails_fast(capsys):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is already connected in this process")
    from kvjudge.app.cli import main

    t0 = time.time()
    assert main(["dashboard", "--address", "ray://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvjudge dashboard: error: cannot connect to the Ray cluster at")
    assert time.time() - t0 < 30 and not ray.is_initialized()


# ---------------------------------------------------------------------------- with Ray
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=1, namespace=METRICS_NAMESPACE, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
    yield ray
    if started:
        ray.shutdown()


def test_metrics_actor_and_dashboard_command(local_ray, capsys):
    from kvjudge.app.cli import main
    from kvjudge.runtime.telemetry import find_metrics_actor

    old = find_metrics_actor()
    if old is not None:
        local_ray.kill(old)
        time.sleep(0.5)
    assert main(["dashboard", "--address", "auto", "--interval", "0.05"]) == 2
    assert capsys.readouterr().err.strip() == "kvjudge dashboard: error: no kvjudge run is publishing on this cluster"

    pub = MetricsPublisher(PlainReporter(stream=io.StringIO()))
    pub.start(info(["a1", "a2"], total=2))
    pub.agent("a1", "generating", round=1)
    pub.problem(ok("p0", winner=1))
    actor = find_metrics_actor()
    assert actor is not None
    deadline = time.time() + 30
    while (local_ray.get(actor.latest.remote()) or {}).get("done") != 1:
        assert time.time() < deadline
        time.sleep(0.05)
    latest = Snapshot.from_dict(local_ray.get(actor.latest.remote()))
    assert latest.agents["a1"].state == "generating" and not latest.finished
    pub.close()
    assert Snapshot.from_dict(local_ray.get(actor.latest.remote())).finished

    assert main(["dashboard", "--address", "auto", "--interval", "0.05"]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and "progressive_refinement: 1/2 (1 ok, 0 failed), finished" in out
    assert "the run finished" in err
    local_ray.kill(actor)


# ---------------------------------------------------------------------------- end to end
def _read_pty(master: int, proc: subprocess.Popen, timeout: float) -> bytes:
    buf = bytearray()
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            buf += chunk
        elif proc.poll() is not None:
            break
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        pytest.fail(f"kvjudge run did not finish in {timeout:.0f} s; screen so far:\n{buf.decode(errors='replace')[-3000:]}")
    proc.wait(timeout=60)
    return bytes(buf)


def test_run_in_a_terminal_shows_the_dashboard(tmp_path):
    import fcntl
    import struct
    import termios

    out = tmp_path / "run"
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    # RAY_ADDRESS=local: a private embedded Ray even when this machine also runs a `ray start` cluster
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "40", "RAY_ADDRESS": "local"}
    for var in ("NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "kvjudge.app.cli", "run", "progressive_refinement", "--model", "tiny-llama",
           "--limit", "1", "--problems", "humaneval", "--out", str(out)]
    try:
        proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    finally:
        os.close(slave)
    try:
        raw = _read_pty(master, proc, timeout=180)
    finally:
        os.close(master)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", raw.decode("utf-8", errors="replace"))
    assert proc.returncode == 0, screen[-3000:]
    assert "\x1b[" in raw.decode("utf-8", errors="replace"), "no terminal control codes: not the live dashboard"
    for title in ("agents · progressive_refinement", "KV store", "judge", "progress"):
        assert title in screen, screen[-3000:]
    for agent in ("a1", "a2", "a3", "a4"):
        assert re.search(rf"\b{agent}\b", screen)
    assert "finished" in screen and "1/1" in screen and "dg_jkr" in screen
    assert "1 done, 0 failed, 0 skipped" in screen
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["status"] == "ok"


def test_render_without_width_adapts_to_the_console():
    s = snapshot()
    for width, side_by_side in ((80, False), (140, True)):
        console = Console(width=width, record=True, color_system=None, file=io.StringIO())
        console.print(render(s, now=s.updated_at))
        lines = console.export_text().rstrip("\n").split("\n")
        check_frame(lines, width)
        assert ("KV store" in lines[0]) is side_by_side
