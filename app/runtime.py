"""Running a topology on Ray: agents by topological generation (x rounds), then the judge actor.

One JSON line per problem goes to ``OUT/results.jsonl`` the moment the problem finishes (flushed
and fsynced), so an interrupted run loses nothing that was done and ``--resume`` skips it.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kvjudge.topologies import Topology, build_graph, generations

NAMESPACE = "kvjudge"
ZERO_COPY = "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"
READY_TIMEOUT_S = float(os.environ.get("KVJUDGE_READY_TIMEOUT", "600"))


class RunError(ValueError):
    """A run that cannot go on (a model that does not load, an unplaceable actor); one line."""


class Reporter(Protocol):
    """Receives progress; the plain printer and the live dashboard implement it."""

    def start(self, info: dict) -> None: ...
    def agent(self, agent: str, state: str, **stats) -> None: ...
    def problem(self, record: dict) -> None: ...
    def close(self) -> None: ...


class PlainReporter:
    """One line per finished problem (and nothing else): what a non-terminal gets."""

    def __init__(self, stream=None) -> None:
        import sys

        self.stream = stream or sys.stdout
        self.done = 0
        self.total = 0

    def start(self, info: dict) -> None:
        self.total = info["total"]
        print(f"run {info['name']}: {info['total']} problems, agents {', '.join(info['agents'])}, "
              f"judge {info['method']} on {info['judge_node']}", file=self.stream, flush=True)

    def agent(self, agent: str, state: str, **stats) -> None:
        return None

    def problem(self, record: dict) -> None:
        self.done += 1
        head = f"[{self.done}/{self.total}] {record['id']}"
        if record["status"] != "ok":
            print(f"{head}: FAILED: {record['error']}", file=self.stream, flush=True)
            return
        v = record["verdict"]
        gate = f", {'agreed' if v['decision'].get('agreed') else 'dense fallback'}" if v.get("decision") and "agreed" in v["decision"] else ""
        print(f"{head}: winner #{v['winner']} ({record['winner_agent']}) by {v['method']}{gate}, "
              f"{v['latency_ms']:.0f} ms, store {record['store']['entries']} entries", file=self.stream, flush=True)

    def close(self) -> None:
        return None


def load_problems(spec: str, limit: int | None = None) -> list[dict]:
    """``humaneval`` / ``gsm8k`` / ``mmlu`` (packaged data) or a JSONL file of ``{"id", "prompt"}`` lines."""
    from kvjudge.experiments.data import DATASETS, iter_jsonl, load_dataset

    if spec.lower() in DATASETS or spec.lower() in ("human-eval", "human_eval"):
        problems = load_dataset(spec, limit=limit)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise RunError(f"--problems {spec!r}: neither a dataset ({', '.join(DATASETS)}) nor a JSONL file")
        problems = []
        for n, item in iter_jsonl(path):
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or "id" not in item:
                raise RunError(f"{path}:{n}: each line needs an \"id\" and a string \"prompt\"")
            problems.append({**item, "id": str(item["id"])})
        if limit is not None:
            problems = problems[:limit]
    if not problems:
        raise RunError(f"--problems {spec!r} holds no problems")
    return problems


class ResultsFile:
    """Append-only JSONL; every record is flushed and fsynced before the next problem starts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def records(self) -> list[dict]:
        """Every record written so far, in order (a line torn by a crash is skipped)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def done_ids(self) -> set[str]:
        """Ids of problems already finished successfully."""
        return {str(rec["id"]) for rec in self.records() if rec.get("status") == "ok"}

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _join(answers: list[tuple[str, str]]) -> str:
    return "\n\n".join(f"[{agent}]\n{text}" for agent, text in answers)


@dataclass
class Orchestrator:
    """Agents, store and judge for one topology on a (local or remote) Ray cluster."""

    topology: Topology
    model: str | None = None
    address: str | None = None
    reporter: Reporter = field(default_factory=PlainReporter)

    def __post_init__(self) -> None:
        self.graph = build_graph(self.topology)
        self.order = generations(self.graph)
        if self.model:
            self.topology = self.topology.model_copy(
                update={"defaults": self.topology.defaults.model_copy(update={"model": self.model})}
            )
        self.judge_model = self.topology.defaults.model
        self.specs = {a: self.topology.agent_spec(a) for a in self.topology.agents}
        self._started_ray = False

    # ---------------------------------------------------------------- set-up
    def start(self) -> dict:
        import ray

        from kvjudge.agents.actor import AgentActor
        from kvjudge.cache.store_actor import get_or_create_store
        from kvjudge.judges.actor import JudgeActor, judge_options

        models = sorted({s.model for s in self.specs.values()})
        if not ray.is_initialized():
            # KV segments are never written in place after they are made: let Ray pass them zero-copy
            env = {ZERO_COPY: os.environ.setdefault(ZERO_COPY, "1")}
            warnings.filterwarnings("ignore", message=".*(Zero-copy tensor|NumPy array is not writable).*")
            common = dict(namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR",
                          runtime_env={"env_vars": env})
            if self.address:
                ray.init(address=self.address, **common)
            else:
                cpus = max(os.cpu_count() or 1, len(models) + 1)
                ray.init(address="local", num_cpus=cpus, include_dashboard=False, **common)
            self._started_ray = True
        res = self.topology.resources
        store = self.topology.store
        self.store_name = "kvjudge-store"
        self.store = get_or_create_store(self.store_name, budget_bytes=store.budget_bytes, eviction=store.eviction,
                                         namespace=NAMESPACE)
        threads = max(1, int(res.agent_num_cpus) or 1)
        self.agents = {
            m: AgentActor.options(num_cpus=res.agent_num_cpus).remote(m, self.store_name, NAMESPACE, threads)
            for m in models
        }
        jopts = judge_options(res.judge_resource, res.judge_num_gpus)
        self.judge = JudgeActor.options(num_cpus=1, **jopts).remote(
            self.judge_model, self.topology.judge.method, self.topology.judge.method_kwargs(),
            self.store_name, NAMESPACE, 1,
        )
        ready = self._ready({**{f"agent model {m!r}": a for m, a in self.agents.items()},
                             f"judge model {self.judge_model!r}": self.judge})
        self.agent_models = {m: ready[f"agent model {m!r}"]["model_id"] for m in models}
        self.judge_info = ready[f"judge model {self.judge_model!r}"]
        return self.judge_info

    def _ready(self, actors: dict) -> dict:
        import ray

        refs = {name: a.ready.remote() for name, a in actors.items()}
        done, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=READY_TIMEOUT_S)
        if pending:
            late = [n for n, r in refs.items() if r in pending]
            raise RunError(f"{', '.join(late)}: no node could start it within {READY_TIMEOUT_S:.0f} s "
                           f"(cluster resources: {ray.cluster_resources()})")
        out = {}
        for name, ref in refs.items():
            info = ray.get(ref)
            if "error" in info:
                raise RunError(f"{name} failed to load on node {info['node']}: {info['error']}")
            out[name] = info
        return out

    def stop(self) -> None:
        """Shut down the Ray we started, or else kill the actors we created on someone else's Ray."""
        import ray

        if not ray.is_initialized():
            return
        if self._started_ray:
            ray.shutdown()
            return
        for actor in [*getattr(self, "agents", {}).values(), getattr(self, "judge", None)]:
            if actor is not None:
                ray.kill(actor, no_restart=True)

    def _publish(self, agent: str, problem: str, answer: str) -> str | None:
        """Ask the judge what KV it will look up for ``answer`` and have the agent's actor encode it."""
        import ray

        req = ray.get(self.judge.candidate_kv_request.remote(problem, answer))
        meta = {"agent": agent, "kind": "judge-candidate"}
        actor = self.agents[self.specs[agent].model]
        ok = ray.get(actor.encode.remote(req["context_ids"], req["ids"], req["key"], meta))
        return req["key"] if ok else None

    # ---------------------------------------------------------------- one problem
    def run_problem(self, problem: dict) -> dict:
        """Agents then judge for one problem; a failure becomes a ``status: failed`` record."""
        import ray

        t0 = time.perf_counter()
        text = problem["prompt"]
        rounds = self.topology.rounds
        answers: dict[str, dict] = {}
        try:
            for rnd in range(rounds):
                previous_round = dict(answers)
                answers = {} if rnd else answers
                for gen in self.order:
                    refs, publish = {}, {}
                    for agent in gen:
                        spec = self.specs[agent]
                        prev = [(p, answers[p]["text"]) for p in self.topology.predecessors(agent) if p in answers]
                        if rnd:
                            prev += [(o, r["text"]) for o, r in previous_round.items() if o != agent]
                        prompt = spec.prompt.format(problem=text, previous=_join(prev))
                        final = rnd == rounds - 1
                        request = {
                            "agent": agent, "prompt": prompt,
                            "max_new_tokens": spec.max_new_tokens, "temperature": spec.temperature,
                            "seed": spec.seed + rnd,
                        }
                        publish[agent] = final and spec.model == self.judge_model
                        self.reporter.agent(agent, "generating", round=rnd + 1)
                        refs[agent] = self.agents[spec.model].generate.remote(request)
                    for agent, ref in refs.items():
                        try:
                            answers[agent] = ray.get(ref)
                        except Exception:
                            self.reporter.agent(agent, "failed")
                            raise
                        r = answers[agent]
                        if publish.get(agent):
                            r["store_key"] = self._publish(agent, text, r["text"])
                        self.reporter.agent(agent, "done", tokens=r["tokens"], tokens_per_s=r["tokens_per_s"])
            agents = list(self.topology.agents)
            candidates = [answers[a]["text"] for a in agents]
            verdict = ray.get(self.judge.judge_candidates.remote(text, candidates, agents))
            from kvjudge.cache.store import call

            record = {
                "id": problem["id"],
                "status": "ok",
                "candidates": [answers[a] for a in agents],
                "verdict": verdict,
                "winner_agent": agents[verdict["winner"] - 1],
                "store": call(self.store, "stats"),
                "elapsed_s": time.perf_counter() - t0,
            }
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # an actor that died twice, a task error: record it and go on
            reason = " ".join(str(exc).split())
            record = {"id": problem["id"], "status": "failed", "error": f"{type(exc).__name__}: {reason[:500]}",
                      "candidates": list(answers.values()), "elapsed_s": time.perf_counter() - t0}
        for agent in self.topology.agents:
            self.reporter.agent(agent, "waiting")
        return record


def run(
    topology: Topology,
    problems: list[dict],
    out_dir: Path,
    *,
    model: str | None = None,
    address: str | None = None,
    resume: bool = False,
    reporter: Reporter | None = None,
) -> dict:
    """Run ``problems`` through ``topology``; returns ``{"done", "failed", "skipped", "results"}``."""
    results = ResultsFile(out_dir / "results.jsonl")
    if results.path.exists() and not resume:
        raise RunError(f"{results.path} exists: pass --resume to continue it, or choose another --out")
    skip = results.done_ids() if resume else set()
    todo = [p for p in problems if str(p["id"]) not in skip]
    from kvjudge.app.metrics_actor import MetricsPublisher  # snapshots for `kvjudge dashboard`

    reporter = MetricsPublisher(reporter or PlainReporter())
    if not todo:
        return {"done": 0, "failed": 0, "skipped": len(problems), "results": str(results.path)}
    orch = Orchestrator(topology, model=model, address=address, reporter=reporter)
    counts = {"done": 0, "failed": 0, "skipped": len(problems) - len(todo), "results": str(results.path)}
    try:
        info = orch.start()
        reporter.start({"name": topology.name, "total": len(todo), "agents": list(topology.agents),
                        "method": topology.judge.method, "judge_node": info.get("device", "?"),
                        "model": orch.judge_model})
        for problem in todo:
            record = orch.run_problem(problem)
            results.append(record)
            counts["done" if record["status"] == "ok" else "failed"] += 1
            reporter.problem(record)
    finally:
        reporter.close()
        orch.stop()
    return counts
