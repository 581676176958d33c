"""Running a topology on Ray: problems in flight, agent replicas, the judge actor, the results log.

:func:`run` keeps up to ``concurrency`` problems in flight (one driver thread each, blocked on Ray
while actors work), so a chain pipelines: while ``a2`` refines problem 1, ``a1`` drafts problem 2.
What a problem's agents are asked, and when, is :class:`~kvjudge.topologies.plan.ProblemPlan`
(pure); requests for a model go to the least-loaded of its replicas, whose actors batch what
arrives together. All actors start at once; problems start as soon as the judge and one replica per
model are up, and each further replica takes work from the moment it is ready. Records are appended
to ``OUT/results.jsonl`` as problems finish (order of completion), flushed and fsynced; ``--resume``
skips finished ids, and Ctrl-C keeps what finished.

One module (~540 lines) on purpose: the Orchestrator's start-up, dispatch and shutdown share its
actors, locks and replica state, and :class:`Replicas` and the problem driver exist only for it.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from kvjudge.agents.actor import AgentActor
from kvjudge.cache.store_actor import DEFAULT_STORE_NAME, get_or_create_store
from kvjudge.judges.actor import JudgeActor, judge_options
from kvjudge.models.sim import is_sim_spec
from kvjudge.runtime.cluster import NAMESPACE, ClusterError, check_feasible, connect, held_sigterm
from kvjudge.runtime.manifest import check_manifest, run_manifest
from kvjudge.runtime.results import ResultsLog
from kvjudge.runtime.telemetry import MetricsPublisher, Reporter
from kvjudge.topologies.plan import ProblemPlan
from kvjudge.topologies.schema import Topology

READY_TIMEOUT_S = float(os.environ.get("KVJUDGE_READY_TIMEOUT", "600"))
MAX_AUTO_REPLICAS = 8
HALT_POLL_S = 0.5  # how often a problem thread's wait checks whether the run was stopped
HALT_JOIN_S = 10.0  # how long a stopped run waits for its problem threads before shutting Ray down


class RunError(ValueError):
    """A run that cannot go on (a model that does not load, an unplaceable actor); one line."""


class Halted(RuntimeError):
    """A problem thread's wait given up because the run was stopped (Ctrl-C, SIGTERM, an error)."""


class _Quiet:
    """A Reporter that ignores every event."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class _Locked:
    """A Reporter shared by problem threads: one event at a time."""

    def __init__(self, inner: Reporter) -> None:
        self.inner = inner
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        fn = getattr(self.inner, name)

        def locked(*args, **kwargs):
            with self._lock:
                return fn(*args, **kwargs)

        return locked


@dataclass
class Replicas:
    """The actors serving one model; :meth:`pick` returns the least-loaded one of those ready.

    ``ready[i]``: replica ``i`` answered ``ready()`` (default: all are). A replica still starting
    (``state: "starting"``) gets no work until :meth:`mark_ready`; one that failed to start
    (:meth:`mark_failed`, ``state: "failed"``) never does. While some replica is still starting, a
    request waits for a ready replica with nothing in flight rather than queueing behind a busy one:
    work handed to a busy replica stays there, and the replicas about to come up would then idle
    (measured: 8 problems started on the first replica up made the 8 x 4 sim run 1.4x its bound).
    """

    actors: list
    nodes: list[str] = field(default_factory=list)
    node_ids: list[str] = field(default_factory=list)  # Ray node ids (several nodes may share an IP)
    load: list[int] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)
    ready: list[bool] = field(default_factory=list)
    _lock: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        n = len(self.actors)
        self.ready = list(self.ready) if self.ready else [True] * n
        self.load = [0] * n
        self.stats = [{"state": "idle" if r else "starting", "tokens_per_s": 0.0, "batch": 0} for r in self.ready]
        self.nodes = self.nodes or ["?"] * n
        self.node_ids = self.node_ids or ["?"] * n

    def mark_ready(self, i: int, info: dict) -> None:
        """Replica ``i`` is up (``info``: its ``ready()`` answer): it takes work from now on."""
        with self._lock:
            self.nodes[i], self.node_ids[i] = str(info.get("node", "?")), str(info.get("node_id", "?"))
            self.ready[i] = True
            self.stats[i]["state"] = "busy" if self.load[i] else "idle"
            self._lock.notify_all()

    def mark_failed(self, i: int, why: str) -> None:
        """Replica ``i`` did not start (the others serve on): it never takes work."""
        with self._lock:
            self.ready[i] = False
            self.stats[i].update(state="failed", error=why)
            self._lock.notify_all()

    def pick(self, halt: threading.Event | None = None) -> int:
        """The least-loaded ready replica, its load counted; while replicas are still starting, waits
        until a ready one is idle or none is starting (:class:`Halted` once ``halt`` is set)."""
        with self._lock:
            while True:
                up = [j for j in range(len(self.actors)) if self.ready[j]]
                starting = any(not self.ready[j] and self.stats[j]["state"] == "starting"
                               for j in range(len(self.actors)))
                if up and (not starting or any(self.load[j] == 0 for j in up)):
                    break
                if halt is not None and halt.is_set():
                    raise Halted("the run was stopped")
                self._lock.wait(HALT_POLL_S)
            i = min(up, key=lambda j: (self.load[j], j))
            self.load[i] += 1
            self.stats[i]["state"] = "busy"
            return i

    def release(self, i: int, result: dict | None = None) -> None:
        with self._lock:
            self.load[i] -= 1
            if result:
                self.stats[i]["tokens_per_s"] = float(result.get("tokens_per_s", 0.0) or 0.0)
                self.stats[i]["batch"] = int(result.get("batch_size", 1) or 1)
            self.stats[i]["state"] = "busy" if self.load[i] else "idle"
            self._lock.notify_all()

    def view(self) -> list[dict]:
        with self._lock:
            return [{"node": n, "node_id": i, "in_flight": ld, **st}
                    for n, i, ld, st in zip(self.nodes, self.node_ids, self.load, self.stats)]


class Orchestrator:
    """Agents (replicas per model), the store and the judge of one topology on a Ray cluster."""

    def __init__(self, topology: Topology, model: str | None = None, address: str | None = None,
                 replicas: int | str | None = None, reporter: Reporter | None = None,
                 wait_all: bool = False) -> None:
        self.wait_all = wait_all  # start problems only once every replica is up (bench run: a clean makespan)
        topology = topology.with_overrides(model=model)
        self.topology = topology
        self.address = address
        self.replicas_arg = replicas if replicas is not None else getattr(topology.resources, "agent_replicas", 1)
        self.reporter = reporter or _Quiet()
        self.judge_model = topology.defaults.model
        self.specs = {a: topology.agent_spec(a) for a in topology.agents}
        self.models = sorted({s.model for s in self.specs.values()})
        self.pools: dict[str, Replicas] = {}
        self._started_ray = False
        self._store_started: float | None = None
        self.store_restarts = 0
        self._halt = threading.Event()  # set when the run ends early: problem threads stop waiting

    # ---------------------------------------------------------------- set-up
    def start(self) -> dict:
        res = self.topology.resources
        # an embedded Ray gets logical CPUs for every replica asked for (they may oversubscribe the cores)
        asked = 1 if self.replicas_arg in (None, "", "auto") else max(1, int(self.replicas_arg))
        if not self.address and not ray.is_initialized():
            check_machine(asked, self.models, float(res.agent_num_cpus))
        want = math.ceil(asked * len(self.models) * res.agent_num_cpus) + 1
        on_term = signal.getsignal(signal.SIGTERM)
        sim_only = all(is_sim_spec(m) for m in [*self.models, self.judge_model])  # no torch tensor in the run
        with held_sigterm(on_term):  # a SIGTERM while Ray starts is taken by on_term once it is up
            self._started_ray = connect(self.address, num_cpus=max(os.cpu_count() or 1, len(self.models) + 1, want),
                                        torch_tensors=not sim_only)
        try:
            agent_req = {"CPU": res.agent_num_cpus}
            for m in self.models:
                check_feasible(f"an agent actor for model {m!r} (resources.agent_num_cpus)", agent_req)
            jopts = judge_options(res.judge_resource, res.judge_num_gpus)
            check_feasible("the judge actor", {"CPU": 1, "GPU": jopts.get("num_gpus", 0),
                                               **jopts.get("resources", {})})
        except ClusterError as exc:
            raise RunError(str(exc)) from None
        except ValueError as exc:  # judge_options: a declared resource no node has
            raise RunError(" ".join(str(exc).split())) from None
        store = self.topology.store
        self.store = get_or_create_store(DEFAULT_STORE_NAME, budget_bytes=store.budget_bytes,
                                         eviction=store.eviction, namespace=NAMESPACE)
        n = self._replica_count()
        need = n * len(self.models) * float(res.agent_num_cpus) + 1.0  # + the judge's CPU
        have = float(ray.cluster_resources().get("CPU", 0.0))
        if need > have:  # else the actors that do not fit would wait for READY_TIMEOUT_S
            raise RunError(f"{n} agent replica(s) x {len(self.models)} model(s) x {res.agent_num_cpus:g} CPU "
                           f"(resources.agent_num_cpus) + 1 CPU for the judge need {need:g} CPUs, but the "
                           f"cluster has {have:g}: ask for fewer --replicas")
        # the judge first: its (pinned) node's CPU must not go to an agent replica asked for earlier
        j = self.topology.judge
        self.judge = JudgeActor.options(num_cpus=1, **jopts).remote(
            self.judge_model, j.method, j.method_kwargs(), DEFAULT_STORE_NAME, NAMESPACE, 1,
            candidate_kv=j.candidate_kv, output=j.output, max_new_tokens=j.max_tokens,
            debias=j.debias, permutations=j.permutations,
        )
        threads = max(1, int(res.agent_num_cpus) or 1)
        compress = store.compress.model_dump() if store.compress is not None else None
        actors = {m: [AgentActor.options(num_cpus=res.agent_num_cpus).remote(m, DEFAULT_STORE_NAME, NAMESPACE, threads,
                                                                             compress=compress)
                      for _ in range(n)] for m in self.models}
        self.pools = {m: Replicas(lst, ready=[False] * len(lst)) for m, lst in actors.items()}
        self.judge_info = self._await_ready()
        why = ray.get(self.judge.check_candidates.remote("(probe)", len(self.specs)))
        if why:
            raise RunError(f"the judge cannot take this topology's {len(self.specs)} agents as candidates: {why}")
        return self.judge_info

    def _replica_count(self) -> int:
        arg = self.replicas_arg
        if arg in (None, ""):
            return 1
        if arg != "auto":
            return max(1, int(arg))
        cpus = float(ray.cluster_resources().get("CPU", 1)) - 1.0  # one CPU stays with the judge
        per = float(self.topology.resources.agent_num_cpus) or 1.0
        return max(1, min(MAX_AUTO_REPLICAS, int(cpus // per) // max(1, len(self.models))))

    def _await_ready(self) -> dict:
        """Wait (up to ``READY_TIMEOUT_S``) until the judge and one replica of every model are up, and
        return the judge's ``ready()`` info. Every actor was started at once; the replicas still starting
        join their pool as each comes up (a watcher thread), so work flows to a replica as soon as it is
        ready rather than after the slowest. A judge that fails to start, or a model none of whose replicas
        starts, is a :class:`RunError`; a replica that fails while another of its model is (or may yet
        be) up is marked failed, and the others serve on. With ``wait_all`` it waits for every actor."""
        slots: dict = {self.judge.ready.remote(): (None, 0)}
        for m, pool in self.pools.items():
            slots.update({a.ready.remote(): (m, i) for i, a in enumerate(pool.actors)})
        pending, judge_info = list(slots), None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while (judge_info is None or not all(any(p.ready) for p in self.pools.values())
               or (self.wait_all and pending)):
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                late = [self._slot_name(*slots[r]) for r in pending]
                raise RunError(f"{', '.join(late)}: no node could start it within {READY_TIMEOUT_S:.0f} s "
                               f"(cluster resources: {ray.cluster_resources()})")
            model, i = slots[done[0]]
            info = self._ready_info(done[0])
            if "error" in info:
                why = f"{self._slot_name(model, i)} failed to load on node {info.get('node', '?')}: {info['error']}"
                if model is None:
                    raise RunError(why)
                self.pools[model].mark_failed(i, info["error"])
                if all(v["state"] == "failed" for v in self.pools[model].view()):
                    raise RunError(why)
            elif model is None:
                judge_info = info
            else:
                self.pools[model].mark_ready(i, info)
        if pending:
            later = {r: slots[r] for r in pending}
            threading.Thread(target=self._join_later, args=(later, deadline), name="replicas-starting",
                             daemon=True).start()
        return judge_info

    def _join_later(self, slots: dict, deadline: float) -> None:
        """Add each replica still starting to its pool as it comes up (failed if it cannot)."""
        pending = list(slots)
        while pending and ray.is_initialized() and time.monotonic() < deadline:
            try:
                done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            except Exception:  # Ray shut down under us: the run is over
                return
            for ref in done:
                model, i = slots[ref]
                info = self._ready_info(ref)
                if "error" in info:
                    self.pools[model].mark_failed(i, info["error"])
                else:
                    self.pools[model].mark_ready(i, info)
        for ref in pending:  # never came up within READY_TIMEOUT_S
            model, i = slots[ref]
            self.pools[model].mark_failed(i, f"not started within {READY_TIMEOUT_S:.0f} s")

    def _slot_name(self, model: str | None, i: int) -> str:
        return f"judge model {self.judge_model!r}" if model is None else f"agent model {model!r} replica {i + 1}"

    @staticmethod
    def _ready_info(ref) -> dict:
        """An actor's ``ready()`` answer; an actor that died while starting as ``{"error": why}``."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:
            return {"error": " ".join(str(exc).split())[:300] or type(exc).__name__}

    def replicas_view(self) -> dict[str, list[dict]]:
        return {m: pool.view() for m, pool in self.pools.items()}

    def store_stats(self) -> dict:
        """The store's counters (``{}`` while it restarts); counts restarts it notices."""
        try:
            stats = ray.get(self.store.stats.remote(), timeout=10)
        except Exception:
            return {}
        started = stats.get("started_at")
        if self._store_started is not None and started != self._store_started:
            self.store_restarts += 1
        self._store_started = started
        return stats

    def halt(self) -> None:
        """Make every problem thread's pending wait end (:class:`Halted`) so none outlives the run."""
        self._halt.set()

    def _get(self, ref: Any) -> Any:
        """``ray.get(ref)`` in short waits that give up once :meth:`halt` is called: a thread blocked in
        a plain ``ray.get`` when Ray shuts down may never return, and the interpreter's exit joins it."""
        while not self._halt.is_set():
            done, _ = ray.wait([ref], timeout=HALT_POLL_S)
            if done:
                return ray.get(done[0])
        raise Halted("the run was stopped")

    def stop(self) -> None:
        """Shut down the Ray we started, or else kill the actors we created on someone else's Ray."""
        self.halt()
        if not ray.is_initialized():
            return
        if self._started_ray:
            ray.shutdown()
            return
        actors = [a for pool in self.pools.values() for a in pool.actors] + [getattr(self, "judge", None)]
        for actor in actors:
            if actor is not None:
                ray.kill(actor, no_restart=True)

    # ---------------------------------------------------------------- one problem
    def _generate(self, request: dict) -> dict:
        model = self.specs[request["agent"]].model
        if request["final"] and self.topology.judge.candidate_kv == "agent" and model == self.judge_model:
            request = {**request, "publish_agent_kv": True}  # the KV it computes while writing is the candidate's
        pool = self.pools[model]
        i = pool.pick(self._halt)
        result = None
        try:
            result = self._get(pool.actors[i].generate.remote(request))
            return result
        finally:
            pool.release(i, result)

    def _publish(self, agent: str, problem: str, answer: str) -> str | None:
        """Ask the judge what KV it will look up for ``answer`` and have the agent's actor encode it;
        a failure only costs the judge an encode later."""
        try:
            req = self._get(self.judge.candidate_kv_request.remote(problem, answer, self.topology.judge.candidate_kv))
            meta = {"agent": agent, "kind": "judge-candidate"}
            pool = self.pools[self.specs[agent].model]
            i = pool.pick(self._halt)
            try:
                ok = self._get(pool.actors[i].encode.remote(req["context_ids"], req["ids"], req["key"], meta))
            finally:
                pool.release(i)
            return req["key"] if ok else None
        except ray.exceptions.RayError:
            return None

    def run_problem(self, problem: dict) -> dict:
        """Agents then judge for one problem; a failure becomes a ``status: failed`` record."""
        t0 = time.perf_counter()
        text = problem["prompt"]
        plan = ProblemPlan(self.topology, text)
        results: dict[str, dict] = {}
        rep = self.reporter
        try:
            with ThreadPoolExecutor(max_workers=len(self.specs), thread_name_prefix="agent") as pool:
                futures: dict[Future, dict] = {}
                while not plan.done:
                    for req in plan.ready():
                        rep.agent(req["agent"], "generating", round=req["round"] + 1)
                        futures[pool.submit(self._generate, req)] = req
                    done, _ = wait(futures, return_when=FIRST_COMPLETED)
                    for fut in done:
                        self._finish_turn(plan, futures.pop(fut), fut, text, results)
            agents = list(self.topology.agents)
            candidates = [self._candidate(results[a]) for a in agents]
            verdict = self._get(self.judge.judge_candidates.remote(text, candidates, agents))
            winner = verdict.get("winner")
            record = {
                "id": problem["id"],
                "status": "ok",
                "candidates": [results[a] for a in agents],
                "verdict": verdict,
                "winner_agent": agents[winner - 1] if winner else None,
                "store": self.store_stats(),
                "elapsed_s": time.perf_counter() - t0,
            }
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # an actor that died twice, a task error: record it and go on
            if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
                exc = exc.cause  # the error the actor raised (e.g. a prompt too long), not Ray's wrapper
            reason = " ".join(str(exc).split())
            record = {"id": problem["id"], "status": "failed", "error": f"{type(exc).__name__}: {reason[:500]}",
                      "candidates": list(results.values()), "elapsed_s": time.perf_counter() - t0}
        return record

    def _candidate(self, result: dict) -> dict:
        """The judge's view of an agent's final answer: its text, and in ``agent`` mode what the KV
        was computed under (the agent's ids when it runs the judge's model, else its prompt text)."""
        if self.topology.judge.candidate_kv != "agent":
            return {"text": result["text"]}
        if self.specs[result["agent"]].model == self.judge_model and result.get("prompt_ids") is not None:
            return {"text": result["text"], "token_ids": result["token_ids"], "prompt_ids": result["prompt_ids"]}
        return {"text": result["text"], "agent_prompt": result["agent_prompt"]}

    def _finish_turn(self, plan: ProblemPlan, req: dict, fut: Future, problem: str, results: dict) -> None:
        agent = req["agent"]
        try:
            r = fut.result()
        except Exception:
            self.reporter.agent(agent, "failed")
            raise
        mode = self.topology.judge.candidate_kv
        if req["final"] and mode != "agent" and self.specs[agent].model == self.judge_model:
            r["store_key"] = self._publish(agent, problem, r["text"])
        r["agent_prompt"] = req["prompt"]
        results[agent] = r
        plan.answer(agent, r["text"])
        self.reporter.agent(agent, "done", tokens=r["tokens"], tokens_per_s=r["tokens_per_s"])


SIM_REPLICAS_PER_CORE = 4  # simulated agents sleep instead of computing: a core holds a few


def check_machine(replicas: int, models: list[str], agent_num_cpus: float) -> None:
    """An embedded Ray is given a logical CPU for every replica asked for, so Ray itself never refuses
    too many: bound them by this machine's real cores instead (each replica is a process; simulated
    ones sleep, :data:`SIM_REPLICAS_PER_CORE` a core), a one-line :class:`RunError` before Ray starts."""
    cores = os.cpu_count() or 1
    per_core = SIM_REPLICAS_PER_CORE if all(is_sim_spec(m) for m in models) else 1
    most = max(1, int(cores * per_core // (len(models) * max(1.0, agent_num_cpus))))
    if replicas > most:
        raise RunError(f"{replicas} agent replica(s) x {len(models)} model(s) do not fit this machine's {cores} "
                       f"CPU(s): the embedded Ray runs at most {most} per model here; ask for fewer --replicas, "
                       "or run on a cluster (--address)")


def default_concurrency(topology: Topology, replicas: int) -> int:
    """Enough problems in flight to keep every replica busy: each problem has at most one request
    per agent outstanding, and a replica batches what it gets."""
    return max(1, min(64, 2 * replicas * len(topology.agents)))


def run(
    topology: Topology,
    problems: list[dict],
    out_dir: Path,
    *,
    model: str | None = None,
    address: str | None = None,
    resume: bool = False,
    reporter: Reporter,
    concurrency: int | None = None,
    replicas: int | str | None = None,
    wait_all_replicas: bool = False,
    source: str | None = None,
) -> dict:
    """Run ``problems`` (from ``source``: a dataset name or a file's hash, for the manifest) through
    ``topology``; returns ``{"done", "failed", "skipped", "retried", "results", "ok_total",
    "failed_total"}``: this call's counts (``retried``: failed before, run again), then the log's, the
    latest record per id counted once (a retried problem's new line supersedes its failed one)."""
    results = ResultsLog(Path(out_dir) / "results.jsonl", key=lambda r: str(r["id"]))
    try:
        if results.records and not resume:
            raise RunError(f"{results.path} exists: pass --resume to continue it, or choose another --out")
        check_manifest(results.path.parent, run_manifest(topology, model, source), bool(results.records))
        skip = {str(r["id"]) for r in results.latest() if r.get("status") == "ok"} if resume else set()
        todo = [p for p in problems if str(p["id"]) not in skip]
        counts = {"done": 0, "failed": 0, "skipped": len(problems) - len(todo),
                  "retried": sum(str(p["id"]) in results for p in todo), "results": str(results.path)}
        if not todo:
            return _totals(results, counts)
        pub = MetricsPublisher(reporter)
        locked = _Locked(pub)
        orch = Orchestrator(topology, model=model, address=address, replicas=replicas, reporter=locked,
                            wait_all=wait_all_replicas)
        try:
            info = orch.start()
            total = sum(len(p.actors) for p in orch.pools.values())
            width = concurrency or default_concurrency(topology, total)
            locked.start({"name": topology.name, "total": len(todo), "agents": list(topology.agents),
                          "edges": [[e.source, e.target] for e in topology.edges],
                          "replicas": orch.replicas_view(), "concurrency": width,
                          "method": topology.judge.method, "judge_node": info.get("device", "?"),
                          "model": orch.judge_model})
            _drive(orch, todo, results, counts, width, locked)
        finally:
            locked.close()
            orch.stop()
        return _totals(results, counts)
    finally:
        results.close()


def _totals(results: ResultsLog, counts: dict) -> dict:
    """``counts`` with the log's totals: the latest record of each id, counted once."""
    latest = [r.get("status") for r in results.latest()]
    return {**counts, "ok_total": latest.count("ok"), "failed_total": len(latest) - latest.count("ok")}


def _drive(orch: Orchestrator, todo: list[dict], results: ResultsLog, counts: dict, width: int,
           reporter: Any) -> None:
    """Keep ``width`` problems in flight; append each record as its problem finishes."""
    queue = list(reversed(todo))
    in_flight: dict[Future, dict] = {}
    pool = ThreadPoolExecutor(max_workers=width, thread_name_prefix="problem")
    try:
        while queue or in_flight:
            while queue and len(in_flight) < width:
                p = queue.pop()
                in_flight[pool.submit(orch.run_problem, p)] = p
            reporter.status(in_flight=len(in_flight), replicas=orch.replicas_view())
            done, _ = wait(in_flight, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in done:
                in_flight.pop(fut)
                record = fut.result()
                results.append(record)
                counts["done" if record["status"] == "ok" else "failed"] += 1
                reporter.problem(record)
            if done:
                reporter.status(store_restarts=orch.store_restarts)
        reporter.status(in_flight=0, replicas=orch.replicas_view())
    finally:
        # Ctrl-C or an error: records already appended stay; problems still running are dropped. Their
        # threads stop waiting (halt) and end before Ray shuts down, so the interpreter's exit, which
        # joins them, cannot hang on a wait that Ray's shutdown never answers
        orch.halt()
        pool.shutdown(wait=False, cancel_futures=True)
        wait(in_flight, timeout=HALT_JOIN_S)
