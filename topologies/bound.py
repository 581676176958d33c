"""The makespan lower bound of ``kvjudge bench run``, from the topology alone (pure: no Ray, no torch).

The best a cluster can do with ``n`` problems of a topology is bounded below by::

    lower_bound = max(critical_path, max_m(agent_work_m / capacity_m), judge_work)

* ``critical_path``: one problem alone. Per round, the longest path through the agent graph of
  per-request times ``t_a`` (plus, on the last round, the encode that publishes ``a``'s candidate
  KV), rounds one after another, then one judge call.
* ``agent_work_m / capacity_m``: all requests for model ``m`` (``problems x rounds x sum t_a``, plus
  encodes) over what its replicas serve at once: ``replicas x min(batch_speedup, max_batch)`` for
  ``sim`` (a batch of ``B <= batch_speedup`` costs one request), ``replicas`` for a real model.
* ``judge_work``: ``problems x`` one judge call, since the judge actor is one serial process.

The costs come from :func:`sim_costs` for ``sim:...`` models: ``t_a = min(answer_tokens,
max_new_tokens_a) / tokens_per_s``, an encode costs ``prefill_seconds(context + answer)`` (the
context the simulated judge encodes a candidate after, :func:`~kvjudge.judges.sim.candidate_slot_ids`,
for the mean problem) and a judge call ``judge_s``, all from the spec. For real models
:func:`measured_costs` reads them from a run's records (the bound is then an estimate, not a guarantee).
"""

from __future__ import annotations

from kvjudge.agents.batching import MAX_BATCH
from kvjudge.judges.sim import candidate_slot_ids
from kvjudge.models.sim import SimSpec, is_sim_spec, parse_sim_spec
from kvjudge.topologies.plan import ProblemPlan
from kvjudge.topologies.schema import Topology

Costs = dict  # {"gen": {agent: s}, "enc": {agent: s}, "judge": s, "per_replica": {model: requests at once}}


def longest_path(topo: Topology, cost: dict[str, float]) -> float:
    """The longest path through the agent graph when agent ``a`` takes ``cost[a]`` seconds."""
    finish: dict[str, float] = {}
    for layer in ProblemPlan(topo, "x").generations:
        for a in layer:
            finish[a] = max((finish[p] for p in topo.predecessors(a)), default=0.0) + cost[a]
    return max(finish.values(), default=0.0)


def published_tokens(topo: Topology, problem: str, answer_tokens: int) -> int:
    """Tokens the encode publishing a candidate of ``answer_tokens`` tokens covers (its context in the
    judge's candidate-KV mode, then the answer) on the simulated model (one token per UTF-8 byte)."""
    context, ids = candidate_slot_ids(problem, "x" * answer_tokens, topo.judge.candidate_kv)
    return len(context) + len(ids)


def sim_costs(topo: Topology, problems: list[dict]) -> Costs | None:
    """Per-request / encode / judge seconds from the sim specs, or ``None`` if any model is real."""
    specs = {a: topo.agent_spec(a) for a in topo.agents}
    if not all(is_sim_spec(s.model) for s in specs.values()) or not is_sim_spec(topo.defaults.model):
        return None
    judge_spec = parse_sim_spec(topo.defaults.model)
    gen: dict[str, float] = {}
    enc: dict[str, float] = {}
    # agents publish candidate KV only when the judge reuses it and does not take the agents' own
    publish = topo.judge.candidate_kv != "agent" and topo.judge.method != "dense"
    for a, s in specs.items():
        sim: SimSpec = parse_sim_spec(s.model)
        n = min(sim.answer_tokens, int(s.max_new_tokens))
        gen[a] = sim.batch_seconds(n, 1)
        enc[a] = 0.0
        if publish and s.model == topo.defaults.model and sim.prefill_tokens_per_s > 0:
            lens = [published_tokens(topo, p["prompt"], n) for p in problems]
            enc[a] = sim.prefill_seconds(round(sum(lens) / len(lens)))
    capacity = {s.model: min(parse_sim_spec(s.model).batch_speedup, MAX_BATCH) for s in specs.values()}
    return {"gen": gen, "enc": enc, "judge": judge_spec.judge_s, "per_replica": capacity}


def measured_costs(topo: Topology, records: list[dict]) -> Costs:
    """Per-request seconds (replica time: batch seconds / batch size) and judge latency from a run's records."""
    gen: dict[str, list[float]] = {a: [] for a in topo.agents}
    judge: list[float] = []
    for rec in records:
        for c in rec.get("candidates", []):
            if c.get("agent") in gen and c.get("seconds") is not None:
                gen[c["agent"]].append(float(c["seconds"]) / max(1, int(c.get("batch_size", 1) or 1)))
        if rec.get("verdict", {}).get("latency_ms") is not None:
            judge.append(float(rec["verdict"]["latency_ms"]) / 1000.0)
    mean = {a: sum(v) / len(v) if v else 0.0 for a, v in gen.items()}
    models = {topo.agent_spec(a).model for a in topo.agents}
    return {"gen": mean, "enc": {a: 0.0 for a in topo.agents}, "judge": sum(judge) / len(judge) if judge else 0.0,
            "per_replica": {m: 1.0 for m in models}}


def lower_bound(topo: Topology, n_problems: int, costs: Costs, replicas: dict[str, int]) -> dict:
    """``{"lower_bound_s", "critical_path_s", "work_bound_s", "judge_bound_s"}`` (see the module doc)."""
    last = {a: costs["gen"][a] + costs["enc"][a] for a in topo.agents}
    rounds = int(topo.rounds)
    critical = (rounds - 1) * longest_path(topo, costs["gen"]) + longest_path(topo, last) + costs["judge"]
    work: dict[str, float] = {}
    for a in topo.agents:
        m = topo.agent_spec(a).model
        work[m] = work.get(m, 0.0) + n_problems * (rounds * costs["gen"][a] + costs["enc"][a])
    bound_work = max((w / (max(1, replicas.get(m, 1)) * costs["per_replica"][m]) for m, w in work.items()),
                     default=0.0)
    judge = n_problems * costs["judge"]
    return {"lower_bound_s": max(critical, bound_work, judge), "critical_path_s": critical,
            "work_bound_s": bound_work, "judge_bound_s": judge}
