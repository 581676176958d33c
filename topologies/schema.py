"""Topology files: the YAML schema and the typed objects it validates into.

A topology is a YAML mapping. Unknown keys at any level are errors (with a did-you-mean hint).

Required keys:

* ``agents``: mapping of agent id (letters, digits, ``_``, ``-``; starts with a letter or ``_``)
  to an agent:

  * ``role`` (str, required): a short label, e.g. ``planner``.
  * ``prompt`` (str, required): a ``str.format`` template. Fields: ``{problem}`` (always filled)
    and ``{previous}`` (the upstream agents' answers joined; in debate rounds > 1 the other
    agents' previous-round answers; empty where there is nothing yet). ``{previous}`` in an agent
    with no incoming edges is an error when ``rounds`` is 1 (it could never be filled). Any
    other field is an error. Write literal braces as ``{{`` and ``}}``.
  * ``model`` (str), ``temperature`` (float >= 0), ``max_new_tokens`` (int >= 1), ``seed`` (int):
    optional per-agent overrides of ``defaults``.

* ``edges``: list of ``{source, target}`` agent ids (may be empty). Endpoints must be declared
  agents; self-loops, duplicate edges and cycles are errors.
* ``judge``: ``method`` (one of the registered judge methods, ``kvjudge.judges.catalog.METHOD_ORDER``),
  and optional ``coverage`` (float in [0, 1]; ``random_gate`` only), ``seed`` (int) and
  ``options`` (mapping of keyword arguments of the method's config, names checked).

Optional keys:

* ``name`` (str; default: the file stem), ``version`` (int or str).
* ``rounds`` (int >= 1, default 1): debate rounds; every agent answers once per round.
* ``defaults``: ``model`` (str, default ``smollm2-135m``), ``temperature`` (float >= 0, default 0.0),
  ``max_new_tokens`` (int >= 1, default 128), ``seed`` (int, default 0).
* ``store``: ``budget_bytes`` (int > 0, default 2_000_000_000), ``eviction`` (a registered policy
  name, default ``lru``).
* ``resources``: ``judge_resource`` (str, a custom Ray resource name such as ``judge``; default
  none), ``agent_num_cpus`` (float >= 0, default 1), ``judge_num_gpus`` (float >= 0 or ``auto``,
  default ``auto``).

The candidates handed to the judge are the final answers of every agent (after the last round).

Every problem raises :class:`TopologyError`, whose message is one line:
``FILE:LINE: key.path: problem (got VALUE)`` (``:LINE`` left out when unknown).
"""

from __future__ import annotations

import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from kvjudge.judges.catalog import method_options

DEFAULT_MODEL = "smollm2-135m"
TEMPLATE_FIELDS = ("problem", "previous")
AGENT_ID_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


class TopologyError(ValueError):
    """A topology that cannot be used. ``str(err)`` is one line: ``FILE:LINE: key.path: problem (got VALUE)``."""

    def __init__(self, problem: str, *, file: str | None = None, line: int | None = None,
                 path: str = "", got: object = ...):
        self.file = file
        self.line = line
        self.path = path
        self.problem = _one_line(problem)
        self.got = got
        parts = []
        if file:
            parts.append(f"{file}:{line}" if line else file)
        if path:
            parts.append(path)
        text = self.problem
        if got is not ...:
            text += f" (got {_show(got)})"
        parts.append(text)
        super().__init__(": ".join(parts))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _show(value: object, limit: int = 80) -> str:
    text = _one_line(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AgentSpec(_Strict):
    """One agent. In a resolved spec (:meth:`Topology.agent_spec`) no field is ``None``."""

    role: str
    prompt: str
    model: Optional[str] = None
    temperature: Optional[float] = Field(default=None, ge=0)
    max_new_tokens: Optional[int] = Field(default=None, ge=1)
    seed: Optional[int] = None


class Edge(_Strict):
    source: str
    target: str


class JudgeSpec(_Strict):
    method: str
    coverage: Optional[float] = Field(default=None, ge=0, le=1)
    seed: Optional[int] = None
    options: dict[str, object] = Field(default_factory=dict)

    def method_kwargs(self) -> dict:
        """Keyword arguments for the method's config: ``options`` plus ``coverage``/``seed`` where set
        and accepted by the method."""
        kwargs = dict(self.options)
        if self.coverage is not None:
            kwargs["coverage"] = self.coverage
        if self.seed is not None and "seed" in method_params(self.method):
            kwargs["seed"] = self.seed
        return kwargs


class Defaults(_Strict):
    model: str = DEFAULT_MODEL
    temperature: float = Field(default=0.0, ge=0)
    max_new_tokens: int = Field(default=128, ge=1)
    seed: int = 0


class StoreSpec(_Strict):
    budget_bytes: int = Field(default=2_000_000_000, gt=0)
    eviction: str = "lru"


class ResourcesSpec(_Strict):
    judge_resource: Optional[str] = None
    agent_num_cpus: float = Field(default=1.0, ge=0)
    judge_num_gpus: Union[Literal["auto"], float] = "auto"


class Topology(_Strict):
    """A validated topology (see the module docstring for the schema)."""

    agents: dict[str, AgentSpec]
    edges: list[Edge]
    judge: JudgeSpec
    name: Optional[str] = None
    version: Optional[Union[int, str]] = None
    rounds: int = Field(default=1, ge=1)
    defaults: Defaults = Field(default_factory=Defaults)
    store: StoreSpec = Field(default_factory=StoreSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    _source: Optional[str] = PrivateAttr(default=None)
    _lines: dict = PrivateAttr(default_factory=dict)

    @property
    def source(self) -> str | None:
        """The file (or ``<string>``) this topology was read from."""
        return self._source

    @property
    def agent_ids(self) -> list[str]:
        return list(self.agents)

    def agent_spec(self, agent_id: str) -> AgentSpec:
        """The agent with ``model``/``temperature``/``max_new_tokens``/``seed`` filled from ``defaults``."""
        try:
            spec = self.agents[agent_id]
        except KeyError:
            raise KeyError(f"no agent {agent_id!r}; agents: {', '.join(self.agents)}") from None
        filled = {k: getattr(self.defaults, k) for k in ("model", "temperature", "max_new_tokens", "seed")
                  if getattr(spec, k) is None}
        return spec.model_copy(update=filled)

    def predecessors(self, agent_id: str) -> list[str]:
        """Upstream agents of ``agent_id`` in edge order."""
        return [e.source for e in self.edges if e.target == agent_id]

    def line_of(self, *path: str | int) -> int | None:
        """The YAML line of ``path`` (or of its nearest recorded parent); ``None`` when unknown."""
        return lookup_line(self._lines, path)

    def error(self, path: tuple, problem: str, got: object = ...) -> TopologyError:
        return TopologyError(problem, file=self._source, line=self.line_of(*path),
                             path=format_path(path), got=got)


def format_path(path: tuple) -> str:
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def lookup_line(lines: dict, path: tuple) -> int | None:
    """Line of the longest prefix of ``path`` recorded in ``lines`` (keys: tuples of str/int)."""
    best = lines.get(())
    prefix: tuple = ()
    for part in path:
        if prefix + (part,) in lines:
            prefix += (part,)
        elif prefix + (str(part),) in lines:
            prefix += (str(part),)
        else:
            break
        best = lines[prefix]
    return best


def method_params(method: str) -> list[str]:
    """The option names of a registered judge method (its config dataclass's fields)."""
    return list(method_options(method))
