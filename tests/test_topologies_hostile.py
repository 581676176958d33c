"""Hostile topology files (issue 13, input checks): every one is refused at validate time with one
line ``FILE:LINE: key.path: problem (got VALUE)``, fast, without building what it asks for.

Each fixture is named after the attack it replays; valid counterparts show the check is not a blanket ban.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvjudge.cache.compress.catalog import COMPRESSION_METHODS
from kvjudge.topologies import checks, loader
from kvjudge.topologies.loader import load_topology, load_topology_text, resolve_topology, validate_file
from kvjudge.topologies.schema import (
    MAX_CANDIDATES,
    MAX_NEW_TOKENS,
    MAX_ROUNDS,
    TopologyError,
    is_safe_name,
    safe_name,
)

from helpers import TWO_AGENTS

BASE = TWO_AGENTS


def refused(text: str, tmp_path: Path | None = None) -> str:
    """The one-line error for ``text`` (through a file when ``tmp_path`` is given)."""
    with pytest.raises(TopologyError) as info:
        if tmp_path is None:
            load_topology_text(text)
        else:
            path = tmp_path / "hostile.yaml"
            path.write_text(text)
            validate_file(path)
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert msg.startswith(str(tmp_path / "hostile.yaml") if tmp_path else "<string>"), msg
    return msg


def line_of(msg: str) -> int | None:
    head = msg.split(": ", 1)[0]
    return int(head.rsplit(":", 1)[1]) if head.rsplit(":", 1)[-1].isdigit() else None


def with_judge(extra: str) -> str:
    return BASE.replace("  method: naive\n", "  method: naive\n" + extra)


# ---------------------------------------------------------------- YAML bombs and nesting


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    text = "l0: &l0 [" + ", ".join(['"lol"'] * width) + "]\n"
    for i in range(1, levels + 1):
        text += f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]\n"
    return text


def test_billion_laughs_fails_fast_without_building(tmp_path):
    start = time.perf_counter()
    msg = refused(billion_laughs(), tmp_path)
    elapsed = time.perf_counter() - start
    assert "YAML refused" in msg and "aliases are expanded" in msg
    assert elapsed < 1.0, elapsed
    # it stops at the first level whose expansion passes the cap, not at the last one
    expanded = [sum(10 ** k for k in range(1, i + 2)) for i in range(10)]  # nodes once level i is done
    first_over = next(i for i, n in enumerate(expanded) if sum(expanded[: i + 1]) > loader.MAX_YAML_NODES)
    assert line_of(msg) <= first_over + 1


def test_merge_key_bomb_is_counted_too():
    text = "a: &a {x: 1, y: 2, z: 3, w: 4}\n"
    for i in range(1, 12):
        text += f"m{i}: &m{i} {{<<: [" + ", ".join([f"*{'a' if i == 1 else f'm{i - 1}'}"] * 8) + "]}\n"
    assert "YAML refused" in refused(text)


@pytest.mark.parametrize("text", [
    "[" * 5000 + "]" * 5000,
    "a: " + "{b: " * 5000 + "1" + "}" * 5000,
    "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "v",
    "- " * 5000 + "x",
], ids=["brackets", "flow-mappings", "block-mappings", "block-sequences"])
def test_deep_nesting_is_one_line_not_recursion_error(text):
    msg = refused(text)
    assert f"nested deeper than {loader.MAX_YAML_DEPTH} levels" in msg


def test_nesting_up_to_the_cap_is_parsed():
    # inside judge.options the structure reaches the option check, not a YAML cap
    # depth: top mapping, judge, options, then the lists, then the scalar
    deep = "[" * (loader.MAX_YAML_DEPTH - 4) + "1" + "]" * (loader.MAX_YAML_DEPTH - 4)
    msg = refused(BASE.replace("method: naive", "method: random_gate\n  options: {seed: " + deep + "}"))
    assert "judge.options.seed:" in msg and "YAML refused" not in msg
    assert "nested deeper" in refused(BASE.replace("method: naive", "method: random_gate\n  options: {seed: ["
                                                   + deep + "]}"))


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "a: &a {b: {c: *a}}\n"], ids=["list", "mapping"])
def test_recursive_alias_is_refused(text):
    assert "recursive alias" in refused(text)


def test_too_many_aliases():
    text = "x: &x 1\nl: [" + ", ".join(["*x"] * (loader.MAX_YAML_ALIASES + 1)) + "]\n"
    assert f"more than {loader.MAX_YAML_ALIASES} aliases" in refused(text)


def test_flat_list_with_too_many_values_fails_fast():
    start = time.perf_counter()
    msg = refused("l: [" + "1," * 200_000 + "]\n")
    assert "aliases are expanded" in msg and time.perf_counter() - start < 2.0


def test_input_size_cap(tmp_path):
    big = "x: " + "a" * (loader.MAX_TOPOLOGY_BYTES + 1) + "\n"
    assert "larger than" in refused(big)
    assert "larger than" in refused(big, tmp_path)
    # multi-byte text is measured in bytes, not characters
    assert "larger than" in refused("x: " + "é" * (loader.MAX_TOPOLOGY_BYTES // 2 + 1) + "\n")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_endless_file_is_capped():
    with pytest.raises(TopologyError, match="larger than"):
        load_topology("/dev/zero")  # read capped, not forever
    with pytest.raises(TopologyError, match="is a special file, not a topology file"):
        resolve_topology("/dev/zero")


def test_directory_is_not_a_topology(tmp_path):
    with pytest.raises(TopologyError, match="is a directory"):
        resolve_topology(str(tmp_path))
    with pytest.raises(TopologyError, match="is a directory"):
        load_topology(tmp_path)


def test_int_beyond_python_digit_limit():
    msg = refused(BASE + "rounds: " + "9" * 5000 + "\n")
    assert "YAML value cannot be read" in msg and line_of(msg) == 13


def test_unsafe_tags_and_unhashable_keys():
    assert "could not determine a constructor" in refused(BASE + "x: !!python/object/apply:os.system [id]\n")
    assert "unhashable key" in refused("? [a]\n: 1\n")


def test_legitimate_anchors_and_merge_keys_still_work():
    topo = load_topology_text("""\
defaults: &d {temperature: 0.5, max_new_tokens: 7}
agents:
  a: {<<: *d, role: solver, prompt: &p "Solve: {problem}"}
  b: {<<: *d, role: checker, temperature: 0.1, prompt: *p}
edges: []
judge: {method: naive}
""")
    a, b = topo.agent_spec("a"), topo.agent_spec("b")
    assert a.prompt == b.prompt == "Solve: {problem}"
    assert (a.temperature, a.max_new_tokens) == (0.5, 7)
    assert (b.temperature, b.max_new_tokens) == (0.1, 7)  # the explicit key overrides the merged one
    assert topo.line_of("agents", "b", "temperature") == 4


# ---------------------------------------------------------------- templates, field by field


@pytest.mark.parametrize("template, words", [
    ("{problem!r}", "conversion !r"),
    ("{problem!z}", "conversion !z"),
    ("{problem!s:>3}", "conversion !s"),
    ("{problem:>10}", "format spec :>10"),
    ("{problem:>99999999}", "format spec :>99999999"),
    ("{problem:>{problem}}", "nested field :>{problem}"),
    ("{problem.__class__}", "attribute or index access"),
    ("{problem[0]}", "attribute or index access"),
    ("{}", "positional template field {}"),
    ("{0}", "positional template field {0}"),
    ("{problm}", "unknown template field {problm}"),
    ("{problem", "bad template"),
    ("}", "bad template"),
])
def test_template_fields_are_parsed_one_by_one(template, words):
    msg = refused(BASE.replace("Solve: {problem}", "Solve: " + template))
    assert msg.startswith("<string>:5: agents.a.prompt: "), msg
    assert words in msg


def test_bare_fields_and_escaped_braces_are_allowed():
    topo = load_topology_text(BASE.replace("Solve: {problem}", "Solve {{json}}: {problem} {{ }}"))
    filled = topo.agents["a"].prompt.format(problem="P {x}", previous="")
    assert filled == "Solve {json}: P {x} { }"  # the problem's own braces stay text


# ---------------------------------------------------------------- agent ids and names


@pytest.mark.parametrize("agent_id", ["a1\n", "a1\r", "1a", "a b", "a/b", "a" * 65, "é"])
def test_bad_agent_ids(agent_id):
    text = BASE.replace("  a:\n", f"  {agent_id!r}:\n".replace("'", '"')).replace(
        "source: a,", f"source: {agent_id!r},".replace("'", '"'))
    msg = refused(text)
    assert "agent id must be" in msg


def test_longest_agent_id_is_fine():
    topo = load_topology_text(BASE.replace("  a:\n", "  " + "a" * 64 + ":\n").replace("source: a,",
                                                                                      "source: " + "a" * 64 + ","))
    assert "a" * 64 in topo.agents


@pytest.mark.parametrize("name", ["/etc/passwd", "../up", "..", ".", "a/b", "a b", "", "x\ny", "a" * 101])
def test_unsafe_names_are_refused(name):
    msg = refused(BASE.replace("name: t", f"name: {name!r}".replace("'", '"').replace("\n", "\\n")))
    assert msg.startswith("<string>:1: name: ")
    assert not is_safe_name(name)


@pytest.mark.parametrize("name", ["t", "my-topo_v1.2", ".hidden", "a" * 100])
def test_safe_names_are_kept(name):
    assert load_topology_text(BASE.replace("name: t", f"name: {name!r}")).name == name


def test_default_name_from_an_unsafe_file_stem_is_sanitised(tmp_path):
    path = tmp_path / "my topo;rm -rf.yaml"
    path.write_text(BASE.replace("name: t\n", ""))
    assert load_topology(path).name == "my_topo_rm_-rf"
    assert safe_name("..") == "topology" and safe_name("a/b") == "a_b" and is_safe_name(safe_name("x" * 500))


def test_control_characters_in_a_path_are_escaped():
    with pytest.raises(TopologyError) as info:
        load_topology("bad\x00name\x1b[31m")
    assert "\x00" not in str(info.value) and "\x1b" not in str(info.value)
    with pytest.raises(TopologyError):
        resolve_topology("x" * 5000)  # ENAMETOOLONG is "no such file", not an OSError


# ---------------------------------------------------------------- upper bounds


@pytest.mark.parametrize("extra, path, got", [
    ("defaults: {max_new_tokens: 1000000000000}\n", "defaults.max_new_tokens", "1000000000000"),
    (f"defaults: {{max_new_tokens: {MAX_NEW_TOKENS + 1}}}\n", "defaults.max_new_tokens", str(MAX_NEW_TOKENS + 1)),
    ("rounds: 1000000000\n", "rounds", "1000000000"),
    (f"rounds: {MAX_ROUNDS + 1}\n", "rounds", str(MAX_ROUNDS + 1)),
    ("resources: {agent_num_cpus: .inf}\n", "resources.agent_num_cpus", "inf"),
    ("resources: {agent_num_cpus: .nan}\n", "resources.agent_num_cpus", "nan"),
    ("resources: {agent_num_cpus: 1000000}\n", "resources.agent_num_cpus", "1000000"),
    ("resources: {judge_num_gpus: .inf}\n", "resources.judge_num_gpus", "inf"),
    ("resources: {judge_num_gpus: -1}\n", "resources.judge_num_gpus", "-1"),
    ("resources: {judge_num_gpus: 4096}\n", "resources.judge_num_gpus", "4096"),
    ("store: {budget_bytes: 2000000000000000000}\n", "store.budget_bytes", "2000000000000000000"),
    ("store: {budget_bytes: 0}\n", "store.budget_bytes", "0"),
    ("defaults: {seed: 18446744073709551616}\n", "defaults.seed", "18446744073709551616"),
    ("defaults: {seed: -1}\n", "defaults.seed", "-1"),
    ("defaults: {temperature: 11}\n", "defaults.temperature", "11"),
    ("defaults: {temperature: .inf}\n", "defaults.temperature", "inf"),
    ("defaults: {temperature: .nan}\n", "defaults.temperature", "nan"),
    ("defaults: {model: ''}\n", "defaults.model", "''"),
])
def test_upper_bounds(extra, path, got):
    msg = refused(BASE + extra)
    assert msg.startswith(f"<string>:13: {path}: "), msg
    assert f"(got {got}" in msg


def test_agent_level_bounds_and_prompt_length():
    for key, value in (("max_new_tokens", 10 ** 12), ("temperature", 1e300), ("seed", 2 ** 64)):
        msg = refused(BASE.replace("    role: solver\n", f"    role: solver\n    {key}: {value}\n"))
        assert f"agents.a.{key}:" in msg
    msg = refused(BASE.replace("Solve: {problem}", "x" * 70_000 + "{problem}"))
    assert "agents.a.prompt:" in msg and "65536 characters" in msg and len(msg) < 400


def test_bounds_are_inclusive():
    topo = load_topology_text(BASE + f"rounds: {MAX_ROUNDS}\ndefaults: {{max_new_tokens: {MAX_NEW_TOKENS}, "
                              "temperature: 10, seed: 9223372036854775807}\n"
                              "store: {budget_bytes: 1125899906842624}\nresources: {agent_num_cpus: 1024}\n")
    assert (topo.rounds, topo.defaults.max_new_tokens, topo.defaults.seed) == (MAX_ROUNDS, MAX_NEW_TOKENS, 2 ** 63 - 1)
    assert topo.store.budget_bytes == 2 ** 50


def agents_yaml(n: int) -> str:
    body = "".join(f"  a{i}: {{role: r, prompt: 'Solve: {{problem}}'}}\n" for i in range(n))
    return "agents:\n" + body + "edges: []\njudge: {method: dense}\n"


def test_candidate_count_is_bounded_by_the_label_limit():
    assert MAX_CANDIDATES == 9  # labels "1".."9"
    assert len(load_topology_text(agents_yaml(MAX_CANDIDATES)).agents) == MAX_CANDIDATES
    msg = refused(agents_yaml(MAX_CANDIDATES + 1))
    assert msg.startswith("<string>:1: agents: too many agents") and f"(got {MAX_CANDIDATES + 1})" in msg


@pytest.mark.parametrize("options, words", [
    ("{arm: [naive, kvcomm]}", "must be a string, number, boolean or null"),
    ("{arm: {x: 1}}", "must be a string, number, boolean or null"),
    ("{coverage: 2}", "must be a number in [0, 1]"),
    ("{coverage: .nan}", "finite"),
    ("{seed: -3}", "must be an integer in"),
    ("{seed: 99999999999999999999999}", "64-bit"),
])
def test_judge_option_values_are_scalars_within_bounds(options, words):
    msg = refused(BASE.replace("method: naive", f"method: random_gate\n  options: {options}"))
    assert "judge.options." in msg and words in msg


# ---------------------------------------------------------------- new keys: candidate_kv, output, replicas, compress


def test_new_key_defaults_keep_todays_behaviour():
    topo = load_topology_text(BASE)
    assert topo.judge.candidate_kv == "judge_prefix"
    assert (topo.judge.output, topo.judge.max_tokens) == ("label", 256)
    assert topo.resources.agent_replicas == 1
    assert topo.store.compress is None


def test_new_keys_accept_their_values():
    for mode in ("agent", "isolated", "judge_prefix"):
        assert load_topology_text(with_judge(f"  candidate_kv: {mode}\n")).judge.candidate_kv == mode
    judge = load_topology_text(with_judge("  output: generate\n  max_tokens: 4096\n")).judge
    assert (judge.output, judge.max_tokens) == ("generate", 4096)
    judge = load_topology_text(with_judge("  max_tokens: 1\n")).judge  # kept for a command-line switch
    assert (judge.output, judge.max_tokens) == ("label", 1)
    for replicas in ("auto", 1, 256):
        assert load_topology_text(BASE + f"resources: {{agent_replicas: {replicas}}}\n").resources.agent_replicas \
            == replicas
    for method in checks.COMPRESSION_METHODS:
        store = load_topology_text(BASE + f"store: {{compress: {{method: {method}, ratio: 0.25}}}}\n").store
        assert (store.compress.method, store.compress.ratio) == (method, 0.25)
    assert load_topology_text(BASE + "store: {compress: {method: snapkv, ratio: 1}}\n").store.compress.ratio == 1.0


@pytest.mark.parametrize("extra, path, words", [
    ("  candidate_kv: agnt\n", "judge.candidate_kv", "'agent', 'isolated' or 'judge_prefix'"),
    ("  output: text\n", "judge.output", "'label' or 'generate'"),
    ("  max_tokens: 4097\n", "judge.max_tokens", "less than or equal to 4096"),
    ("  output: generate\n  max_tokens: 0\n", "judge.max_tokens", "greater than or equal to 1"),
    ("  output: generate\n  max_tokens: 4097\n", "judge.max_tokens", "less than or equal to 4096"),
])
def test_judge_mode_keys_are_checked(extra, path, words):
    msg = refused(with_judge(extra))
    assert f": {path}: " in msg and words in msg


@pytest.mark.parametrize("extra, path, words", [
    ("resources: {agent_replicas: 0}\n", "resources.agent_replicas", "[1, 256]"),
    ("resources: {agent_replicas: 257}\n", "resources.agent_replicas", "[1, 256]"),
    ("resources: {agent_replicas: 2.5}\n", "resources.agent_replicas", "integer"),
    ("resources: {agent_replicas: true}\n", "resources.agent_replicas", "integer"),
    ("resources: {agent_replicas: many}\n", "resources.agent_replicas", "'auto'"),
    ("store: {compress: {method: snapk, ratio: 0.5}}\n", "store.compress.method", "did you mean 'snapkv'"),
    ("store: {compress: {method: snapkv, ratio: 0}}\n", "store.compress.ratio", "greater than 0"),
    ("store: {compress: {method: snapkv, ratio: 1.5}}\n", "store.compress.ratio", "less than or equal to 1"),
    ("store: {compress: {method: snapkv, ratio: .nan}}\n", "store.compress.ratio", "finite"),
    ("store: {compress: {method: snapkv}}\n", "store.compress.ratio", "missing required key"),
    ("store: {compress: {method: snapkv, ratio: 0.5, keep: 3}}\n", "store.compress.keep", "unknown key"),
])
def test_replicas_and_compress_are_checked(extra, path, words):
    msg = refused(BASE + extra)
    assert f": {path}: " in msg and words in msg
    assert line_of(msg) == 13


def test_compression_methods_come_from_the_torch_free_catalog():
    assert checks.COMPRESSION_METHODS is COMPRESSION_METHODS and "none" in COMPRESSION_METHODS


# ---------------------------------------------------------------- validate stays light


def test_validate_imports_no_torch_transformers_or_ray():
    code = (
        "import sys\n"
        "from kvjudge.topologies import load_topology, resolve_topology\n"
        "load_topology(resolve_topology('progressive_refinement'))\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'ray'}))\n"
    )
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", " <- ".join(importers(out.stderr, ("torch", "transformers", "ray")))


def importers(importtime: str, heavy: tuple[str, ...]) -> list[str]:
    """From ``-X importtime`` output: the first heavy module and the chain of modules that imported it."""
    names = [line.split("|")[-1] for line in importtime.splitlines() if line.startswith("import time:")]
    start = next((i for i, n in enumerate(names) if n.strip() in heavy), None)
    if start is None:
        return []
    chain, indent = [], len(names[start]) - len(names[start].lstrip())
    for name in names[start:]:  # a parent finishes after its children, less indented
        depth = len(name) - len(name.lstrip())
        if not chain or depth < indent:
            chain.append(name.strip())
            indent = depth
    return chain


def test_every_attack_is_a_value_error_not_a_crash():
    attacks = [billion_laughs(), "[" * 5000, "a: &a [*a]", BASE.replace("{problem}", "{problem!z}"),
               BASE + "resources: {agent_num_cpus: .inf}\n", "\x00", "\ufeff\ufeff: 1", "- !!binary 'x'"]
    for text in attacks:
        with pytest.raises(ValueError) as info:
            load_topology_text(text + "\n")
        assert isinstance(info.value, TopologyError) and "\n" not in str(info.value)
    assert math.isfinite(load_topology_text(BASE).resources.agent_num_cpus)
