"""``kvjudge calibrate-gate``: judge calibration problems with dense and a cheap path, fit the gate.

Per (problem, shuffle seed) one call: the candidates in the seed's permutation (as ``kvjudge eval``
shows them, :func:`~kvjudge.experiments.judging.permutation`), judged by ``dense`` and by ``selective``
at lambda = -inf (= its cheap path, plus its confidence and, for ``risk``, its features; call for call
the cheap path's answer). A call *errs* when the cheap winner (original candidate id) differs from
dense's. The gate (:func:`fit_gate`) is lambda from :func:`~kvjudge.experiments.gates.fixed_sequence_lambda`
on those calls; with ``score risk`` the logistic model is fitted on the first ``fit_share`` of the
problems and lambda on the others (fitting and testing on the same calls would void the guarantee).

Problems: the candidate sets of ``--candidates`` in their dataset's sampling order (the task ids'
dataset, read from ``--data`` when given; MMLU is stratified) with ``--offset`` / ``--limit`` applied;
sets whose task id names no dataset keep the file's order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvjudge.experiments import gates as G
from kvjudge.experiments.candidates import CandidateSet, load_candidates, with_agent_prompts
from kvjudge.experiments.datasets import is_dataset, load_dataset
from kvjudge.experiments.judging import permutation, shown_candidates, to_original
from kvjudge.judges.judge import Judge
from kvjudge.judges.methods.selective import FEATURES, GATE_VERSION, PROBE_LAYER, canonical_cheap
from kvjudge.topologies import load_topology, resolve_topology

AGENT_TOPOLOGY = "progressive_refinement"  # rebuilds agent prompts of files written without them


@dataclass
class GateSet:
    """One candidate set to judge and its problem text."""

    cs: CandidateSet
    problem: str


def read_sets(path: str | Path, data: str | None = None, offset: int = 0, limit: int | None = None,
              candidate_kv: str = "agent") -> list[GateSet]:
    """The candidate sets of ``path`` to judge, in dataset sampling order, ``offset`` / ``limit`` applied
    (see the module docstring); one-line ``ValueError`` when none is left or a problem text is missing."""
    if offset < 0 or (limit is not None and limit < 1):
        raise ValueError(f"need --offset >= 0 and --limit >= 1, got {offset} and {limit}")
    sets = load_candidates(path)
    names = sorted({tid.split("/")[0] for tid in sets if is_dataset(tid.split("/")[0])})
    if len(names) > 1:
        raise ValueError(f"{path} mixes datasets ({', '.join(names)}): calibrate one at a time")
    if names:
        order = load_dataset(names[0], path=data)
        texts = {str(p["id"]): p["prompt"] for p in order}
        ids = [str(p["id"]) for p in order if str(p["id"]) in sets]
    else:
        texts, ids = {}, list(sets)
    ids = ids[offset:] if limit is None else ids[offset:offset + limit]
    if not ids:
        raise ValueError(f"{path}: no candidate set left after --offset {offset}" + (f" --limit {limit}" if limit else ""))
    out = []
    for tid in ids:
        problem = sets[tid].problem if sets[tid].problem is not None else texts.get(tid)
        if problem is None:
            raise ValueError(f"task {tid!r} has no problem text and names no dataset")
        out.append(GateSet(sets[tid], problem))
    if candidate_kv == "agent" and any(g.cs.agent_prompts is None and not g.cs.prompt_ids for g in out):
        with_agent_prompts({g.cs.task_id: g.cs for g in out}, {g.cs.task_id: g.problem for g in out},
                           load_topology(resolve_topology(AGENT_TOPOLOGY)))
    return out


def _side(v, perm: list[int], extra_tokens: float = 0.0) -> dict:
    return {"winner": None if v.winner is None else to_original(perm, v.winner), "slot": v.winner,
            "latency_ms": float(v.latency_ms), "prefilled": float(v.prefilled_tokens) + extra_tokens}


def collect_calls(judge: Judge, sets: Sequence[GateSet], seeds: Sequence[int], cheap: str, probe: bool,
                  methods: Sequence[str] = (), progress: Callable[[str], None] | None = None,
                  dense: dict[tuple[str, int], dict] | None = None) -> list[dict]:
    """One record per (set, seed): ``dense``, ``cheap`` (the cheap path's answer, timed with its margin),
    with ``probe`` also ``risk`` (cheap path + the feature probe, timed; ``features``), ``margin``,
    ``agree`` and one entry per extra method in ``methods`` (e.g. ``dg_jkr``). Each side holds the
    original-id ``winner``, display ``slot``, ``latency_ms`` and ``prefilled`` tokens (the probe counted
    as ``probe_tokens * probe_layers / layers`` token-equivalents). Also ``identity``: what a gate fitted
    on the call is fitted for. ``dense``: dense sides by ``(task_id, seed)``, filled here and reused, so a
    second cheap path over the same sets does not judge dense again."""
    cfg = judge.lm.model.config
    layers = getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "num_hidden_layers", 1)
    margin_m = judge.method("selective", cheap=cheap, score="margin", gate=-math.inf)
    risk_m = judge.method("selective", cheap=cheap, score="risk", gate=-math.inf) if probe else None
    calls, warmed, dense = [], False, {} if dense is None else dense
    for g in sets:
        for seed in seeds:
            perm = permutation(seed, g.cs.task_id, len(g.cs.candidates))
            shown, sources = shown_candidates(g.cs, perm, judge.candidate_kv, judge.lm.model_id)
            judge.prefetch(g.problem, shown)  # what a store would hold: outside every latency
            if not warmed:  # first-call overheads out of the timed runs
                for m in ("dense", "selective", *methods):
                    judge._methods["selective"] = margin_m
                    judge.judge(g.problem, shown, method=m, sources=sources)
                warmed = True
            rec: dict = {"task_id": g.cs.task_id, "seed": seed, "n": len(perm)}
            if (g.cs.task_id, seed) not in dense:
                dense[g.cs.task_id, seed] = _side(judge.judge(g.problem, shown, method="dense", sources=sources), perm)
            rec["dense"] = dense[g.cs.task_id, seed]
            judge._methods["selective"] = margin_m
            v = judge.judge(g.problem, shown, method="selective", sources=sources)
            rec["cheap"] = _side(v, perm)
            rec["margin"] = float(v.decision["confidence"])
            if risk_m is not None:
                judge._methods["selective"] = risk_m
                r = judge.judge(g.problem, shown, method="selective", sources=sources)
                d = r.decision
                rec["risk"] = _side(r, perm, d["probe_tokens"] * d["probe_layers"] / layers)
                rec["features"] = d["features"]
                rec["key_deviation"] = d["key_deviation"]
            for m in methods:
                rec[m] = _side(judge.judge(g.problem, shown, method=m, sources=sources), perm)
            rec["agree"] = rec["cheap"]["winner"] is not None and rec["cheap"]["winner"] == rec["dense"]["winner"]
            rec["identity"] = margin_m.fitted_identity(judge.engine, judge.case(g.problem, shown, sources))
            calls.append(rec)
            if progress:
                progress(f"{cheap}: {len(calls)}/{len(sets) * len(seeds)} {g.cs.task_id} seed {seed}")
    return calls


def fit_gate(calls: Sequence[dict], score: str, alpha: float, delta: float, fit_share: float = 0.5,
             risk: dict | None = None, min_accepted: int = G.MIN_ACCEPTED) -> dict:
    """The gate file's dict for ``calls`` (:func:`collect_calls` records, all of one identity).

    With ``score risk`` the calls are split by problem: the first ``fit_share`` fit the logistic model
    (unless ``risk``, a model already fitted on that same share, is given) and lambda is set on the rest."""
    ids = {tuple(sorted(c["identity"].items())) for c in calls}
    if len(ids) != 1:
        raise ValueError("the calibration calls were judged under different models, modes or slot priors")
    identity = {**calls[0]["identity"], "score": score}
    cal, n_fit = list(calls), 0
    if score == "risk":  # the same split whether the model is fitted here or was fitted before on it
        tasks = list(dict.fromkeys(c["task_id"] for c in calls))
        k = int(round(fit_share * len(tasks)))
        if not 0 < k < len(tasks):
            raise ValueError(f"--fit-share {fit_share} leaves no problems to fit the risk model on or to calibrate")
        fit_ids = set(tasks[:k])
        fit = [c for c in calls if c["task_id"] in fit_ids]
        cal = [c for c in calls if c["task_id"] not in fit_ids]
        if risk is None:
            risk = G.fit_risk([[c["features"][f] for f in FEATURES] for c in fit], [c["agree"] for c in fit], FEATURES)
        n_fit = len(fit)
    conf = [confidence(c, score, risk) for c in cal]
    res = G.fixed_sequence_lambda(conf, [not c["agree"] for c in cal], alpha, delta, G.grid(score), min_accepted)
    return {
        "version": GATE_VERSION, "lambda": None if math.isinf(res["lambda"]) else res["lambda"],
        "alpha": alpha, "delta": delta, "n": res["n"], "bound": res["bound"], "accepted": res["accepted"],
        "errors": res["errors"], "coverage": res["coverage"], "disagreement": 1 - sum(c["agree"] for c in cal) / len(cal),
        "n_fit": n_fit, "min_accepted": max(min_accepted, G.min_calls(alpha, delta)),
        "grid": {"levels": G.GRID_LEVELS, "scale": "margin: -log(1-u) nats" if score == "margin" else "risk: u"},
        "risk": risk if score == "risk" else None, "fitted_for": identity,
        "key_deviation": sorted({c.get("key_deviation", "not probed") for c in calls}),
        "probe_layer": PROBE_LAYER if score == "risk" else None,
    }


def confidence(call: dict, score: str, risk: dict | None) -> float:
    """The gate's confidence on a recorded call (what ``selective`` computes at judge time)."""
    from kvjudge.judges.methods.selective import risk_confidence

    return call["margin"] if score == "margin" else risk_confidence(risk, call["features"])


def calibrate_gate(candidates: str | Path, out: str | Path, model: str = "smollm2-135m", alpha: float = 0.05,
                   delta: float = 0.1, score: str = "margin", cheap: str = "naive", candidate_kv: str = "agent",
                   debias: str = "none", data: str | None = None, offset: int = 0, limit: int | None = None,
                   seeds: Sequence[int] = (42,), fit_share: float = 0.5, device: str | None = None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Judge the calibration calls and write the gate to ``out`` (JSON); returns the gate's dict."""
    from kvjudge.models import load_model

    if score not in G.SCORES:
        raise ValueError(f"--score must be one of {', '.join(G.SCORES)}, not {score!r}")
    if not 0 < alpha < 1 or not 0 < delta < 1:
        raise ValueError(f"--alpha and --delta must be in (0, 1), got {alpha} and {delta}")
    cheap = canonical_cheap(cheap)
    sets = read_sets(candidates, data, offset, limit, candidate_kv)
    judge = Judge(load_model(model, device=device), candidate_kv=candidate_kv, output="label", debias=debias)
    calls = collect_calls(judge, sets, seeds, cheap, probe=score == "risk", progress=progress)
    gate = fit_gate(calls, score, alpha, delta, fit_share)
    gate["source"] = {"candidates": str(candidates), "data": data, "offset": offset, "limit": limit,
                      "problems": len(sets), "seeds": list(seeds)}
    write_gate(out, gate)
    return gate


def write_gate(path: str | Path, gate: dict) -> Path:
    """Write a gate file (JSON, ``lambda: null`` when nothing passed)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(gate, indent=1) + "\n", encoding="utf-8")
    return path
