"""``kvjudge bench run``: how close a run of a topology comes to the best the cluster could do.

:func:`bench_run` runs a topology on ``problems`` (a number makes that many synthetic
``{"id", "prompt"}`` problems) into a temporary folder, on the embedded Ray or ``address``, and
compares the measured **makespan** (first problem submitted -> last record written) with the
**lower bound** of :mod:`kvjudge.topologies.bound`::

    lower_bound = max(critical_path, max_m(agent_work_m / capacity_m), judge_work)

For ``sim:...`` models the costs come from the spec (:func:`~kvjudge.topologies.bound.sim_costs`);
for real models they are measured in the run itself (:func:`~kvjudge.topologies.bound.measured_costs`:
``t_a`` is the mean replica time a request of ``a`` took, its batch's seconds over the batch size, the
judge call the mean verdict latency); the bound is then an estimate, not a guarantee.

**Start-up** (``startup_s``) is reported apart: from the call to the first problem submitted (Ray up,
the store, the judge and every replica ready). Unlike ``kvjudge run``, which sends work to each replica
as soon as it is up, the bench starts problems once all replicas are, so the makespan is measured at
the capacity the bound assumes.

Agent utilisation is the replica time spent generating (sum over requests of batch seconds / batch
size, from the records) over ``makespan x replicas``. Store figures come from the store's own stats
in the last record: ``bytes_by_node`` (where stored segment bytes live, by producing node id) and
``bytes_read_by_node`` (bytes handed out as refs, i.e. moved from that node to a reader, the judge).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from kvjudge.experiments.datasets import load_problems
from kvjudge.runtime.runner import default_concurrency, run
from kvjudge.runtime.telemetry import Reporter
from kvjudge.topologies import load_topology, resolve_topology
from kvjudge.topologies.bound import lower_bound, measured_costs, sim_costs
from kvjudge.topologies.schema import Topology


class _Timing:
    """A Reporter that forwards to ``inner`` (if any) and notes when problems start and finish."""

    def __init__(self, inner: Reporter | None) -> None:
        self.inner = inner
        self.started: float | None = None
        self.finished: list[float] = []
        self.info: dict = {}
        self.replicas: dict = {}

    def start(self, info: dict) -> None:
        self.started = time.perf_counter()
        self.info = dict(info)
        self.replicas = info.get("replicas", {}) or {}
        self._forward("start", info)

    def status(self, **fields: Any) -> None:
        if fields.get("replicas"):
            self.replicas = fields["replicas"]
        self._forward("status", **fields)

    def problem(self, record: dict) -> None:
        self.finished.append(time.perf_counter())
        self._forward("problem", record)

    def agent(self, agent: str, state: str, **stats: Any) -> None:
        self._forward("agent", agent, state, **stats)

    def close(self) -> None:
        self._forward("close")

    def _forward(self, name: str, *args: Any, **kwargs: Any) -> None:
        fn = getattr(self.inner, name, None) if self.inner is not None else None
        if fn is not None:
            fn(*args, **kwargs)


def synthetic_problems(n: int) -> list[dict]:
    """``n`` distinct small arithmetic problems ``{"id": "s0000", "prompt": ...}``."""
    if n < 1:
        raise ValueError(f"--problems must be a positive number, a dataset or a file, not {n}")
    return [{"id": f"s{i:04d}", "prompt": f"Problem {i}: what is {i} + {(7 * i) % 13}? Answer with a number."}
            for i in range(n)]


def _topology(topology: str | Path | Topology, model: str | None) -> Topology:
    topo = topology if isinstance(topology, Topology) else load_topology(resolve_topology(topology))
    return topo.with_overrides(model=model)


def _store_figures(records: list[dict]) -> dict:
    last = next((r["store"] for r in reversed(records) if r.get("store")), {})
    return {
        "bytes_by_node": dict(last.get("bytes_by_node", {})),
        "bytes_read_by_node": dict(last.get("bytes_read_by_node", {})),
        "entries": int(last.get("entries", 0)),
        "hits": int(last.get("hits", 0)),
        "judge_fetches": sum(int(r.get("verdict", {}).get("store_fetched", 0) or 0) for r in records),
    }


def bench_run(topology: str | Path | Topology, model: str | None = None, problems: int | str = 32, *,
              concurrency: int | None = None, replicas: int | str | None = None, address: str | None = None,
              progress: Reporter | None = None, limit: int | None = None, out_dir: str | Path | None = None) -> dict:
    """Run ``topology`` on ``problems`` and compare its makespan with the lower bound.

    ``problems``: a number (that many synthetic problems), a dataset name or a JSONL file
    (``limit`` keeps the first N). ``replicas``/``concurrency``: as ``kvjudge run`` (``None``: the
    topology's ``agent_replicas`` / enough to keep every replica busy). ``progress``: a Reporter that
    sees the run's events; ``out_dir``: where ``results.jsonl`` goes (a new folder; default a temporary
    one, removed afterwards). Returns a JSON-able dict with ``makespan_s``, ``lower_bound_s``,
    ``startup_s`` (call to first problem submitted, every replica up), ``ratio_to_bound``,
    ``throughput_per_s``, ``agent_utilisation``, ``store`` and the bound's parts.
    """
    topo = _topology(topology, model)
    if isinstance(problems, int) or (isinstance(problems, str) and problems.isdigit()):
        items = synthetic_problems(int(problems))
        if limit is not None:
            items = items[:limit]
    else:
        items = load_problems(str(problems), limit=limit)
    timing = _Timing(progress)
    called = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvjudge-bench-") as tmp:
        counts = run(topo, items, Path(out_dir or tmp), model=None, address=address, reporter=timing,
                     concurrency=concurrency, replicas=replicas, wait_all_replicas=True)
        path = Path(counts["results"])
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
            if path.exists() else []
    if timing.started is None or not timing.finished:
        raise ValueError("the run finished no problem: nothing to measure")
    makespan = timing.finished[-1] - timing.started
    ok = [r for r in records if r.get("status") == "ok"]
    n_replicas = {m: len(v) for m, v in (timing.replicas or {}).items()}
    total_replicas = sum(n_replicas.values()) or 1
    from_spec = sim_costs(topo, items)
    costs = from_spec or measured_costs(topo, ok)
    bound = lower_bound(topo, len(items), costs, n_replicas)
    busy = sum(float(c.get("seconds", 0.0)) / max(1, int(c.get("batch_size", 1) or 1))
               for r in ok for c in r.get("candidates", [])) * int(topo.rounds)
    batches = [int(c.get("batch_size", 1) or 1) for r in ok for c in r.get("candidates", [])]
    return {
        "topology": topo.name,
        "model": topo.defaults.model,
        "problems": len(items),
        "done": counts["done"],
        "failed": counts["failed"],
        "replicas": n_replicas,
        "replica_nodes": {m: [v.get("node", "?") for v in views] for m, views in (timing.replicas or {}).items()},
        "concurrency": timing.info.get("concurrency") or concurrency or default_concurrency(topo, total_replicas),
        "startup_s": timing.started - called,
        "makespan_s": makespan,
        **bound,
        "ratio_to_bound": makespan / bound["lower_bound_s"] if bound["lower_bound_s"] > 0 else None,
        "throughput_per_s": len(ok) / makespan if makespan > 0 else 0.0,
        "agent_utilisation": busy / (makespan * total_replicas) if makespan > 0 else 0.0,
        "mean_batch": sum(batches) / len(batches) if batches else 0.0,
        "bound_from": "sim spec" if from_spec else "measured",
        "store": _store_figures(ok),
    }
