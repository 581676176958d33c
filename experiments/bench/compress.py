"""``kvjudge bench compress``: judge consistency vs kept ratio of the stored candidate KV.

Candidate sets are read with :func:`~kvjudge.experiments.candidates.load_candidates` (lines
``{"task_id", "candidates", "sources"?, "problem"?, "agent_prompts"?, ...}``; a line without its own
``problem`` text takes it from the dataset its task id names, ``gsm8k/7`` -> ``gsm8k``). In the default
``agent`` candidate-KV mode each candidate's KV is the one its agent computed after its own prompt
(files without agent prompts get them rebuilt from the ``progressive_refinement`` topology's templates).

For every set and shuffle seed the judge runs dense and every judge method on the uncompressed
candidates; then, for every (compression method, kept ratio), the candidates' cached KV (exactly
what the judge looks up, :meth:`~kvjudge.judges.judge.Judge.candidate_kv_request`) is replaced by its
compressed form as a compressing store would hand it over
(:func:`~kvjudge.experiments.judging.compress_candidates`: compressed against the KV it was encoded
after, the agent prompt in ``agent`` mode, the judge prefix in ``judge_prefix`` mode) and the judge
methods run again; prefix and glue stay whole. Per point (``method``, ``ratio``, ``judge_method``):
``jcr`` against the uncompressed dense judge, ``jcr_vs_uncompressed`` against the same judge method
uncompressed, ``accuracy`` (GSM8K / MMLU), ``store_bytes`` (the compressed candidates' bytes, each
distinct candidate once; ``store_ratio`` over the uncompressed bytes), ``latency_ms`` and
``score_shift``: the mean absolute change of the candidates' label log-probabilities against the same
judge method uncompressed (nats; finer than a changed winner). For gate methods (DG-JKR, the random
gate) ``fallback_rate`` is the share of calls the gate sent to dense, and for methods that measure
anchors ``measured_rate`` the share of calls that ran a dense prefill to measure them (None otherwise):
how much of its signal a gate keeps on compressed KV.

Stateful judge methods (KVCOMM's anchor pools and reuse decisions, DG-JKR's and the random gate's
arms, the gate's RNG) judge every point of a set from the very state they had when the set's
uncompressed reference ran (a copy sharing the anchors' tensors, :func:`_method_state`); after the set
they continue from the state the reference left. Ratio 1.0 hands the judge the uncompressed KV itself,
so its point repeats the reference call for call: same decisions, same scores.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvjudge.cache.compress.registry import CompressError
from kvjudge.experiments.candidates import CandidateSet, load_candidates, with_agent_prompts
from kvjudge.experiments.data import DataError
from kvjudge.experiments.datasets import get_dataset, is_dataset, load_dataset
from kvjudge.experiments.judging import compress_candidates, permutation, shown_candidates, to_original
from kvjudge.experiments.metrics import jcr
from kvjudge.judges.candidate import CANDIDATE_KV_MODES
from kvjudge.judges.judge import Judge
from kvjudge.models import LoadedModel, load_model
from kvjudge.topologies import load_topology, resolve_topology

GRADED = ("gsm8k", "mmlu")
AGENT_TOPOLOGY = "progressive_refinement"  # rebuilds agent prompts of files written without them


@dataclass
class BenchSet:
    """One candidate set to judge: the set, its problem text and its dataset problem (for grading)."""

    cs: CandidateSet
    problem: str
    reference: dict | None = None


def read_candidate_sets(path: str | Path, dataset: str | None = None, limit: int | None = None,
                        candidate_kv: str = "agent") -> list[BenchSet]:
    """The first ``limit`` sets of ``path`` with their problem text (the line's own, else the dataset's:
    ``dataset``, by default the task id's prefix) and dataset problem; in ``agent`` mode sets without
    agent prompts get them rebuilt from :data:`AGENT_TOPOLOGY` (one-line ``ValueError`` if impossible)."""
    sets = load_candidates(path)  # one-line ValueError on a missing or bad file
    if limit is not None:
        sets = dict(list(sets.items())[: int(limit)])
    names = {dataset} if dataset else {tid.split("/")[0] for tid in sets}
    refs: dict[str, dict] = {}
    for name in sorted(names):
        if is_dataset(name):
            refs.update({str(p["id"]): {**p, "dataset": get_dataset(name).name} for p in load_dataset(name)})
    out = []
    for tid, cs in sets.items():
        ref = refs.get(tid)
        problem = cs.problem if cs.problem is not None else (ref or {}).get("prompt")
        if problem is None:
            raise DataError(f"task {tid!r} is not a {dataset} problem and its line has no problem text" if dataset
                            else f"task {tid!r} has no problem text and no dataset names it (pass the dataset)")
        out.append(BenchSet(cs, problem, ref))
    if candidate_kv == "agent" and any(b.cs.agent_prompts is None for b in out):
        with_agent_prompts(sets, {b.cs.task_id: b.problem for b in out},
                           load_topology(resolve_topology(AGENT_TOPOLOGY)))
    return out


def _grades(b: BenchSet) -> list[bool] | None:
    ref = b.reference
    if not ref or ref.get("dataset") not in GRADED:
        return None
    ds = get_dataset(ref["dataset"])
    return [bool(ds.grade(ref, text)) for text in b.cs.candidates]


def _shared_tensors(obj: object, memo: dict, seen: set) -> None:
    """Map every tensor reachable from ``obj`` (attributes, dict / list / tuple items) to itself in the
    ``copy.deepcopy`` memo ``memo``, so a deep copy shares tensors instead of cloning them."""
    import torch  # function-body import: only needed once a model is loaded

    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        memo[id(obj)] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _shared_tensors(k, memo, seen), _shared_tensors(v, memo, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _shared_tensors(v, memo, seen)
    elif hasattr(obj, "__dict__"):
        _shared_tensors(vars(obj), memo, seen)


def _method_state(judge: Judge, names: Sequence[str]) -> dict:
    """A copy of the state of the judge's method instances ``names`` (their attributes; tensors shared:
    anchors are replaced, never written in place)."""
    live = {m: vars(judge.method(m)) for m in names}
    memo: dict = {}
    _shared_tensors(live, memo, set())
    return copy.deepcopy(live, memo)


def _restore_methods(judge: Judge, state: dict) -> None:
    """Put the judge's method instances back to ``state`` (from :func:`_method_state`; itself left intact)."""
    memo: dict = {}  # one more shared-tensor copy: the same state serves every point
    _shared_tensors(state, memo, set())
    fresh = copy.deepcopy(state, memo)
    for m, attrs in fresh.items():
        inst = judge.method(m)  # the live instance the judge dispatches to, updated in place
        vars(inst).clear()
        vars(inst).update(attrs)


def _judge_all(judge: Judge, b: BenchSet, seeds: Sequence[int], methods: Sequence[str]) -> dict:
    """``{(seed, method): (original winner, latency_ms, label log-probs in original order, gate, decision)}``
    on each seed's shuffle of ``b`` (``gate`` / ``decision`` as the verdict reports them)."""
    out = {}
    for seed in seeds:
        perm = permutation(seed, b.cs.task_id, len(b.cs.candidates))
        shown, sources = shown_candidates(b.cs, perm, judge.candidate_kv, judge.lm.model_id)
        for m in methods:
            v = judge.judge(b.problem, shown, m, sources)
            scores = [0.0] * len(perm)
            for slot, orig in enumerate(perm):
                scores[orig] = v.scores[slot]
            out[(seed, m)] = (to_original(perm, v.winner), v.latency_ms, scores, v.gate, v.decision)
    return out


def _gate_counts(row: dict, gate: str | None, decision: dict | None) -> None:
    """Append one call's gate outcome and anchor measuring to ``row`` (``fallback`` / ``measured`` lists)."""
    if gate is not None:
        row.setdefault("fallback", []).append(gate == "fallback")
    if decision and "measured" in decision:
        row.setdefault("measured", []).append(bool(decision["measured"]))


def _rate(flags: list | None) -> float | None:
    return sum(flags) / len(flags) if flags else None


def bench_compress(
    candidates_path: str | Path,
    model: str | LoadedModel = "smollm2-135m",
    methods: Sequence[str] = ("laprox", "streaming", "snapkv", "knorm", "random"),
    ratios: Sequence[float] = (1.0, 0.5, 0.25, 0.1, 0.05),
    judge_methods: Sequence[str] = ("naive", "dg_jkr"),
    candidate_kv: str | None = "agent",
    seeds: Sequence[int] = (42,),
    limit: int | None = None,
    out_dir: str | Path | None = None,
    dataset: str | None = None,
    progress: Callable[[str], None] | None = None,
    debias: str = "none",
) -> dict:
    """Sweep kept ratio x compression method (see the module docstring) in candidate-KV mode
    ``candidate_kv`` (``None``: ``agent``); writes ``compress.json`` (after every set, so a sweep cut
    short keeps its numbers) and at the end ``compress_jcr.png`` into ``out_dir`` when given and returns
    the same dict; ``progress`` gets a line per set.

    Long on purpose: the sweep keeps the uncompressed reference, the compressed runs and the restore of
    the uncompressed KV in one place, so no point can be measured on a judge left in a compressed state.
    """
    mode = candidate_kv or "agent"
    if mode not in CANDIDATE_KV_MODES:
        raise CompressError(f"unknown candidate-KV mode {mode!r}; known: {', '.join(CANDIDATE_KV_MODES)}")
    if "none" in methods:
        raise CompressError("'none' is the uncompressed reference every point is compared with; leave it out of --methods")
    for what, given in (("kept ratio", [float(r) for r in ratios]), ("compression method", list(methods)),
                        ("judge method", list(judge_methods))):
        if not given:
            raise CompressError(f"no {what} given")
        twice = next((x for i, x in enumerate(given) if x in given[:i]), None)
        if twice is not None:
            raise CompressError(f"{what} {twice!r} given twice (each point is measured once)")
    for r in ratios:
        if not 0 < float(r) <= 1:
            raise CompressError(f"kept ratio must be in (0, 1], not {r!r}")
    sets = read_candidate_sets(candidates_path, dataset, limit, mode)
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    judge = Judge(lm, "dense", candidate_kv=mode, debias=debias)  # debias: label scores minus saved slot priors
    runner = judge.runner
    judge_methods = list(judge_methods)
    rows: dict[tuple, dict] = {}
    base: dict[str, dict] = {m: {"winners": [], "dense": [], "correct": [], "latency": []} for m in judge_methods}
    dense_bytes = done = 0
    result: dict = {}
    for b in sets:
        grades = _grades(b)
        # every distinct candidate once (original order), as the judge takes it and looks its KV up
        cands = shown_candidates(b.cs, range(len(b.cs.candidates)), mode, lm.model_id)[0]
        judge.prefetch(b.problem, cands)  # what the store would hold: encoded now, outside any latency
        keys = list(dict.fromkeys(judge.candidate_kv_request(b.problem, c)["key"] for c in cands))
        dense_segs = {k: runner.lookup(k) for k in keys}
        dense_bytes += sum(s.nbytes for s in dense_segs.values())
        before = _method_state(judge, judge_methods)  # every point of this set starts from it
        ref = _judge_all(judge, b, seeds, ["dense", *judge_methods])
        after = _method_state(judge, judge_methods)  # the next set continues from the reference
        for m in judge_methods:
            for seed in seeds:
                bm = base[m]
                bm["winners"].append(ref[(seed, m)][0])
                bm["dense"].append(ref[(seed, "dense")][0])
                bm["latency"].append(ref[(seed, m)][1])
                _gate_counts(bm, *ref[(seed, m)][3:])
                if grades:
                    bm["correct"].append(grades[ref[(seed, m)][0]])
        for method in methods:
            for ratio in ratios:
                try:
                    _restore_methods(judge, before)
                    compress_candidates(judge, b.problem, cands, {"method": method, "ratio": float(ratio)})
                    nbytes = sum(runner.lookup(k).nbytes for k in keys)
                    got = {}
                    for m in judge_methods:
                        try:
                            got.update(_judge_all(judge, b, seeds, [m]))
                        except Exception as exc:  # e.g. a method that edits candidate KV token by token
                            got.update({(seed, m): (None, float("nan"), None, None, None) for seed in seeds})
                            rows.setdefault((method, float(ratio), m), {}).setdefault("error", f"{type(exc).__name__}: {exc}")
                finally:  # the uncompressed KV back for the next point
                    for k, seg in dense_segs.items():
                        runner.remember(k, seg)
                for m in judge_methods:
                    row = rows.setdefault((method, float(ratio), m), {})
                    row["bytes"] = row.get("bytes", 0) + nbytes
                    for seed in seeds:
                        w, lat, scores, gate, decision = got[(seed, m)]
                        _gate_counts(row, gate, decision)
                        if scores is not None:  # how far the label log-probs moved (nats, mean over candidates)
                            row.setdefault("shift", []).append(
                                sum(abs(x - y) for x, y in zip(scores, ref[(seed, m)][2])) / len(scores))
                        row.setdefault("winners", []).append(w)
                        row.setdefault("dense", []).append(ref[(seed, "dense")][0])
                        row.setdefault("uncompressed", []).append(ref[(seed, m)][0])
                        row.setdefault("latency", []).append(lat)
                        if grades:
                            row.setdefault("correct", []).append(grades[w] if w is not None else False)
        _restore_methods(judge, after)
        done += 1
        result = _summary(rows, base, dense_bytes, lm.model_id, candidates_path, done, mode, seeds, methods, ratios,
                          judge_methods)
        if out_dir is not None:  # after every set: a long sweep cut short still leaves its numbers
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "compress.json").write_text(json.dumps(result, indent=2) + "\n")
        if progress:
            progress(f"{done}/{len(sets)} {b.cs.task_id}")
    if out_dir is not None:
        result["plot"] = str(plot_compress(result, Path(out_dir) / "compress_jcr.png"))
    return result


def _summary(rows: dict, base: dict, dense_bytes: int, model_id: str, path: str | Path, problems: int, mode: str,
             seeds: Sequence[int], methods: Sequence[str], ratios: Sequence[float], judge_methods: list[str]) -> dict:
    """The ``compress.json`` dict of the sets judged so far."""
    points = []
    for (method, ratio, m), row in rows.items():
        lat = [x for x in row["latency"] if x == x]
        if "error" in row:  # the judge method cannot run on compressed candidates: no numbers
            points.append({"method": method, "ratio": ratio, "judge_method": m, "jcr": None, "jcr_vs_uncompressed": None,
                           "accuracy": None, "store_bytes": row["bytes"], "latency_ms": None, "error": row["error"]})
            continue
        points.append({
            "method": method, "ratio": ratio, "judge_method": m,
            "jcr": jcr(row["winners"], row["dense"]),
            "jcr_vs_uncompressed": jcr(row["winners"], row["uncompressed"]),
            "accuracy": sum(row["correct"]) / len(row["correct"]) if row.get("correct") else None,
            "store_bytes": row["bytes"], "store_ratio": row["bytes"] / dense_bytes if dense_bytes else None,
            "latency_ms": sum(lat) / len(lat) if lat else None,
            "score_shift": sum(row["shift"]) / len(row["shift"]) if row.get("shift") else None,
            "fallback_rate": _rate(row.get("fallback")), "measured_rate": _rate(row.get("measured")),
        })
    uncompressed = {m: {"jcr": jcr(bm["winners"], bm["dense"]),
                        "accuracy": sum(bm["correct"]) / len(bm["correct"]) if bm["correct"] else None,
                        "store_bytes": dense_bytes, "latency_ms": sum(bm["latency"]) / len(bm["latency"]),
                        "fallback_rate": _rate(bm.get("fallback")), "measured_rate": _rate(bm.get("measured"))}
                    for m, bm in base.items()}
    return {"model": model_id, "candidates": str(path), "candidate_kv": mode, "problems": problems,
            "seeds": list(seeds), "methods": list(methods), "ratios": [float(r) for r in ratios],
            "judge_methods": judge_methods, "uncompressed": uncompressed, "points": points}


def plot_compress(result: dict, path: Path) -> Path:
    """One column per judge method: JCR (vs the dense judge) against kept ratio, one line per compression
    method, and below it the mean change of the label log-probabilities (``score_shift``), which moves
    where the winners do not."""
    import matplotlib  # function-body import: matplotlib is only needed when a plot is written

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    jms = result["judge_methods"]
    fig, axes = plt.subplots(2, len(jms), figsize=(5 * len(jms), 7), squeeze=False, sharex=True)
    for col, jm in enumerate(jms):
        top, bottom = axes[0][col], axes[1][col]
        for method in result["methods"]:
            pts = sorted((p["ratio"], p["jcr"], p.get("score_shift")) for p in result["points"]
                         if p["method"] == method and p["judge_method"] == jm and "error" not in p)
            if pts:
                top.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method, alpha=0.8)
                shift = [(p[0], p[2]) for p in pts if p[2] is not None]
                if shift:
                    bottom.plot(*zip(*shift), marker="o", label=method, alpha=0.8)
        top.axhline(result["uncompressed"][jm]["jcr"], color="grey", linestyle="--", label="uncompressed")
        top.set_ylabel("JCR vs dense judge")
        top.set_title(f"{jm} ({str(result['model']).split('@')[0]}, {result.get('problems')} sets)", fontsize=10)
        top.legend(fontsize=8)
        bottom.set_xscale("log")
        bottom.set_xlabel("kept ratio of candidate KV")
        bottom.set_ylabel(f"mean |change| of label log-prob\nvs {jm} uncompressed (nats)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
