"""Read topology YAML into a validated :class:`Topology` and turn it into a ``networkx`` graph.

Every problem (missing file, YAML syntax, schema, graph) raises :class:`TopologyError` with a
one-line ``FILE:LINE: key.path: problem (got VALUE)`` message.
"""

from __future__ import annotations

import difflib
import string
import typing
from pathlib import Path

import networkx as nx
import yaml
from pydantic import BaseModel, ValidationError

from kvjudge.cache.eviction import EVICTION_POLICIES
from kvjudge.judges.catalog import METHOD_ORDER

from kvjudge.topologies.schema import (
    AGENT_ID_RE,
    TEMPLATE_FIELDS,
    Topology,
    TopologyError,
    format_path,
    lookup_line,
    method_params,
)

BUILTIN_DIR = Path(__file__).resolve().parent
BUILTIN_NAMES = ("debate", "heterogeneous", "progressive_refinement")


# ---------------------------------------------------------------- public API


def load_topology(path_or_text: str | Path) -> Topology:
    """Load and validate a topology from a file path (``str`` without a newline, or ``Path``),
    or from YAML text (a ``str`` containing a newline). ``name`` defaults to the file stem."""
    if isinstance(path_or_text, Path) or "\n" not in str(path_or_text):
        path = Path(path_or_text)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TopologyError("no such topology file", file=source) from None
        except IsADirectoryError:
            raise TopologyError("is a directory, not a topology file", file=source) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TopologyError(f"cannot read topology file: {exc}", file=source) from None
        return load_topology_text(text, source=source, default_name=path.stem)
    return load_topology_text(str(path_or_text))


def load_topology_text(text: str, *, source: str = "<string>", default_name: str = "topology") -> Topology:
    """Validate YAML ``text``; ``source`` names it in error messages."""
    data, lines = _parse_yaml(text, source)
    if data is None:
        raise TopologyError("empty topology file", file=source)
    if not isinstance(data, dict):
        raise TopologyError("top level must be a mapping with agents, edges and judge",
                            file=source, line=lines.get(()), got=data)
    try:
        topo = Topology.model_validate(data)
    except ValidationError as exc:
        raise _translate(exc, source, lines) from None
    topo._source = source
    topo._lines = lines
    if topo.name is None:
        topo.name = default_name
    _check_semantics(topo)
    return topo


def build_graph(topology: Topology) -> nx.DiGraph:
    """A DiGraph with agent ids as nodes (attribute ``spec``: the resolved :class:`AgentSpec`,
    ``role``) and one edge per topology edge. Rejects cycles."""
    graph = nx.DiGraph(name=topology.name, rounds=topology.rounds)
    for agent_id in topology.agents:
        spec = topology.agent_spec(agent_id)
        graph.add_node(agent_id, spec=spec, role=spec.role)
    for edge in topology.edges:
        graph.add_edge(edge.source, edge.target)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return graph
    nodes = [u for u, _v in cycle]
    index = next(i for i, e in enumerate(topology.edges) if (e.source, e.target) == tuple(cycle[-1]))
    raise topology.error(("edges", index), f"edges form a cycle: {' -> '.join(nodes + [nodes[0]])}")


def generations(graph: nx.DiGraph) -> list[list[str]]:
    """Agents grouped by topological generation (each group sorted): agents in one group can run together."""
    return [sorted(gen) for gen in nx.topological_generations(graph)]


def validate_file(path: str | Path) -> Topology:
    """Load ``path`` and build its graph; raises :class:`TopologyError` on any problem."""
    topo = load_topology(Path(path))
    build_graph(topo)
    return topo


def builtin_names() -> list[str]:
    """Names of the shipped topologies."""
    return list(BUILTIN_NAMES)


def builtin_topology(name: str) -> Path:
    """Path of a shipped topology, by name with or without ``.yaml``."""
    stem = name[:-5] if name.endswith(".yaml") else name
    if stem not in BUILTIN_NAMES:
        hint = _hint(stem, BUILTIN_NAMES)
        raise TopologyError(f"no shipped topology {name!r}{hint}; shipped: {', '.join(BUILTIN_NAMES)}")
    return BUILTIN_DIR / f"{stem}.yaml"


def resolve_topology(arg: str | Path) -> Path:
    """A CLI argument -> topology file: an existing path wins, else a shipped name."""
    path = Path(arg)
    if path.is_file():
        return path
    stem = str(arg)[:-5] if str(arg).endswith(".yaml") else str(arg)
    if stem in BUILTIN_NAMES:
        return BUILTIN_DIR / f"{stem}.yaml"
    hint = _hint(stem, BUILTIN_NAMES)
    raise TopologyError(f"no such topology file or shipped topology{hint}; shipped: {', '.join(BUILTIN_NAMES)}",
                        file=str(arg))


# ---------------------------------------------------------------- YAML with line numbers


def _parse_yaml(text: str, source: str) -> tuple[object, dict]:
    """``(data, lines)`` where ``lines`` maps key paths (str keys, int indices) to 1-based lines."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        col = f" at column {mark.column + 1}" if mark else ""
        raise TopologyError(f"YAML syntax error: {what}{col}", file=source, line=line) from None
    except yaml.YAMLError as exc:
        raise TopologyError(f"YAML error: {exc}", file=source) from None
    lines: dict = {}
    if node is not None:
        lines[()] = node.start_mark.line + 1
        _record(node, (), lines, source)
    return data, lines


def _record(node: yaml.Node, path: tuple, lines: dict, source: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else repr(key.value)
            if name in seen and name != "<<":
                raise TopologyError("duplicate key", file=source, line=key.start_mark.line + 1,
                                    path=format_path(path + (name,)))
            seen.add(name)
            lines[path + (name,)] = key.start_mark.line + 1
            _record(value, path + (name,), lines, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _record(item, path + (i,), lines, source)


# ---------------------------------------------------------------- pydantic errors -> one line


def _translate(exc: ValidationError, source: str, lines: dict) -> TopologyError:
    raw = exc.errors()
    errors = [_convert(err, source, lines) for err in raw]
    order = sorted(range(len(errors)), key=lambda i: errors[i].line or 0)
    first = errors[order[0]]
    same = [errors[i] for i in order if errors[i].path == first.path and errors[i].line == first.line]
    if len(same) > 1:  # one value failing every member of a union: say what each wanted
        problems = list(dict.fromkeys(e.problem for e in same))
        got = raw[order[0]].get("input", ...)
        return TopologyError(" or ".join(problems), file=source, line=first.line, path=first.path, got=got)
    return first


def _convert(err: dict, source: str, lines: dict) -> TopologyError:
    path, model, key_error = _clean_loc(err["loc"])
    line = lookup_line(lines, path)
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = list(model.model_fields) if model is not None else []
        problem = f"unknown key {path[-1]!r}{_hint(str(path[-1]), allowed)}"
        if allowed:
            problem += f"; allowed: {', '.join(allowed)}"
        return TopologyError(problem, file=source, line=line, path=format_path(path))
    if kind == "missing":
        return TopologyError("missing required key", file=source, line=lookup_line(lines, path[:-1]),
                             path=format_path(path))
    if key_error:
        return TopologyError("keys must be strings", file=source, line=line, path=format_path(path),
                             got=err.get("input"))
    msg = err["msg"]
    msg = msg[0].lower() + msg[1:] if msg else kind
    return TopologyError(msg, file=source, line=line, path=format_path(path), got=err.get("input"))


def _clean_loc(loc: tuple) -> tuple[tuple, type | None, bool]:
    """Drop pydantic's union/key tags from ``loc``; return the key path, the model owning the last
    key (for extra-key hints) and whether the error is about a mapping key."""
    tp: object = Topology
    owner: type | None = None
    path: list = []
    for part in loc:
        if part == "[key]":
            return tuple(path), owner, True
        tp = _strip_optional(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            owner = tp
            path.append(part)
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                break
            tp = field.annotation
        elif typing.get_origin(tp) is dict:
            path.append(str(part))
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) is list:
            path.append(part)
            tp = typing.get_args(tp)[0]
        else:
            break  # a union member tag or a scalar: the path ends here
    return tuple(path), owner, False


def _strip_optional(tp: object) -> object:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _strip_optional(args[0])
    return tp


def _hint(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------- cross-field rules


def _check_semantics(topo: Topology) -> None:
    if not topo.agents:
        raise topo.error(("agents",), "at least one agent is required", got={})
    for agent_id in topo.agents:
        if not AGENT_ID_RE.match(agent_id):
            raise topo.error(("agents", agent_id),
                             "agent id must start with a letter or _ and use only letters, digits, _ and -",
                             got=agent_id)

    ids = list(topo.agents)
    seen: dict[tuple[str, str], int] = {}
    for i, edge in enumerate(topo.edges):
        for end in ("source", "target"):
            name = getattr(edge, end)
            if name not in topo.agents:
                raise topo.error(("edges", i, end), f"unknown agent{_hint(name, ids)}; agents: {', '.join(ids)}",
                                 got=name)
        if edge.source == edge.target:
            raise topo.error(("edges", i), "self-loop: an agent cannot feed itself", got=edge.source)
        pair = (edge.source, edge.target)
        if pair in seen:
            raise topo.error(("edges", i), f"duplicate edge (same as edges[{seen[pair]}])",
                             got=f"{edge.source} -> {edge.target}")
        seen[pair] = i

    has_upstream = {e.target for e in topo.edges}
    formatter = string.Formatter()
    for agent_id, spec in topo.agents.items():
        where = ("agents", agent_id, "prompt")
        try:
            parsed = list(formatter.parse(spec.prompt))
        except ValueError as exc:
            raise topo.error(where, f"bad template: {exc} (write literal braces as {{{{ and }}}})",
                             got=spec.prompt) from None
        for _literal, field, _spec, _conv in parsed:
            if field is None:
                continue
            if field not in TEMPLATE_FIELDS:
                raise topo.error(where, f"unknown template field {{{field}}} in agent {agent_id!r}"
                                        f"{_hint(field, TEMPLATE_FIELDS)}; known: {{problem}}, {{previous}}",
                                 got=field)
            if field == "previous" and agent_id not in has_upstream and topo.rounds == 1:
                raise topo.error(where, f"{{previous}} is never filled: agent {agent_id!r} has no incoming "
                                        "edges and rounds is 1", got=field)

    methods = list(METHOD_ORDER)
    judge = topo.judge
    if judge.method not in methods:
        raise topo.error(("judge", "method"),
                         f"unknown judge method{_hint(judge.method, methods)}; known: {', '.join(methods)}",
                         got=judge.method)
    params = method_params(judge.method)
    if judge.coverage is not None and "coverage" not in params:
        raise topo.error(("judge", "coverage"), f"coverage applies only to gate methods, not {judge.method!r}",
                         got=judge.coverage)
    for key in judge.options:
        if key not in params:
            known = ", ".join(params) if params else "none"
            raise topo.error(("judge", "options", key),
                             f"unknown option for {judge.method!r}{_hint(key, params)}; known: {known}", got=key)

    if topo.store.eviction not in EVICTION_POLICIES:
        known = sorted(EVICTION_POLICIES)
        raise topo.error(("store", "eviction"),
                         f"unknown eviction policy{_hint(topo.store.eviction, known)}; known: {', '.join(known)}",
                         got=topo.store.eviction)
    gpus = topo.resources.judge_num_gpus
    if gpus != "auto" and gpus < 0:
        raise topo.error(("resources", "judge_num_gpus"), "must be >= 0 or 'auto'", got=gpus)
