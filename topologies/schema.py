"""Topology files: the YAML schema and the typed objects it validates into.

A topology is a YAML mapping. Unknown keys at any level are errors (with a did-you-mean hint).
Every number is bounded and every float finite (``.inf`` / ``.nan`` are refused); the file itself
is capped (:mod:`.yaml_reader`: 1 MiB, nesting depth 64, at most 1,000 alias uses and 10,000 nodes
with every alias expanded, no recursive aliases).

Required keys:

* ``agents``: mapping of agent id (1-64 letters, digits, ``_``, ``-``; starts with a letter or
  ``_``; no trailing newline) to an agent. At most :data:`MAX_CANDIDATES` (9) agents: every
  agent's final answer is a judge candidate labelled ``1``..``N``.

  * ``role`` (str, required, <= 4096 chars): a short label, e.g. ``planner``.
  * ``prompt`` (str, required, <= 65,536 chars): a template with two fields, ``{problem}`` (always
    filled) and ``{previous}`` (the upstream agents' answers joined; in debate rounds > 1 the other
    agents' previous-round answers; empty where there is nothing yet). Fields are bare names only:
    conversions (``{problem!r}``), format specs (``{problem:>10}``), nested fields, attribute or
    index access (``{problem.x}``, ``{problem[0]}``), positional ``{}`` and any other name are
    errors. ``{previous}`` in an agent with no incoming edges is an error when ``rounds`` is 1 (it
    could never be filled). Write literal braces as ``{{`` and ``}}``.
  * ``model`` (str), ``temperature`` (float in [0, 10]), ``max_new_tokens`` (int in [1, 32768]),
    ``seed`` (int in [0, 2**63 - 1]): optional per-agent overrides of ``defaults``.

* ``edges``: list of ``{source, target}`` agent ids (may be empty). Endpoints must be declared
  agents; self-loops, duplicate edges and cycles are errors.
* ``judge``:

  * ``method``: one of the registered judge methods (``kvjudge.judges.catalog.METHOD_ORDER``).
  * ``coverage`` (float in [0, 1]; methods with a ``coverage`` option only), ``seed`` (int in
    [0, 2**63 - 1]) and ``options`` (mapping of the method's option names, from
    ``kvjudge.judges.catalog.method_options``, to scalars: str, bool, finite number, null).
  * ``candidate_kv``: where a candidate's cached KV comes from: ``agent`` (the KV the agent
    produced while generating, with its own prompt as context), ``isolated`` (the answer
    prefilled alone) or ``judge_prefix`` (the answer prefilled after the judge's prefix; default).
  * ``output``: ``label`` (default: the label token's log-probability at the answer position) or
    ``generate`` (the judge decodes free text and the chosen number is parsed from it).
  * ``max_tokens`` (int in [1, 4096], default 256): the decode budget of ``output: generate``
    (accepted with ``label`` too, so the command line can switch the output mode).
  * ``debias``: ``none`` (default), ``pride`` or ``content_free``: label scores minus the method's
    saved slot prior (``kvjudge calibrate``; see :mod:`kvjudge.judges.debias`). ``content_free``
    needs ``output: label``; with ``output: generate``, ``pride`` is the vote over every rotation.
  * ``permutations`` (int in [1, 9], default 1): permutation consensus over that many cyclic
    rotations of the candidates (capped at their number).

Optional keys:

* ``name`` (default: the file stem, with characters outside the allowed set replaced by ``_``):
  a safe file name, since it names the default output folder: 1-100 letters, digits, ``_``,
  ``-``, ``.``; not ``.`` or ``..``. ``version`` (int or str of <= 100 chars).
* ``rounds`` (int in [1, 100], default 1): debate rounds; every agent answers once per round.
* ``defaults``: ``model`` (str, default ``smollm2-135m``), ``temperature`` (default 0.0),
  ``max_new_tokens`` (default 128), ``seed`` (default 0), bounded as for agents.
* ``store``: ``budget_bytes`` (int in [1, 2**50], default 2_000_000_000), ``eviction`` (a
  registered policy name, default ``lru``), ``compress`` (optional ``{method, ratio}``: a
  token-level compression method from ``kvjudge.cache.compress.catalog.COMPRESSION_METHODS``
  applied to stored candidate KV, and ``ratio`` the fraction of tokens kept, float in (0, 1],
  1.0 = uncompressed; default: no compression).
* ``resources``: ``judge_resource`` (str, a custom Ray resource name such as ``judge``; default
  none), ``agent_num_cpus`` (float in [0, 1024], default 1), ``judge_num_gpus`` (float in
  [0, 1024] or ``auto``, default ``auto``), ``agent_replicas`` (int in [1, 256] or ``auto``:
  agent actors per model; ``auto`` = as many as the cluster's resources allow; default 1).

The candidates handed to the judge are the final answers of every agent (after the last round).

Every problem raises :class:`TopologyError`, whose message is one line:
``FILE:LINE: key.path: problem (got VALUE)`` (``:LINE`` left out when unknown).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from kvjudge.judges.candidate import DEFAULT_MAX_NEW_TOKENS
from kvjudge.judges.catalog import method_options

DEFAULT_MODEL = "smollm2-135m"
TEMPLATE_FIELDS = ("problem", "previous")
AGENT_ID_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")  # use with fullmatch (no "$": it accepts "a1\n")
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,100}")  # use with fullmatch; "." and ".." refused separately

# Every agent's answer is a judge candidate labelled "1".."N"; the labels "1".."9" are single,
# distinct tokens on the tokenizers we know, so validate refuses more than 9. This is a static
# bound only: a run re-checks the count against the judge model's actual label limit
# (``kvjudge.judges.prompt``, computed from its tokenizer).
MAX_CANDIDATES = 9
MAX_NEW_TOKENS = 32768
MAX_ROUNDS = 100
MAX_TEMPERATURE = 10.0
MAX_SEED = 2**63 - 1  # fits every RNG we seed (torch takes up to 2**64 - 1) with room for "+ round"
MAX_RESOURCE = 1024.0  # CPUs / GPUs per actor
MAX_REPLICAS = 256
MAX_BUDGET_BYTES = 2**50
MAX_JUDGE_TOKENS = 4096
MAX_PROMPT_CHARS = 65536
MAX_TEXT_CHARS = 4096  # roles, model names / checkpoint paths, resource names, option strings
MAX_SHORT_CHARS = 100  # names, versions


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
            parts.append(f"{_show_text(file)}:{line}" if line else _show_text(file))
        if path:
            parts.append(_show_text(path))
        text = self.problem
        if got is not ...:
            text += f" (got {_show(got)})"
        parts.append(text)
        super().__init__(": ".join(parts))


def _one_line(text: str) -> str:
    """``text`` on one line: whitespace runs become one space, other control characters are escaped."""
    text = " ".join(str(text).split())
    return text if text.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _show_text(text: str, limit: int = 200) -> str:
    text = _one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: object, limit: int = 80) -> str:
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # e.g. an int beyond Python's digit limit, a cyclic value
        text = f"<{type(value).__name__}>"
    return _show_text(text, limit)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class AgentSpec(_Strict):
    """One agent. In a resolved spec (:meth:`Topology.agent_spec`) no field is ``None``."""

    role: str = Field(max_length=MAX_TEXT_CHARS)
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    model: Optional[str] = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)
    temperature: Optional[float] = Field(default=None, ge=0, le=MAX_TEMPERATURE)
    max_new_tokens: Optional[int] = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)


class Edge(_Strict):
    source: str = Field(max_length=MAX_TEXT_CHARS)
    target: str = Field(max_length=MAX_TEXT_CHARS)


CandidateKV = Literal["agent", "isolated", "judge_prefix"]
JudgeOutput = Literal["label", "generate"]
JudgeDebias = Literal["none", "pride", "content_free"]


class JudgeSpec(_Strict):
    method: str = Field(max_length=MAX_TEXT_CHARS)
    coverage: Optional[float] = Field(default=None, ge=0, le=1)
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)
    options: dict[str, object] = Field(default_factory=dict)
    candidate_kv: CandidateKV = "judge_prefix"
    output: JudgeOutput = "label"
    max_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1, le=MAX_JUDGE_TOKENS)
    debias: JudgeDebias = "none"
    permutations: int = Field(default=1, ge=1, le=MAX_CANDIDATES)

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
    model: str = Field(default=DEFAULT_MODEL, min_length=1, max_length=MAX_TEXT_CHARS)
    temperature: float = Field(default=0.0, ge=0, le=MAX_TEMPERATURE)
    max_new_tokens: int = Field(default=128, ge=1, le=MAX_NEW_TOKENS)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)


class CompressSpec(_Strict):
    """Token-level compression of stored candidate KV: ``ratio`` is the fraction of tokens kept."""

    method: str = Field(max_length=MAX_TEXT_CHARS)
    ratio: float = Field(gt=0, le=1)


class StoreSpec(_Strict):
    budget_bytes: int = Field(default=2_000_000_000, gt=0, le=MAX_BUDGET_BYTES)
    eviction: str = Field(default="lru", max_length=MAX_TEXT_CHARS)
    compress: Optional[CompressSpec] = None


class ResourcesSpec(_Strict):
    judge_resource: Optional[str] = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)
    agent_num_cpus: float = Field(default=1.0, ge=0, le=MAX_RESOURCE)
    judge_num_gpus: Union[Literal["auto"], float] = "auto"  # range checked in checks.py (one clear message)
    agent_replicas: Union[Literal["auto"], int] = 1  # range checked in checks.py


class Topology(_Strict):
    """A validated topology (see the module docstring for the schema)."""

    agents: dict[str, AgentSpec]
    edges: list[Edge]
    judge: JudgeSpec
    name: Optional[str] = Field(default=None, max_length=MAX_SHORT_CHARS)
    version: Optional[Union[int, Annotated[str, Field(max_length=MAX_SHORT_CHARS)]]] = None
    rounds: int = Field(default=1, ge=1, le=MAX_ROUNDS)
    defaults: Defaults = Field(default_factory=Defaults)
    store: StoreSpec = Field(default_factory=StoreSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    _source: Optional[str] = PrivateAttr(default=None)
    _lines: dict = PrivateAttr(default_factory=dict)

    @property
    def source(self) -> str | None:
        """The file (or ``<string>``) this topology was read from."""
        return self._source

    def agent_spec(self, agent_id: str) -> AgentSpec:
        """The agent with ``model``/``temperature``/``max_new_tokens``/``seed`` filled from ``defaults``."""
        try:
            spec = self.agents[agent_id]
        except KeyError:
            raise KeyError(f"no agent {agent_id!r}; agents: {', '.join(self.agents)}") from None
        filled = {k: getattr(self.defaults, k) for k in ("model", "temperature", "max_new_tokens", "seed")
                  if getattr(spec, k) is None}
        return spec.model_copy(update=filled)

    def with_overrides(self, *, model: str | None = None, judge: JudgeSpec | dict | None = None,
                       store: dict | None = None, agents: dict[str, dict] | None = None) -> Topology:
        """A copy with what a command overrides: ``model`` the default model (agents and judge, when
        given), ``judge`` a new :class:`JudgeSpec` or ``{field: value}`` updates of this one, ``store``
        updates of the store spec, ``agents`` ``{agent: {field: value}}`` updates per agent. Values are
        taken as they are (as pydantic's ``model_copy``): callers pass checked ones. Source and line
        map are kept."""
        update: dict[str, object] = {}
        if model:
            update["defaults"] = self.defaults.model_copy(update={"model": model})
        if judge is not None:
            update["judge"] = judge if isinstance(judge, JudgeSpec) else self.judge.model_copy(update=judge)
        if store:
            update["store"] = self.store.model_copy(update=store)
        if agents:
            unknown = [a for a in agents if a not in self.agents]
            if unknown:
                raise KeyError(f"no agent {unknown[0]!r}; agents: {', '.join(self.agents)}")
            update["agents"] = {name: spec.model_copy(update=agents[name]) if name in agents else spec
                                for name, spec in self.agents.items()}
        return self.model_copy(update=update) if update else self

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


def is_safe_name(name: str) -> bool:
    """Whether ``name`` can name a folder safely: 1-100 of ``[A-Za-z0-9_.-]``, not ``.`` or ``..``."""
    return NAME_RE.fullmatch(name) is not None and name not in (".", "..")


def safe_name(text: str, fallback: str = "topology") -> str:
    """``text`` made safe (:func:`is_safe_name`): other characters become ``_``, cut to 100 chars;
    ``fallback`` when nothing usable is left (``""``, ``.``, ``..``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:MAX_SHORT_CHARS]
    return name if is_safe_name(name) else fallback
