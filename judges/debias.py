"""Position-debiased judging: per-method slot priors, their key, their file, their estimation (torch-free).

A label judge's observed answer distribution is modelled as a prior over display slots times a content
term (PriDe, Zheng et al., ICLR 2024): ``log p(slot) = log prior(slot) + content(candidate) + c``.
Every later call is scored by ``log p(slot) - log prior(slot)`` (see :func:`case_prior`; the engine
applies it at the one place label scores are read, :meth:`~kvjudge.judges.engine.JudgeEngine._answer`).

Two ways to get the prior, both per judge method (reuse has its own slot preference):

* ``pride``: judge each estimation item under all ``N`` cyclic rotations of its candidates. Every
  candidate visits every slot once, so the content term averages to a constant:
  ``log prior_item(slot) = log_softmax_slot(mean_r log_softmax(raw_r)(slot))``; the table's prior is
  ``log_softmax(mean_item log prior_item)`` (:func:`estimate_rotations`).
* ``content_free`` (Zhao et al. 2021, "Calibrate Before Use"): the label distribution when every
  candidate is a content-free text (:data:`CONTENT_FREE_TEXTS`), averaged over texts and items the same
  way (:func:`estimate_content_free`).

A prior is keyed by (model id, kind, candidate-KV mode, output mode, N, prompt-template hash) and
holds one entry per method setting (:func:`prior_name`: ``partial`` at its defaults, ``partial[recompute_first=32]``
with another K); it is a versioned JSON file under ``$KVJUDGE_CACHE/priors`` (the cache
root :func:`kvjudge.models.smollm2.cache_root` resolves; repeated here so this module needs no torch).
Using a prior of another key, or judging without one, is a one-line :class:`PriorError` that names the
``kvjudge calibrate`` command to run. ``N = 1`` needs no file: its prior is ``(0.0,)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvjudge.judges.prompt import JudgeInputError, build_prompt

DEBIAS_MODES: tuple[str, ...] = ("none", "pride", "content_free")
PRIOR_KINDS: tuple[str, ...] = ("pride", "content_free")
CONTENT_FREE_TEXTS: tuple[str, ...] = ("N/A", "[MASK]")
VERSION = 1


class PriorError(JudgeInputError):
    """A missing, mismatched or unreadable slot prior; the message is one line."""


def check_debias(debias: str, output: str = "label", permutations: int = 1) -> None:
    """Refuse unknown modes and the combinations that have no meaning (one line)."""
    if debias not in DEBIAS_MODES:
        raise JudgeInputError(f"unknown judge debias {debias!r}; known: {', '.join(DEBIAS_MODES)}")
    if not isinstance(permutations, int) or permutations < 1:
        raise JudgeInputError(f"judge permutations must be an integer >= 1, got {permutations!r}")
    if debias == "content_free" and output == "generate":
        raise JudgeInputError("judge debias content_free needs label output (a generated answer has no label "
                              "scores); with --judge-output generate use pride (the permutation-consensus vote)")


def cache_root() -> Path:
    """``$KVJUDGE_CACHE`` (default ``~/.cache/kvjudge``), as :func:`kvjudge.models.smollm2.cache_root`."""
    return Path(os.environ.get("KVJUDGE_CACHE", Path.home() / ".cache" / "kvjudge")).expanduser()


def template_hash(tokenizer, output: str = "label") -> str:
    """12 hex digits identifying the judge prompt's template for ``tokenizer`` and ``output``: the token
    ids of a fixed two-candidate probe prompt (system text, headers, glue, instruction, labels, layout)."""
    probe = build_prompt(tokenizer, "Problem text.", ["First answer.", "Second answer."], output=output)
    parts = [probe.prefix, *probe.glue, probe.suffix, probe.labels]
    return hashlib.sha256(json.dumps([list(p) for p in parts]).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class PriorKey:
    """What a slot prior is valid for; any field differing means another prior."""

    model_id: str
    kind: str  # pride | content_free
    candidate_kv: str
    output: str
    n: int
    template: str
    model_arg: str = field(default="", compare=False)  # the --model that loads it (not part of the key)

    def filename(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.model_id).strip("._")[:80] or "model"
        return f"{slug}/{self.kind}-{self.candidate_kv}-{self.output}-n{self.n}-{self.template}.json"

    def describe(self) -> str:
        return (f"model {self.model_id}, {self.kind}, candidate-KV {self.candidate_kv}, output {self.output}, "
                f"N={self.n}, template {self.template}")

    def command(self, methods: Iterable[str]) -> str:
        """The ``kvjudge calibrate`` command that estimates this key's prior for ``methods`` (prior names:
        a setting's options become ``--method-option`` flags)."""
        names, options = [], []
        for m in methods:
            base, opts = split_prior_name(m)
            names += [] if base in names else [base]
            options += [f" --method-option {base}.{k}={v}" for k, v in opts.items()]
        return (f"kvjudge calibrate --model {self.model_arg or self.model_id} --candidates FILE --methods {','.join(names)}"
                f"{''.join(options)} --judge-debias {self.kind} --candidate-kv {self.candidate_kv} "
                f"--judge-output {self.output} (on sets of {self.n} candidates)")


def prior_path(key: PriorKey, root: Path | None = None) -> Path:
    """Where the prior of ``key`` lives: ``<root or $KVJUDGE_CACHE>/priors/<model>/<kind>-...json``."""
    return (root or cache_root()) / "priors" / key.filename()


@dataclass
class PriorTable:
    """The priors of one key: ``methods[name] = {"log_prior": [N floats], "calls": int, "items": [...]}``."""

    key: PriorKey
    methods: dict[str, dict] = field(default_factory=dict)

    def log_prior(self, method: str) -> tuple[float, ...] | None:
        entry = self.methods.get(method)
        return None if entry is None else tuple(float(x) for x in entry["log_prior"])

    def put(self, method: str, log_prior: Sequence[float], calls: int, items: Sequence[str]) -> None:
        if len(log_prior) != self.key.n:
            raise PriorError(f"a prior of {len(log_prior)} slots for N={self.key.n}")
        self.methods[method] = {"log_prior": [float(x) for x in log_prior], "calls": int(calls),
                                "items": [str(i) for i in items]}

    def to_json(self) -> dict:
        key = asdict(self.key)
        key.pop("model_arg")  # how this machine loads the model, not what the prior is for
        return {"version": VERSION, "key": key, "methods": self.methods}

    def save(self, root: Path | None = None) -> Path:
        """Write (merging into the methods already saved under this key); returns the path."""
        path = prior_path(self.key, root)
        old = load_table(self.key, root)
        merged = PriorTable(self.key, {**(old.methods if old else {}), **self.methods})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged.to_json(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
        self.methods = merged.methods
        return path


def read_table(path: Path, key: PriorKey) -> PriorTable:
    """The table in ``path``, which must be for ``key`` (else a one-line :class:`PriorError`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PriorError(f"cannot read slot prior {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise PriorError(f"slot prior {path} has version {data.get('version') if isinstance(data, dict) else None!r}, "
                         f"this kvjudge reads version {VERSION}: run {key.command(['dense'])}")
    try:
        stored = PriorKey(**data["key"])
    except (KeyError, TypeError):
        raise PriorError(f"slot prior {path} has no valid key") from None
    if stored != key:
        raise PriorError(f"slot prior {path} is for {stored.describe()}, not {key.describe()}")
    methods = data.get("methods") or {}
    for name, entry in methods.items():
        if len(entry.get("log_prior", ())) != key.n:
            raise PriorError(f"slot prior {path}: method {name} has {len(entry.get('log_prior', ()))} slots, not {key.n}")
    return PriorTable(stored, dict(methods))


def load_table(key: PriorKey, root: Path | None = None) -> PriorTable | None:
    """The saved table of ``key`` (``None`` when there is none)."""
    path = prior_path(key, root)
    return read_table(path, key) if path.is_file() else None


def priors_for(key: PriorKey, methods: Sequence[str], table: PriorTable | None) -> dict[str, tuple[float, ...]]:
    """``{method: log prior [N]}`` for every method in ``table`` (all zeros for N = 1); a one-line
    :class:`PriorError` naming the calibrate command when one of ``methods`` has none."""
    if key.n == 1:
        return {m: (0.0,) for m in {*methods, *(table.methods if table else ())}}
    have = dict(table.methods) if table else {}
    missing = [m for m in methods if m not in have]
    if missing:
        raise PriorError(f"no {key.kind} slot prior for judge method {', '.join(missing)} ({key.describe()}): "
                         f"run {key.command(missing)}")
    return {m: tuple(float(x) for x in e["log_prior"]) for m, e in have.items()}


def prior_name(impl: object, name: str | None = None) -> str:
    """The name the slot prior of method instance ``impl`` is saved under: its registry name (else
    ``name``), plus in brackets every plain option (number, text, flag) that differs from its default,
    e.g. ``partial[recompute_first=32]``. A method's options change its slot preference, so each setting
    has its own prior; at its defaults a method keeps its plain name."""
    base = getattr(type(impl), "name", None) or name or type(impl).__name__
    changed = []
    if dataclasses.is_dataclass(impl):
        for f in dataclasses.fields(impl):
            value = getattr(impl, f.name, f.default)
            if f.init and f.default is not dataclasses.MISSING and isinstance(value, (bool, int, float, str)) \
                    and value != f.default:
                changed.append(f"{f.name}={value:g}" if isinstance(value, float) else f"{f.name}={value}")
    return f"{base}[{','.join(changed)}]" if changed else base


def split_prior_name(name: str) -> tuple[str, dict[str, str]]:
    """``"partial[recompute_first=32,blend=0.15]"`` -> ``("partial", {"recompute_first": "32", "blend": "0.15"})``."""
    base, bracket, rest = name.partition("[")
    if not bracket:
        return name, {}
    pairs = [p.partition("=") for p in rest.rstrip("]").split(",") if p]
    return base, {k: v for k, _, v in pairs}


def method_instances(name: str, impl: object) -> dict[str, object | None]:
    """``{prior name: instance}`` of the methods whose label scores ``impl`` (method ``name``) may answer
    with: itself (a gate, i.e. an instance holding other method instances: those instead), and always
    ``dense`` (instance ``None`` unless met), since gates fall back to it and KVCOMM answers from a
    dense prefill when it measures an anchor."""
    subs = [v for v in vars(impl).values() if callable(v) and isinstance(getattr(type(v), "name", None), str)]
    out: dict[str, object | None] = {} if subs else {prior_name(impl, name): impl}
    for sub in subs:
        for m, inst in method_instances(type(sub).name, sub).items():
            if out.get(m) is None:
                out[m] = inst
    out.setdefault("dense", None)
    return out


def needed_methods(name: str, impl: object) -> list[str]:
    """The prior names (:func:`prior_name`) of the methods whose label scores ``impl`` may answer with
    (:func:`method_instances`)."""
    return list(method_instances(name, impl))


def case_prior(case, method: str | None) -> tuple[float, ...] | None:
    """The log prior ``[N]`` to subtract from ``method``'s label scores in ``case`` (``None``: none, the
    scores stay raw). ``case`` is a :class:`~kvjudge.judges.base.JudgeCase`."""
    if getattr(case, "debias", "none") == "none" or case.output != "label" or case.prompt.n == 1:
        return None  # nothing to debias (N = 1: the prior is log 1 = 0)
    if method is None:
        raise PriorError("a judge method scored reused KV without naming itself: pass method= to score_pieces")
    prior = (case.priors or {}).get(method)
    if prior is None:
        raise PriorError(f"no {case.debias} slot prior for judge method {method} (N={case.prompt.n}): "
                         f"run kvjudge calibrate --methods {method} ...")
    if len(prior) != case.prompt.n:
        raise PriorError(f"the {case.debias} prior of {method} has {len(prior)} slots, the call has {case.prompt.n}")
    return prior


# ---------------------------------------------------------------------------- estimation (closed form)
def log_softmax(xs: Sequence[float]) -> list[float]:
    top = max(xs)
    lse = top + math.log(sum(math.exp(x - top) for x in xs))
    return [x - lse for x in xs]


def _mean(rows: Sequence[Sequence[float]]) -> list[float]:
    return [sum(col) / len(rows) for col in zip(*rows)]


def rotation(n: int, r: int) -> list[int]:
    """Cyclic rotation ``r`` of ``n`` candidates: ``order[slot] = candidate index`` (0-based)."""
    return [(slot + r) % n for slot in range(n)]


def estimate_rotations(items: Sequence[Sequence[Sequence[float]]]) -> list[float]:
    """The PriDe log prior ``[N]`` from ``items[i][r][slot]``: raw label log-probs of item ``i`` judged
    under rotation ``r`` (all ``N`` rotations, :func:`rotation`), read at display ``slot``."""
    if not items:
        raise PriorError("no calls to estimate a slot prior from")
    per_item = []
    for calls in items:
        n = len(calls[0])
        if len(calls) != n or any(len(c) != n for c in calls):
            raise PriorError(f"PriDe needs all {n} cyclic rotations of N={n} slots per item, got {len(calls)}")
        per_item.append(log_softmax(_mean([log_softmax(c) for c in calls])))
    return log_softmax(_mean(per_item))


def estimate_content_free(calls: Sequence[Sequence[float]]) -> list[float]:
    """The contextual-calibration log prior ``[N]`` from raw label log-probs ``calls[k][slot]`` of
    content-free calls (every candidate a content-free text)."""
    if not calls:
        raise PriorError("no calls to estimate a slot prior from")
    return log_softmax(_mean([log_softmax(c) for c in calls]))


def debiased(scores: Sequence[float], log_prior: Sequence[float]) -> list[float]:
    """``log p(slot) - log prior(slot)``."""
    return [float(s) - float(p) for s, p in zip(scores, log_prior, strict=True)]
