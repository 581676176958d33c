"""Topologies: YAML files describing agents, their edges and the judge (schema: :mod:`.schema`)."""

from kvjudge.topologies.loader import (
    build_graph,
    builtin_topology,
    generations,
    load_topology,
    load_topology_text,
    resolve_topology,
    validate_file,
)
from kvjudge.topologies.schema import AgentSpec, Edge, JudgeSpec, Topology, TopologyError

__all__ = [
    "AgentSpec",
    "Edge",
    "JudgeSpec",
    "Topology",
    "TopologyError",
    "build_graph",
    "builtin_topology",
    "generations",
    "load_topology",
    "load_topology_text",
    "resolve_topology",
    "validate_file",
]
