"""``kvjudge calibrate``: estimate the judge's slot priors per method and save them (see :mod:`kvjudge.judges.debias`).

Estimation items are candidate sets (a candidates file, or sets generated as ``eval`` does). Per
candidate count N, per method (a gate: the methods it runs, :func:`~kvjudge.judges.debias.needed_methods`):

* ``pride``: each item is judged under all N cyclic rotations with raw (undebiased) scores; the
  closed form :func:`~kvjudge.judges.debias.estimate_rotations` gives the log prior;
* ``content_free``: each item is judged once per content-free text with every candidate replaced by
  it (agent mode keeps each agent's prompt); :func:`~kvjudge.judges.debias.estimate_content_free`.

A reuse method's call that answered from a dense prefill (KVCOMM measuring a new anchor,
``reused = False``) is run again, so its prior is that of its reuse path, not dense's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvjudge.judges.debias import (CONTENT_FREE_TEXTS, PRIOR_KINDS, PriorError, PriorTable, estimate_content_free,
                                   estimate_rotations, method_instances, rotation)
from kvjudge.judges.judge import Judge


@dataclass
class Item:
    """One estimation item: the problem and its candidates (display order) with their sources."""

    task_id: str
    problem: str
    candidates: list  # str, or a Candidate as a dict (agent mode)
    sources: list[str]


def expand_methods(judge: Judge, methods: Sequence[str]) -> list[str]:
    """The prior names (:func:`~kvjudge.judges.debias.prior_name`) whose priors ``methods`` need (a gate:
    its arms and dense), each once, in order. Each is judgeable by that name afterwards: an instance
    configured otherwise than the judge's own (e.g. ``partial[recompute_first=32]``, a gate's cheap
    path) is adopted by the judge under its prior name."""
    out: list[str] = []
    for m in methods:
        for name, impl in method_instances(m, judge.method(m)).items():
            if impl is not None:
                judge.adopt(name, impl)
            out += [] if name in out else [name]
    return out


def _raw(judge: Judge, item: Item, method: str, order: Sequence[int], candidates: Sequence | None = None) -> list[float]:
    """Raw label log-probs ``[N]`` of ``method`` on ``item`` shown in ``order`` (``candidates``
    replace the item's own, e.g. content-free texts)."""
    cands = list(candidates if candidates is not None else item.candidates)
    args = (item.problem, [cands[i] for i in order])
    kwargs = dict(method=method, sources=[item.sources[i] for i in order], debias="none", permutations=1)
    v = judge.judge(*args, **kwargs)
    if not v.reused and method != "dense":  # answered from a measuring dense prefill: ask the reuse path again
        v = judge.judge(*args, **kwargs)
    return list(v.scores)


def content_free(candidate, text: str):
    """``candidate`` with its text replaced by ``text`` (agent mode keeps the agent's prompt, drops its ids)."""
    if isinstance(candidate, dict):
        return {k: v for k, v in {**candidate, "text": text}.items() if k != "token_ids"}
    return text


def estimate(judge: Judge, items: Sequence[Item], methods: Sequence[str], kind: str = "pride",
             progress: Callable[[str], None] | None = None,
             on_method: Callable[[PriorTable], None] | None = None) -> list[PriorTable]:
    """One :class:`PriorTable` per candidate count among ``items``, for the judge's modes; not saved
    here, but ``on_method(table)`` is called as each method's prior is complete (the CLI saves it then,
    so an interrupted calibration keeps the methods it finished)."""
    if kind not in PRIOR_KINDS:
        raise PriorError(f"unknown prior kind {kind!r}; known: {', '.join(PRIOR_KINDS)}")
    if judge.output != "label":
        raise PriorError("slot priors are for label output; in generate output pride is the permutation vote "
                         "and needs no prior (use --judge-output label)")
    if not items:
        raise PriorError("no candidate sets to calibrate on")
    groups: dict[int, list[Item]] = {}
    for it in items:
        groups.setdefault(len(it.candidates), []).append(it)
    tables = []
    for n, group in sorted(groups.items()):
        table = PriorTable(judge.prior_key(kind, judge.candidate_kv, judge.output, n))
        ids = [it.task_id for it in group]
        for m in expand_methods(judge, methods):
            tick = _ticker(progress, f"N={n} {m}", len(group))
            if kind == "pride":
                rows = [tick([_raw(judge, it, m, rotation(n, r)) for r in range(n)]) for it in group]
                table.put(m, estimate_rotations(rows), n * len(group), ids)
            else:
                calls = []
                for it in group:
                    calls += tick([_raw(judge, it, m, range(n), [content_free(c, t) for c in it.candidates])
                                   for t in CONTENT_FREE_TEXTS])
                table.put(m, estimate_content_free(calls), len(calls), ids)
            if on_method:
                on_method(table)
        tables.append(table)
    judge.reload_priors()
    return tables


def _ticker(progress: Callable[[str], None] | None, what: str, total: int) -> Callable[[list], list]:
    """Pass-through that reports ``what: i/total items`` every tenth item (and the last) to ``progress``."""
    done = [0]
    step = max(1, total // 10)

    def tick(rows: list) -> list:
        done[0] += 1
        if progress and (done[0] % step == 0 or done[0] == total):
            progress(f"{what}: {done[0]}/{total} items")
        return rows
    return tick


def save(tables: Sequence[PriorTable], root: Path | None = None) -> list[Path]:
    """Write every table (merged into what its key already holds); the JSON paths."""
    return [t.save(root) for t in tables]


def render(tables: Sequence[PriorTable], paths: Sequence[Path]) -> str:
    """The priors as text: per key its path, per method the prior probability of each slot (%)."""
    lines = []
    for table, path in zip(tables, paths):
        lines.append(f"{table.key.describe()}\n  -> {path}")
        n = table.key.n
        lines.append("  " + f"{'method':<12}" + "".join(f"{'slot ' + str(s + 1):>9}" for s in range(n)) + "   calls")
        for m, entry in table.methods.items():
            probs = "".join(f"{100 * math.exp(x):>8.1f}%" for x in entry["log_prior"])
            lines.append(f"  {m:<12}{probs}   {entry['calls']}")
    return "\n".join(lines)


def items_from_calls(calls: Sequence) -> list[Item]:
    """Estimation items from diagnose-style calls (:func:`kvjudge.experiments.diagnostics.common.load_calls`),
    one per task."""
    seen, out = set(), []
    for c in calls:
        if c.task_id not in seen:
            seen.add(c.task_id)
            out.append(Item(c.task_id, c.problem, list(c.shown), list(c.sources)))
    return out


def items_from_file(path: str | Path, judge: Judge, limit: int | None = None, offset: int = 0,
                    dataset: str | None = None, topology: str | None = None,
                    sample_seed: int | None = None) -> list[Item]:
    """The items of a candidates file (sampled like every command: ``offset``, then ``limit``)."""
    from kvjudge.experiments.diagnostics.common import load_calls

    calls = load_calls(path, [0], limit, judge.candidate_kv, judge.lm.model_id, dataset=dataset,
                       topology=topology, offset=offset, sample_seed=sample_seed)
    return items_from_calls(calls)


def calibrate_split(judge: Judge, problems: Sequence[dict], sets: dict, k: int, methods: Sequence[str],
                    kind: str) -> dict:
    """``eval --calibrate-on K``: estimate ``kind`` priors of ``methods`` on the first ``k`` of ``problems``
    (candidates in their original order) and make ``judge`` use them (not saved to the cache); what
    ``summary.json`` records of it: the kind, the problem ids and the priors per N and method."""
    from kvjudge.experiments.judging import shown_candidates

    if k >= len(problems):
        raise PriorError(f"--calibrate-on {k} leaves none of the {len(problems)} judgeable problems to judge")
    items = []
    for p in problems[:k]:
        cs = sets[str(p["id"])]
        order = list(range(len(cs.candidates)))
        shown, sources = shown_candidates(cs, order, judge.candidate_kv, judge.lm.model_id)
        items.append(Item(str(p["id"]), p["prompt"], shown, sources))
    tables = estimate(judge, items, methods, kind)
    for t in tables:
        judge.use_priors(t)
    return {"kind": kind, "problems": [it.task_id for it in items],
            "priors": {str(t.key.n): {m: e["log_prior"] for m, e in t.methods.items()} for t in tables}}


def generated_file(dataset: str, model: str, out: Path, limit: int | None, offset: int, data: str | None,
                   topology: str, candidate_kv: str, sample_seed: int | None, device: str | None = None) -> Path:
    """Generate candidate sets for ``dataset`` as ``eval`` does (sampled: ``offset``, ``limit``) into
    ``out/candidates.jsonl`` (kept sets are reused) and return that path."""
    from kvjudge.experiments.config import EvalConfig
    from kvjudge.experiments.datasets import load_dataset
    from kvjudge.experiments.protocol import _Silent, collect_candidates

    cfg = EvalConfig(dataset=dataset, out=out, topology=topology, model=model, limit=limit, data=data,
                     resume=True, device=device, candidate_kv=candidate_kv, offset=offset, sample_seed=sample_seed)
    out.mkdir(parents=True, exist_ok=True)
    problems = load_dataset(dataset, path=data, limit=limit, offset=offset, sample_seed=sample_seed)
    collect_candidates(cfg, problems, _Silent(), verbose=True)
    return out / "candidates.jsonl"
