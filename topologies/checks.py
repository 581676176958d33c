"""The cross-field rules of a topology, checked after the schema: names, agent ids, edges, prompt
templates, the judge method and its options, the store's policies and the resource ranges.

Each rule raises :class:`~kvjudge.topologies.schema.TopologyError` through
:meth:`Topology.error <kvjudge.topologies.schema.Topology.error>`, so it names the key's line."""

from __future__ import annotations

import math
import string

from kvjudge.cache.compress.catalog import COMPRESSION_METHODS
from kvjudge.cache.eviction import EVICTION_POLICIES
from kvjudge.judges.catalog import METHOD_ORDER
from kvjudge.topologies.errors import hint
from kvjudge.topologies.schema import (
    AGENT_ID_RE,
    MAX_CANDIDATES,
    MAX_REPLICAS,
    MAX_RESOURCE,
    MAX_SEED,
    MAX_TEXT_CHARS,
    TEMPLATE_FIELDS,
    Topology,
    is_safe_name,
    method_params,
)


def check_semantics(topo: Topology) -> None:
    """Apply every cross-field rule to a schema-valid ``topo`` (the first broken one raises)."""
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
                raise topo.error(("edges", i, end), f"unknown agent{hint(name, ids)}; agents: {', '.join(ids)}",
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
                                    f"{hint(field, TEMPLATE_FIELDS)}{known}", got=field)
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
                         f"unknown judge method{hint(judge.method, methods)}; known: {', '.join(methods)}",
                         got=judge.method)
    params = method_params(judge.method)
    if judge.coverage is not None and "coverage" not in params:
        raise topo.error(("judge", "coverage"), f"coverage applies only to gate methods, not {judge.method!r}",
                         got=judge.coverage)
    for key, value in judge.options.items():
        where = ("judge", "options", key)
        if key not in params:
            known = ", ".join(params) if params else "none"
            raise topo.error(where, f"unknown option for {judge.method!r}{hint(key, params)}; known: {known}",
                             got=key)
        _check_option_value(topo, where, value)
        if key == "coverage" and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and 0 <= value <= 1):
            raise topo.error(where, "must be a number in [0, 1]", got=value)
        if key == "seed" and not (type(value) is int and 0 <= value <= MAX_SEED):
            raise topo.error(where, f"must be an integer in [0, {MAX_SEED}]", got=value)
    if judge.debias == "content_free" and judge.output == "generate":
        raise topo.error(("judge", "debias"), "content_free needs judge.output: label (a generated answer has no "
                                              "label scores); with output: generate use pride (the rotation vote)",
                         got=judge.debias)


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
                         f"unknown eviction policy{hint(topo.store.eviction, known)}; known: {', '.join(known)}",
                         got=topo.store.eviction)
    compress = topo.store.compress
    if compress is not None and compress.method not in COMPRESSION_METHODS:
        known = list(COMPRESSION_METHODS)
        raise topo.error(("store", "compress", "method"),
                         f"unknown compression method{hint(compress.method, known)}; known: {', '.join(known)}",
                         got=compress.method)
    gpus = topo.resources.judge_num_gpus
    if gpus != "auto" and not 0 <= gpus <= MAX_RESOURCE:
        raise topo.error(("resources", "judge_num_gpus"), f"must be in [0, {MAX_RESOURCE:g}] or 'auto'", got=gpus)
    replicas = topo.resources.agent_replicas
    if replicas != "auto" and not 1 <= replicas <= MAX_REPLICAS:
        raise topo.error(("resources", "agent_replicas"), f"must be an integer in [1, {MAX_REPLICAS}] or 'auto'",
                         got=replicas)
