"""The makespan lower bound (topologies/bound.py) is pure and gives what the simulated judge and spec
say, and ``Topology.with_overrides`` changes only what it is asked to."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvjudge.judges.sim import SimJudge
from kvjudge.models.sim import parse_sim_spec
from kvjudge.topologies import load_topology, resolve_topology
from kvjudge.topologies.bound import MAX_BATCH, longest_path, lower_bound, sim_costs
from kvjudge.topologies.schema import JudgeSpec

SIM = "sim:tokens_per_s=40,answer_tokens=12,prefill_tokens_per_s=500,judge_s=0.05,batch_speedup=3"
OTHER = "sim:tokens_per_s=20,answer_tokens=30,prefill_tokens_per_s=100,batch_speedup=20"
PROBLEMS = [{"id": "a", "prompt": "  What is 2 + 2?  "}, {"id": "b", "prompt": "Sort [3, 1, 2] and say why." * 7}]


def _reference_costs(topo, problems):
    """The bound's costs as ``bench run`` computed them before bound.py: the encode's context length
    from a whole SimJudge's ``candidate_kv_request``, per-request time from the spec's own formula."""
    judge_spec = parse_sim_spec(topo.defaults.model)
    judge = SimJudge(judge_spec, method=topo.judge.method, candidate_kv=topo.judge.candidate_kv)
    publish = topo.judge.candidate_kv != "agent" and topo.judge.method != "dense"
    gen, enc, cap = {}, {}, {}
    for a in topo.agents:
        s = topo.agent_spec(a)
        sim = parse_sim_spec(s.model)
        n = min(sim.answer_tokens, int(s.max_new_tokens))
        gen[a] = n / sim.tokens_per_s
        enc[a] = 0.0
        if publish and s.model == topo.defaults.model:
            lens = [len(r["context_ids"]) + len(r["ids"])
                    for r in (judge.candidate_kv_request(p["prompt"], "x" * n) for p in problems)]
            enc[a] = round(sum(lens) / len(lens)) / sim.prefill_tokens_per_s
        cap[s.model] = min(sim.batch_speedup, MAX_BATCH)
    return {"gen": gen, "enc": enc, "judge": judge_spec.judge_s, "per_replica": cap}


@pytest.mark.parametrize("name, mode", [("progressive_refinement", "judge_prefix"), ("progressive_refinement", "isolated"),
                                        ("debate", "judge_prefix"), ("heterogeneous", "isolated")])
def test_sim_costs_equal_the_old_computation_through_a_sim_judge(name, mode):
    topo = load_topology(resolve_topology(name)).with_overrides(model=SIM, judge={"candidate_kv": mode})
    if name == "heterogeneous":  # its reviewer runs another model: a sim one here, which publishes nothing
        topo = topo.with_overrides(agents={"reviewer": {"model": OTHER}})
    got, want = sim_costs(topo, PROBLEMS), _reference_costs(topo, PROBLEMS)
    assert set(got) == set(want) and got["judge"] == pytest.approx(want["judge"])
    for part in ("gen", "enc", "per_replica"):
        assert got[part] == pytest.approx(want[part]), part
    assert all(v > 0 for a, v in got["enc"].items() if topo.agent_spec(a).model == SIM)
    for n in (1, 5, 16):
        assert lower_bound(topo, n, got, {SIM: 2}) == pytest.approx(lower_bound(topo, n, want, {SIM: 2}))


def test_judge_prefix_context_is_the_problem_and_the_first_header():
    topo = load_topology(resolve_topology("progressive_refinement")).with_overrides(model=SIM)
    n = parse_sim_spec(SIM).answer_tokens
    one = [PROBLEMS[0]]
    context = len(f"Problem:\n{PROBLEMS[0]['prompt'].strip()}\n\nCandidate #1:\n".encode())
    assert sim_costs(topo, one)["enc"][next(iter(topo.agents))] == pytest.approx((context + n) / 500)
    isolated = topo.with_overrides(judge={"candidate_kv": "isolated"})
    assert sim_costs(isolated, one)["enc"][next(iter(topo.agents))] == pytest.approx(n / 500)


def test_no_encode_without_published_kv_and_no_bound_for_a_real_model():
    topo = load_topology(resolve_topology("progressive_refinement")).with_overrides(model=SIM)
    for judge in ({"candidate_kv": "agent"}, JudgeSpec(method="dense")):
        assert set(sim_costs(topo.with_overrides(judge=judge), PROBLEMS)["enc"].values()) == {0.0}
    assert sim_costs(load_topology(resolve_topology("heterogeneous")).with_overrides(model=SIM), PROBLEMS) is None


def test_longest_path_of_a_chain_is_its_sum():
    topo = load_topology(resolve_topology("progressive_refinement"))
    cost = {a: float(i + 1) for i, a in enumerate(topo.agents)}
    assert longest_path(topo, cost) == pytest.approx(sum(cost.values()))  # a chain: every agent on the path


def test_bound_imports_no_ray_or_torch():
    code = ("import sys, kvjudge.topologies.bound\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'ray')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_with_overrides_changes_only_what_it_is_asked():
    topo = load_topology(resolve_topology("heterogeneous"))
    assert topo.with_overrides() is topo
    new = topo.with_overrides(model=SIM, judge={"output": "generate", "max_tokens": 32},
                              store={"budget_bytes": 1234}, agents={"reviewer": {"temperature": 0.5}})
    assert new.defaults.model == SIM and topo.defaults.model == "smollm2-135m"
    assert (new.judge.method, new.judge.output, new.judge.max_tokens) == (topo.judge.method, "generate", 32)
    assert new.store.budget_bytes == 1234 and new.store.eviction == topo.store.eviction
    assert new.agents["reviewer"].temperature == 0.5 and new.agents["reviewer"].model == "tiny-llama"
    assert [new.agents[a] for a in topo.agents if a != "reviewer"] == [topo.agents[a] for a in topo.agents
                                                                        if a != "reviewer"]
    assert new.source == topo.source and new.line_of("judge") == topo.line_of("judge")
    assert topo.judge.output == "label" and topo.store.budget_bytes != 1234  # the original is untouched
    replaced = topo.with_overrides(judge=JudgeSpec(method="dense", candidate_kv="agent"))
    assert replaced.judge == JudgeSpec(method="dense", candidate_kv="agent")
    with pytest.raises(KeyError, match="no agent 'nobody'"):
        topo.with_overrides(agents={"nobody": {"seed": 1}})
