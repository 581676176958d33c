"""Topology YAML -> validated objects -> graphs, and the one-line errors for every schema rule."""

from __future__ import annotations

import re
from pathlib import Path

import networkx as nx
import pytest

from kvjudge.judges.catalog import method_options
from kvjudge.judges.methods import known_methods
from kvjudge.topologies.loader import (
    build_graph,
    builtin_topology,
    generations,
    load_topology,
    resolve_topology,
    validate_file,
)
from kvjudge.topologies.schema import TopologyError

from helpers import TWO_AGENTS

BASE = TWO_AGENTS


def write(tmp_path: Path, text: str, name: str = "topo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_for(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(TopologyError) as info:
        validate_file(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(str(path)), msg
    return msg


def line_of(msg: str) -> int | None:
    m = re.match(r"^.*?\.yaml:(\d+): ", msg)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------- shipped topologies


def test_progressive_refinement_is_a_chain():
    topo = validate_file(builtin_topology("progressive_refinement"))
    graph = build_graph(topo)
    assert sorted(graph.edges) == [("a1", "a2"), ("a2", "a3"), ("a3", "a4")]
    assert generations(graph) == [["a1"], ["a2"], ["a3"], ["a4"]]
    assert topo.judge.method == "dg_jkr"
    assert topo.rounds == 1
    assert "{previous}" not in topo.agents["a1"].prompt
    assert all("{previous}" in topo.agents[a].prompt for a in ("a2", "a3", "a4"))


def test_debate_is_parallel_with_two_rounds():
    topo = validate_file(builtin_topology("debate.yaml"))
    graph = build_graph(topo)
    assert topo.rounds == 2
    assert graph.number_of_edges() == 0
    assert 3 <= graph.number_of_nodes() <= 4
    assert generations(graph) == [sorted(topo.agents)]
    assert topo.judge.method == "dg_jkr"
    assert all("{previous}" in spec.prompt for spec in topo.agents.values())


def test_heterogeneous_dag_and_model_override():
    topo = validate_file(builtin_topology("heterogeneous"))
    graph = build_graph(topo)
    assert generations(graph) == [["planner"], ["coder", "reviewer"], ["finalizer"]]
    models = {a: graph.nodes[a]["spec"].model for a in graph.nodes}
    assert models["reviewer"] == "tiny-llama"
    assert {m for a, m in models.items() if a != "reviewer"} == {topo.defaults.model}
    assert len({spec.role for spec in topo.agents.values()}) == 4
    assert topo.judge.method in ("naive", "random_gate")
    if topo.judge.method == "random_gate":
        assert 0 <= topo.judge.coverage <= 1
        assert topo.judge.method_kwargs()["coverage"] == topo.judge.coverage


def test_builtin_lookup_and_resolution(tmp_path):
    assert builtin_topology("debate") == builtin_topology("debate.yaml")
    assert builtin_topology("debate").is_file()
    assert resolve_topology("debate") == builtin_topology("debate")
    own = write(tmp_path, BASE)
    assert resolve_topology(str(own)) == own
    with pytest.raises(TopologyError, match="did you mean 'debate'"):
        builtin_topology("debat")
    with pytest.raises(TopologyError, match="shipped: debate, heterogeneous, progressive_refinement"):
        resolve_topology(str(tmp_path / "nope.yaml"))


# ---------------------------------------------------------------- resolved specs and defaults


def test_defaults_fill_agent_specs(tmp_path):
    text = BASE.replace("name: t\n", "") + (
        "defaults:\n  model: tiny-llama\n  temperature: 0.5\n  max_new_tokens: 7\n  seed: 9\n"
    )
    text = text.replace('    role: solver\n', '    role: solver\n    temperature: 0.1\n    model: tiny-qwen2\n')
    topo = load_topology(write(tmp_path, text, "my_topo.yaml"))
    assert topo.name == "my_topo"  # default name: the file stem
    a, b = topo.agent_spec("a"), topo.agent_spec("b")
    assert (a.model, a.temperature, a.max_new_tokens, a.seed) == ("tiny-qwen2", 0.1, 7, 9)
    assert (b.model, b.temperature, b.max_new_tokens, b.seed) == ("tiny-llama", 0.5, 7, 9)
    assert topo.agents["b"].model is None  # the raw spec keeps the override-or-None
    graph = build_graph(topo)
    assert graph.nodes["b"]["spec"] == b


def test_top_level_defaults(tmp_path):
    topo = load_topology(write(tmp_path, BASE))
    assert topo.name == "t"
    assert topo.rounds == 1
    assert topo.defaults.model == "smollm2-135m"
    assert topo.defaults.max_new_tokens == 128
    assert topo.store.budget_bytes == 2_000_000_000 and topo.store.eviction == "lru"
    assert topo.resources.judge_num_gpus == "auto" and topo.resources.agent_num_cpus == 1
    assert topo.resources.judge_resource is None


def test_text_input():
    topo = load_topology(BASE)
    assert topo.source == "<string>"
    assert list(topo.agents) == ["a", "b"]


# ---------------------------------------------------------------- one-line errors


def test_unknown_key_has_did_you_mean_and_line(tmp_path):
    msg = error_for(tmp_path, BASE.replace('    role: refiner\n', '    role: refiner\n    temprature: 0.2\n'))
    assert "agents.b.temprature: unknown key" in msg
    assert "did you mean 'temperature'" in msg
    assert line_of(msg) == 8


def test_unknown_top_level_key(tmp_path):
    msg = error_for(tmp_path, BASE + "roundz: 2\n")
    assert "roundz: unknown key" in msg and "did you mean 'rounds'" in msg
    assert line_of(msg) == 13


def test_missing_required_key(tmp_path):
    msg = error_for(tmp_path, BASE.replace("judge:\n  method: naive\n", ""))
    assert ": judge: missing required key" in msg
    msg = error_for(tmp_path, BASE.replace('    role: solver\n', ''))
    assert "agents.a.role: missing required key" in msg
    assert line_of(msg) == 3


def test_wrong_type(tmp_path):
    msg = error_for(tmp_path, BASE.replace('    role: solver\n', '    role: solver\n    max_new_tokens: many\n'))
    assert "agents.a.max_new_tokens:" in msg and "integer" in msg and "(got 'many')" in msg
    assert line_of(msg) == 5
    msg = error_for(tmp_path, BASE.replace('    role: solver\n', '    role: solver\n    temperature: -0.5\n'))
    assert "agents.a.temperature:" in msg and "(got -0.5)" in msg
    msg = error_for(tmp_path, BASE.replace("edges:\n  - {source: a, target: b}\n", "edges: {source: a}\n"))
    assert "edges:" in msg and "list" in msg


def test_bad_method_lists_known(tmp_path):
    msg = error_for(tmp_path, BASE.replace("method: naive", "method: dgjkr"))
    assert "judge.method: unknown judge method" in msg
    assert "known: " + ", ".join(known_methods()) in msg
    assert "did you mean 'dg_jkr'" in msg
    assert "(got 'dgjkr')" in msg
    assert line_of(msg) == 12


def test_judge_options_are_checked(tmp_path):
    msg = error_for(tmp_path, BASE.replace("method: naive", "method: naive\n  coverage: 0.5"))
    assert "judge.coverage:" in msg
    msg = error_for(tmp_path, BASE.replace("method: naive", "method: random_gate\n  coverage: 1.5"))
    assert "judge.coverage:" in msg and "(got 1.5)" in msg
    option = next(o for o in method_options("random_gate") if o not in ("coverage", "seed"))  # read the catalog
    typo = option + "x"
    msg = error_for(tmp_path, BASE.replace("method: naive", f"method: random_gate\n  options: {{{typo}: naive}}"))
    assert f"judge.options.{typo}: unknown option" in msg and f"did you mean {option!r}" in msg
    ok = load_topology(write(tmp_path, BASE.replace("method: naive", "method: random_gate\n  coverage: 0.3\n  seed: 4")))
    assert ok.judge.method_kwargs() == {"coverage": 0.3, "seed": 4}


def test_rounds_below_one(tmp_path):
    msg = error_for(tmp_path, BASE + "rounds: 0\n")
    assert "rounds:" in msg and "(got 0)" in msg
    assert line_of(msg) == 13


def test_edge_to_unknown_agent(tmp_path):
    msg = error_for(tmp_path, BASE.replace("target: b}", "target: bb}"))
    assert "edges[0].target: unknown agent" in msg and "did you mean 'b'" in msg and "(got 'bb')" in msg
    assert line_of(msg) == 10


def test_self_loop(tmp_path):
    msg = error_for(tmp_path, BASE.replace("target: b}", "target: a}"))
    assert "edges[0]: self-loop" in msg
    assert line_of(msg) == 10


def test_duplicate_edge(tmp_path):
    msg = error_for(tmp_path, BASE.replace("  - {source: a, target: b}\n", "  - {source: a, target: b}\n" * 2))
    assert "edges[1]: duplicate edge" in msg
    assert line_of(msg) == 11


def test_cycle_names_its_nodes(tmp_path):
    text = BASE.replace(
        "  - {source: a, target: b}\n",
        "  - {source: a, target: b}\n  - {source: b, target: c}\n  - {source: c, target: a}\n",
    ).replace("edges:", "  c:\n    role: x\n    prompt: \"{previous}\"\nedges:")
    msg = error_for(tmp_path, text)
    assert "cycle" in msg
    cycle = msg.split("cycle:")[1]
    assert all(node in cycle for node in ("a", "b", "c"))
    assert line_of(msg) is not None


def test_unknown_template_field(tmp_path):
    msg = error_for(tmp_path, BASE.replace("Solve: {problem}", "Solve: {problm}"))
    assert "agents.a.prompt: unknown template field {problm}" in msg
    assert "'a'" in msg and "did you mean 'problem'" in msg
    assert line_of(msg) == 5
    msg = error_for(tmp_path, BASE.replace("Solve: {problem}", "Solve: {problem"))
    assert "agents.a.prompt: bad template" in msg


def test_previous_needs_a_source(tmp_path):
    msg = error_for(tmp_path, BASE.replace("Solve: {problem}", "Solve: {problem} {previous}"))
    assert "agents.a.prompt:" in msg and "never filled" in msg
    load_topology(write(tmp_path, BASE.replace("Solve: {problem}", "Solve: {problem} {previous}") + "rounds: 2\n"))


def test_yaml_syntax_error(tmp_path):
    msg = error_for(tmp_path, BASE.replace("  - {source: a, target: b}", "  - {source: a, target: b"))
    assert "YAML syntax error" in msg
    assert line_of(msg) is not None and 10 <= line_of(msg) <= 12


def test_empty_file_and_non_mapping_and_missing(tmp_path):
    msg = error_for(tmp_path, "\n# nothing here\n")
    assert msg.endswith("empty topology file")
    msg = error_for(tmp_path, "- a\n- b\n")
    assert "top level must be a mapping" in msg and line_of(msg) == 1
    with pytest.raises(TopologyError, match="no such topology file"):
        load_topology(tmp_path / "missing.yaml")


def test_duplicate_yaml_key(tmp_path):
    msg = error_for(tmp_path, BASE + "judge:\n  method: dense\n")
    assert "judge: duplicate key" in msg and line_of(msg) == 13


def test_bad_agent_id_and_no_agents(tmp_path):
    msg = error_for(tmp_path, BASE.replace("  b:\n", "  b c:\n").replace("target: b}", "target: b c}"))
    assert "agents.b c: agent id" in msg
    msg = error_for(tmp_path, "agents: {}\nedges: []\njudge: {method: naive}\n")
    assert "agents: at least one agent" in msg


def test_error_is_a_value_error():
    assert issubclass(TopologyError, ValueError)
    graph = build_graph(load_topology(BASE))
    assert isinstance(graph, nx.DiGraph)


def test_content_free_with_generated_answers_is_refused_where_written(tmp_path):
    """content_free debiasing needs label scores: in a file it names judge.debias; as a run override
    (--judge-debias content_free --judge-output generate) it is one line, before any actor starts."""
    msg = error_for(tmp_path, BASE.replace("judge:\n  method: naive\n",
                                           "judge:\n  method: naive\n  output: generate\n  debias: content_free\n"))
    assert "judge.debias: content_free needs judge.output: label" in msg and "(got 'content_free')" in msg
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "kvjudge.app.cli", "run", str(write(tmp_path, BASE, "ok.yaml")),
                           "--problems", str(write(tmp_path, '{"id": "p", "prompt": "x"}\n', "p.jsonl")),
                           "--judge-debias", "content_free", "--judge-output", "generate", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "content_free needs label output" in proc.stderr and not (tmp_path / "o").exists()
