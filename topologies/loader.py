"""Read topology YAML into a validated :class:`Topology` and turn it into a ``networkx`` graph.

Every problem (missing file, YAML syntax, schema, graph, limits) raises :class:`TopologyError` with
a one-line ``FILE:LINE: key.path: problem (got VALUE)`` message. The YAML reader is capped before
anything is built: input size (:data:`MAX_TOPOLOGY_BYTES`), nesting depth (:data:`MAX_YAML_DEPTH`),
alias uses (:data:`MAX_YAML_ALIASES`) and the node count with every alias expanded
(:data:`MAX_YAML_NODES`, counted as nodes are composed), so an alias bomb, deep nesting or a huge
flat list fails within a fraction of a second; recursive aliases are refused.
"""

from __future__ import annotations

import difflib
import math
import string
import typing
from pathlib import Path

import networkx as nx
import yaml
from pydantic import BaseModel, ValidationError

from kvjudge.cache.compress.catalog import COMPRESSION_METHODS
from kvjudge.cache.eviction import EVICTION_POLICIES
from kvjudge.judges.catalog import METHOD_ORDER

from kvjudge.topologies.schema import (
    AGENT_ID_RE,
    MAX_CANDIDATES,
    MAX_REPLICAS,
    MAX_RESOURCE,
    MAX_SEED,
    MAX_TEXT_CHARS,
    TEMPLATE_FIELDS,
    Topology,
    TopologyError,
    format_path,
    is_safe_name,
    lookup_line,
    method_params,
    safe_name,
)

BUILTIN_DIR = Path(__file__).resolve().parent
BUILTIN_NAMES = ("debate", "heterogeneous", "progressive_refinement")

MAX_TOPOLOGY_BYTES = 1 << 20  # 1 MiB: a topology is a few KB
MAX_YAML_DEPTH = 64  # nesting levels (shipped files use 4)
MAX_YAML_ALIASES = 1000  # uses of ``*anchor``
MAX_YAML_NODES = 10_000  # nodes with every alias expanded (what validation walks); shipped files: ~100


# ---------------------------------------------------------------- public API


def load_topology(path_or_text: str | Path) -> Topology:
    """Load and validate a topology from a file path (``str`` without a newline, or ``Path``),
    or from YAML text (a ``str`` containing a newline). ``name`` defaults to the file stem."""
    if isinstance(path_or_text, Path) or "\n" not in str(path_or_text):
        path = Path(path_or_text)
        source = str(path)
        text = _read_capped(path, source)
        return load_topology_text(text, source=source, default_name=safe_name(path.stem))
    return load_topology_text(str(path_or_text))


def load_topology_text(text: str, *, source: str = "<string>", default_name: str = "topology") -> Topology:
    """Validate YAML ``text``; ``source`` names it in error messages. ``default_name`` is used when
    the text has no ``name:``, made safe first (:func:`~kvjudge.topologies.schema.safe_name`)."""
    if len(text) > MAX_TOPOLOGY_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_TOPOLOGY_BYTES:
        raise TopologyError(f"topology is larger than {MAX_TOPOLOGY_BYTES} bytes", file=source)
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
    _check_semantics(topo)
    if topo.name is None:
        topo.name = safe_name(default_name)
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
    if _is_file(path):
        return path
    stem = str(arg)[:-5] if str(arg).endswith(".yaml") else str(arg)
    if stem in BUILTIN_NAMES:
        return BUILTIN_DIR / f"{stem}.yaml"
    kind = _kind(path)
    if kind:
        raise TopologyError(f"is a {kind}, not a topology file", file=str(arg))
    hint = _hint(stem, BUILTIN_NAMES)
    raise TopologyError(f"no such topology file or shipped topology{hint}; shipped: {', '.join(BUILTIN_NAMES)}",
                        file=str(arg))


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the OS, an embedded NUL
        return False


def _kind(path: Path) -> str | None:
    """``"directory"`` or ``"special file"`` for an existing path that is not a regular file, else ``None``."""
    try:
        if path.is_dir():
            return "directory"
        return "special file" if path.exists() else None
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- YAML with line numbers and caps


def _read_capped(path: Path, source: str) -> str:
    """The file's text, reading at most ``MAX_TOPOLOGY_BYTES + 1`` bytes (so ``/dev/zero`` ends)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_TOPOLOGY_BYTES + 1)
    except FileNotFoundError:
        raise TopologyError("no such topology file", file=source) from None
    except IsADirectoryError:
        raise TopologyError("is a directory, not a topology file", file=source) from None
    except OSError as exc:
        raise TopologyError(f"cannot read topology file: {exc.strerror or exc}", file=source) from None
    except ValueError as exc:  # an embedded NUL in the path
        raise TopologyError(f"cannot read topology file: {exc}", file=source) from None
    if len(raw) > MAX_TOPOLOGY_BYTES:
        raise TopologyError(f"topology file is larger than {MAX_TOPOLOGY_BYTES} bytes", file=source)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TopologyError(f"not UTF-8 text: {exc.reason} at byte {exc.start}", file=source) from None


class _YamlLimit(Exception):
    """A cap hit or an unreadable value while reading YAML: ``problem`` at ``mark``."""

    def __init__(self, problem: str, mark: yaml.Mark | None):
        super().__init__(problem)
        self.problem = problem
        self.mark = mark


class _CappedLoader(yaml.SafeLoader):
    """``SafeLoader`` that counts while composing: nesting depth, alias uses and nodes with aliases
    expanded (a DAG of shared nodes is measured as the tree it stands for), refusing as soon as a
    cap is passed; an alias to a node that is still open (a recursive structure) is refused."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._sizes: dict[int, int] = {}  # id(node) -> expanded node count, set when the node is complete
        self._total = 0  # nodes so far, aliases expanded

    def compose_node(self, parent, index):  # noqa: D102 (PyYAML hook)
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise _YamlLimit(f"YAML refused: more than {MAX_YAML_ALIASES} aliases", mark)
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:
                raise _YamlLimit("YAML refused: recursive alias (an anchor used inside itself)", mark)
            self._count(self._sizes[id(node)], mark)
            return node
        mark = self.peek_event().start_mark
        self._count(1, mark)
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _YamlLimit(f"YAML refused: nested deeper than {MAX_YAML_DEPTH} levels", mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        self._sizes[id(node)] = 1 + sum(self._sizes[id(child)] for child in children)
        return node

    def _count(self, nodes: int, mark: yaml.Mark) -> None:
        self._total += nodes
        if self._total > MAX_YAML_NODES:
            raise _YamlLimit(f"YAML refused: more than {MAX_YAML_NODES} values once aliases are expanded", mark)

    def construct_object(self, node, deep=False):  # noqa: D102 (PyYAML hook)
        try:
            return super().construct_object(node, deep)
        except ValueError as exc:  # e.g. an int beyond Python's digit limit
            raise _YamlLimit(f"YAML value cannot be read: {exc}", node.start_mark) from None


def _parse_yaml(text: str, source: str) -> tuple[object, dict]:
    """``(data, lines)`` where ``lines`` maps key paths (str keys, int indices) to 1-based lines."""
    loader = None
    try:
        loader = _CappedLoader(text)  # the reader already refuses control characters here
        node = loader.get_single_node()
        lines: dict = {}
        if node is not None:
            lines[()] = node.start_mark.line + 1
            _record(node, (), lines, source)  # before constructing: merge keys (<<) rewrite nodes
            data = loader.construct_document(node)
        else:
            data = None
    except _YamlLimit as exc:
        line = exc.mark.line + 1 if exc.mark else None
        raise TopologyError(exc.problem, file=source, line=line) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        col = f" at column {mark.column + 1}" if mark else ""
        raise TopologyError(f"YAML syntax error: {what}{col}", file=source, line=line) from None
    except yaml.YAMLError as exc:
        raise TopologyError(f"YAML error: {exc}", file=source) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


def _record(node: yaml.Node, path: tuple, lines: dict, source: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else f"<{key.id} key>"
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
    if topo.name is not None and not is_safe_name(topo.name):
        raise topo.error(("name",), "must be a safe file name (it names the output folder): 1-100 letters, "
                                    "digits, _, - or ., not '.' or '..'", got=topo.name)
    if isinstance(topo.version, str) and "\n" in topo.version:
        raise topo.error(("version",), "must be one line", got=topo.version)
    _check_agents(topo)
    _check_edges(topo)
    for agent_id, spec in topo.agents.items():
        _check_template(topo, agent_id, spec.prompt)
    _check_judge(topo)
    _check_store_and_resources(topo)


def _check_agents(topo: Topology) -> None:
    if not topo.agents:
        raise topo.error(("agents",), "at least one agent is required", got={})
    for agent_id in topo.agents:
        if not AGENT_ID_RE.fullmatch(agent_id):
            raise topo.error(("agents", agent_id),
                             "agent id must be 1-64 characters, start with a letter or _ and use only letters, "
                             "digits, _ and -", got=agent_id)
    if len(topo.agents) > MAX_CANDIDATES:
        raise topo.error(("agents",), f"too many agents: every agent's answer is a judge candidate, labelled "
                                      f"1..{MAX_CANDIDATES} at most", got=len(topo.agents))


def _check_edges(topo: Topology) -> None:
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


def _check_template(topo: Topology, agent_id: str, prompt: str) -> None:
    """Only bare ``{problem}`` / ``{previous}`` fields (and ``{{`` / ``}}`` literals) are allowed."""
    where = ("agents", agent_id, "prompt")
    known = "; known: {problem}, {previous}"
    try:
        parsed = list(string.Formatter().parse(prompt))
    except ValueError as exc:
        raise topo.error(where, f"bad template: {exc} (write literal braces as {{{{ and }}}})", got=prompt) from None
    has_upstream = any(e.target == agent_id for e in topo.edges)
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        base = field.split(".", 1)[0].split("[", 1)[0]
        if field == "" or field.isdigit():
            raise topo.error(where, "positional template field {" + field + "} is not allowed" + known,
                             got=prompt)
        if field not in TEMPLATE_FIELDS and base in TEMPLATE_FIELDS:
            raise topo.error(where, f"attribute or index access in {{{field}}} is not allowed; write {{{base}}}",
                             got=prompt)
        if field not in TEMPLATE_FIELDS:
            raise topo.error(where, f"unknown template field {{{field}}} in agent {agent_id!r}"
                                    f"{_hint(field, TEMPLATE_FIELDS)}{known}", got=field)
        if conversion is not None:
            raise topo.error(where, f"conversion !{conversion} in {{{field}}} is not allowed; write {{{field}}}",
                             got=prompt)
        if spec:
            what = "nested field" if "{" in spec else "format spec"
            raise topo.error(where, f"{what} :{spec} in {{{field}}} is not allowed; write {{{field}}}", got=prompt)
        if field == "previous" and not has_upstream and topo.rounds == 1:
            raise topo.error(where, f"{{previous}} is never filled: agent {agent_id!r} has no incoming "
                                    "edges and rounds is 1", got=field)


def _check_judge(topo: Topology) -> None:
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
    for key, value in judge.options.items():
        where = ("judge", "options", key)
        if key not in params:
            known = ", ".join(params) if params else "none"
            raise topo.error(where, f"unknown option for {judge.method!r}{_hint(key, params)}; known: {known}",
                             got=key)
        _check_option_value(topo, where, value)
        if key == "coverage" and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and 0 <= value <= 1):
            raise topo.error(where, "must be a number in [0, 1]", got=value)
        if key == "seed" and not (type(value) is int and 0 <= value <= MAX_SEED):
            raise topo.error(where, f"must be an integer in [0, {MAX_SEED}]", got=value)


def _check_option_value(topo: Topology, where: tuple, value: object) -> None:
    """Option values are scalars: str (bounded), bool, None, finite float, int within 64 bits."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if not -MAX_SEED - 1 <= value <= MAX_SEED:
            raise topo.error(where, "integer out of the 64-bit range", got=value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise topo.error(where, "must be a finite number", got=value)
    elif isinstance(value, str):
        if len(value) > MAX_TEXT_CHARS:
            raise topo.error(where, f"string longer than {MAX_TEXT_CHARS} characters", got=value)
    else:
        raise topo.error(where, "option values must be a string, number, boolean or null", got=value)


def _check_store_and_resources(topo: Topology) -> None:
    if topo.store.eviction not in EVICTION_POLICIES:
        known = sorted(EVICTION_POLICIES)
        raise topo.error(("store", "eviction"),
                         f"unknown eviction policy{_hint(topo.store.eviction, known)}; known: {', '.join(known)}",
                         got=topo.store.eviction)
    compress = topo.store.compress
    if compress is not None and compress.method not in COMPRESSION_METHODS:
        known = list(COMPRESSION_METHODS)
        raise topo.error(("store", "compress", "method"),
                         f"unknown compression method{_hint(compress.method, known)}; known: {', '.join(known)}",
                         got=compress.method)
    gpus = topo.resources.judge_num_gpus
    if gpus != "auto" and not 0 <= gpus <= MAX_RESOURCE:
        raise topo.error(("resources", "judge_num_gpus"), f"must be in [0, {MAX_RESOURCE:g}] or 'auto'", got=gpus)
    replicas = topo.resources.agent_replicas
    if replicas != "auto" and not 1 <= replicas <= MAX_REPLICAS:
        raise topo.error(("resources", "agent_replicas"), f"must be an integer in [1, {MAX_REPLICAS}] or 'auto'",
                         got=replicas)
