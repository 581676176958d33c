"""Read topology YAML into a validated :class:`Topology` and turn it into a ``networkx`` graph.

The sequence: resolve a name or path (:func:`resolve_topology`), read the file capped
(:mod:`.yaml_reader`: size, depth, aliases, nodes; a line for every key), validate against the schema
(:mod:`.schema`; pydantic errors become one line in :mod:`.errors`), apply the cross-field rules
(:mod:`.checks`), then build the graph (:func:`build_graph`, which refuses cycles). Every problem
(missing file, YAML syntax, schema, graph, limits) raises :class:`TopologyError` with a one-line
``FILE:LINE: key.path: problem (got VALUE)`` message.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
from pydantic import ValidationError

from kvjudge.topologies.checks import check_semantics
from kvjudge.topologies.errors import hint, translate
from kvjudge.topologies.schema import Topology, TopologyError, safe_name
from kvjudge.topologies.yaml_reader import (  # the caps, public here too
    MAX_TOPOLOGY_BYTES,
    MAX_YAML_ALIASES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    parse_yaml,
    read_capped,
)

__all__ = [
    "BUILTIN_DIR",
    "BUILTIN_NAMES",
    "MAX_TOPOLOGY_BYTES",
    "MAX_YAML_ALIASES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "build_graph",
    "builtin_topology",
    "generations",
    "load_topology",
    "load_topology_text",
    "resolve_topology",
    "validate_file",
]

BUILTIN_DIR = Path(__file__).resolve().parent
BUILTIN_NAMES = ("debate", "heterogeneous", "progressive_refinement")


# ---------------------------------------------------------------- public API


def load_topology(path_or_text: str | Path) -> Topology:
    """Load and validate a topology from a file path (``str`` without a newline, or ``Path``),
    or from YAML text (a ``str`` containing a newline). ``name`` defaults to the file stem."""
    if isinstance(path_or_text, Path) or "\n" not in str(path_or_text):
        path = Path(path_or_text)
        source = str(path)
        text = read_capped(path, source)
        return load_topology_text(text, source=source, default_name=safe_name(path.stem))
    return load_topology_text(str(path_or_text))


def load_topology_text(text: str, *, source: str = "<string>", default_name: str = "topology") -> Topology:
    """Validate YAML ``text``; ``source`` names it in error messages. ``default_name`` is used when
    the text has no ``name:``, made safe first (:func:`~kvjudge.topologies.schema.safe_name`)."""
    if len(text) > MAX_TOPOLOGY_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_TOPOLOGY_BYTES:
        raise TopologyError(f"topology is larger than {MAX_TOPOLOGY_BYTES} bytes", file=source)
    data, lines = parse_yaml(text, source)
    if data is None:
        raise TopologyError("empty topology file", file=source)
    if not isinstance(data, dict):
        raise TopologyError("top level must be a mapping with agents, edges and judge",
                            file=source, line=lines.get(()), got=data)
    try:
        topo = Topology.model_validate(data)
    except ValidationError as exc:
        raise translate(exc, source, lines) from None
    topo._source = source
    topo._lines = lines
    check_semantics(topo)
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
        raise TopologyError(f"no shipped topology {name!r}{hint(stem, BUILTIN_NAMES)}; "
                            f"shipped: {', '.join(BUILTIN_NAMES)}")
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
    raise TopologyError(f"no such topology file or shipped topology{hint(stem, BUILTIN_NAMES)}; "
                        f"shipped: {', '.join(BUILTIN_NAMES)}",
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
