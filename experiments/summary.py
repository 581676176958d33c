"""Summary statistics of an eval run, per method: JCR, JCR-F, pass@1, coverage, reuse and measuring
rates, latency (bootstrap CIs and per-seed mean/std), plus paired significance tests of DG-JKR
against the other methods and the partition analysis (candidate lengths where DG-JKR's arms agree
vs fall back).

Beside every JCR: the chance agreement ``p_e`` and Cohen's kappa against dense, computed on the very
calls JCR counts (display slots; a CI that resamples problems), JCR by the slot of dense's winner, the
winner-slot histogram and position consistency (the same candidate chosen under every shuffle). What
the candidates offer any judge -- oracle, random-pick and majority-vote accuracy, distinct answers and
token overlap per set -- is in ``content`` (:func:`content_measures`).

Records whose generated answer names no candidate (``winner_original`` None, ``generate`` output)
are left out of JCR, as the reference evaluation does (``paper_repair/eval/jcr.py``), and counted
as ``unparseable``; pass@1 counts them as failures.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kvjudge.experiments import metrics as M
from kvjudge.experiments.datasets import get_dataset, is_dataset
from kvjudge.judges.catalog import GATE_METHODS
from kvjudge.runtime.results import ResultsLog

PAPER_PARTITION_SEED = 42  # the DG-JKR paper's partition analysis: one record per problem, seed 42


def gate_accepted(rec: dict) -> bool:
    """Whether a gated record kept the reuse answer (``gate``; older records: ``decision``)."""
    if "gate" in rec:
        return rec.get("gate") == "accepted"
    decision = rec.get("decision") or {}
    return bool(decision.get("agreed", decision.get("accepted")))


def _ci(values: Sequence[float]) -> list[float]:
    return list(M.bootstrap_ci([float(v) for v in values]))


def _rate(flags: Sequence) -> float | None:
    return M.rate(flags) if len(flags) else None


def summarize(log: ResultsLog, task_ids: Sequence[str], seeds: Sequence[int], methods: Sequence[str],
              lengths: dict[str, list[int]] | None = None, *, dataset: str | None = None,
              candidates: dict[str, list[str]] | None = None, passes: dict[str, list[bool]] | None = None) -> dict:
    """``{"methods", "significance", "partition", "partition_pooled"}`` from the records of ``log``
    (fractions in [0, 1]), plus ``content`` (:func:`content_measures`) when ``candidates`` (task id ->
    texts in original order) and ``passes`` (the same, graded) are given."""
    keys = [(t, s) for s in seeds for t in task_ids if (t, s, "dense") in log]
    if not keys:
        raise ValueError("no judged (problem, seed) pairs to summarise")
    dense = {k: log.get((*k, "dense")) for k in keys}
    dense_lat = M.mean_latency([dense[k]["latency_ms"] for k in keys])
    out: dict[str, dict] = {}
    for m in methods:
        ks = [k for k in keys if (*k, m) in log]
        if ks:
            out[m] = method_row(m, [log.get((*k, m)) for k in ks], [dense[k] for k in ks], [k[1] for k in ks],
                                seeds, dense_lat)
    if "dg_jkr" in out and "naive" in out and "kvcomm" in out:
        dg = out["dg_jkr"]
        arms = max(out["naive"]["latency_ms"], out["kvcomm"]["latency_ms"])
        # the paper's accounting: both arms in parallel, dense only on fallback
        dg["latency_ms_parallel_arms"] = arms + (1.0 - (dg["coverage"] or 0.0)) * dense_lat
        dg["latency_ratio_parallel_arms"] = dg["latency_ms_parallel_arms"] / dense_lat if dense_lat > 0 else None
    pooled = partition(log, keys, lengths, unit="(problem, seed) record")
    seed42 = [k for k in keys if k[1] == PAPER_PARTITION_SEED]
    summary = {"methods": out, "significance": significance(log, keys, out),
               "partition": partition(log, seed42, lengths, unit=f"problem, seed {PAPER_PARTITION_SEED}") or pooled,
               "partition_pooled": pooled}
    if candidates is not None and passes is not None:
        tids = list(dict.fromkeys(k[0] for k in keys))
        summary["content"] = content_measures(dataset, {t: candidates[t] for t in tids}, {t: passes[t] for t in tids})
    return summary


def method_row(m: str, recs: list[dict], dense: list[dict], rec_seeds: list[int], seeds: Sequence[int],
               dense_lat: float) -> dict:
    """One method's metrics over its records (aligned with dense's records of the same keys)."""
    won = [r["winner_original"] for r in recs]
    dwon = [d["winner_original"] for d in dense]
    parsed = [w is not None and d is not None for w, d in zip(won, dwon)]
    cons = [a == b for a, b, ok in zip(won, dwon, parsed) if ok]
    passed = [bool(r["passed"]) for r in recs]
    dpassed = [bool(d["passed"]) for d in dense]
    fcons = [a == b for a, b in zip(passed, dpassed)]
    reused = [bool(r["reused"]) for r in recs]
    measured = [bool((r.get("decision") or {}).get("measured")) for r in recs]
    lat = [float(r["latency_ms"]) for r in recs]
    accepted = [gate_accepted(r) for r in recs] if m in GATE_METHODS else None
    row: dict = {
        "n": len(recs), "unparseable": parsed.count(False), "unparseable_rate": parsed.count(False) / len(recs),
        "pass_at_1": M.pass_at_1(passed), "pass_at_1_ci": _ci(passed),
        "jcr": _rate(cons), "jcr_ci": _ci(cons) if cons else None,
        "jcr_f": M.jcr_f(passed, dpassed), "jcr_f_ci": _ci(fcons),
        "reuse_rate": M.reuse_rate(reused), "reuse_rate_ci": _ci(reused),
        "measured_rate": M.rate(measured),
        "coverage": M.coverage(accepted) if accepted else None,
        "coverage_ci": _ci(accepted) if accepted else None,
        "latency_ms": M.mean_latency(lat), "latency_ms_ci": _ci(lat),
    }
    row["latency_ratio"] = row["latency_ms"] / dense_lat if dense_lat > 0 else None
    row.update(agreement(recs, dense))
    if accepted:
        flags = [c for c, ok in zip(accepted, parsed) if ok]
        row["precision"] = M.precision_on_agreement(flags, cons) if cons else None
        row["precision_f"] = M.precision_on_agreement(accepted, fcons)
    per_seed: dict[str, dict] = {}
    for s in seeds:
        idx = [i for i, rs in enumerate(rec_seeds) if rs == s]
        if not idx:
            continue
        sc = [won[i] == dwon[i] for i in idx if parsed[i]]
        ps = {"n": len(idx), "jcr": _rate(sc), **_kappa([recs[i] for i in idx], [dense[i] for i in idx]),
              "jcr_f": M.rate([fcons[i] for i in idx]),
              "pass_at_1": M.rate([passed[i] for i in idx]), "reuse_rate": M.rate([reused[i] for i in idx]),
              "latency_ms": M.mean_latency([lat[i] for i in idx])}
        if accepted:
            ps["coverage"] = M.rate([accepted[i] for i in idx])
        if m == "random_gate":
            ps["coverage_target"] = recs[idx[0]].get("coverage_target")
        per_seed[str(s)] = ps
    row["per_seed"] = per_seed
    for metric in ("jcr", "kappa", "pass_at_1", "jcr_f") + (("coverage",) if accepted else ()):
        vals = {s: v[metric] for s, v in per_seed.items() if v[metric] is not None}
        row[f"{metric}_mean_std"] = list(M.mean_std_over_seeds(vals)) if vals else None
    return row


def _slots(recs: list[dict], dense: list[dict]) -> tuple[list, list, list]:
    """Winner slots of the method and of dense, and the problem, of the calls JCR counts (both named
    a candidate), aligned."""
    keep = [(r["winner_slot"], d["winner_slot"], str(r["task_id"])) for r, d in zip(recs, dense)
            if r["winner_original"] is not None and d["winner_original"] is not None]
    return [k[0] for k in keep], [k[1] for k in keep], [k[2] for k in keep]


def _kappa(recs: list[dict], dense: list[dict]) -> dict:
    """``p_e`` and kappa against dense on the calls JCR counts (``None`` where there are none)."""
    ms, ds, _ = _slots(recs, dense)
    if not ms:
        return {"p_e": None, "kappa": None}
    return {"p_e": M.chance_agreement(ms, ds), "kappa": M.cohen_kappa(ms, ds)}


def agreement(recs: list[dict], dense: list[dict]) -> dict:
    """Chance-corrected and position measures of one method's records against dense's (aligned).

    ``p_e``, ``kappa`` and ``kappa_ci`` (95% percentile bootstrap resampling problems, seed 0) over the
    calls JCR counts; ``jcr_by_dense_slot`` (entry k-1: JCR on calls where dense's winner sat in display
    slot k); ``winner_slots`` (the method's own winners by display slot, fractions); ``n_slots``;
    ``position_consistency`` (``all``, ``pairwise``, ``n_problems``: the same original candidate under
    every shuffle seed, :func:`kvjudge.experiments.metrics.position_consistency`)."""
    n_slots = max(len(r["permutation"]) for r in recs)
    ms, ds, groups = _slots(recs, dense)
    named = [r["winner_slot"] for r in recs if r["winner_original"] is not None]
    choices: dict[str, list] = {}
    for r in sorted(recs, key=lambda r: int(r["seed"])):
        choices.setdefault(str(r["task_id"]), []).append(r["winner_original"])
    out = {**_kappa(recs, dense),
           "kappa_ci": (list(ci) if ms and (ci := M.kappa_bootstrap_ci(ms, ds, groups)) else None),
           "jcr_by_dense_slot": M.jcr_by_slot(ms, ds, n_slots) if ms else None,
           "winner_slots": M.slot_histogram(named, n_slots) if named else None,
           "n_slots": n_slots,
           "position_consistency": M.position_consistency(choices)}
    return out


_WORD = re.compile(r"\w+")


def content_measures(dataset: str | None, candidates: dict[str, list[str]], passes: dict[str, list[bool]]) -> dict:
    """What the candidate sets give any judge to read: ``oracle`` (a set has a passing candidate),
    ``random_pick`` (expected accuracy of a uniform pick), ``majority_vote`` over the candidates' final
    answers (the data set's own answer extraction; ``None`` for data sets without one, e.g. HumanEval),
    ``distinct_answers`` (mean distinct final answers per set; stripped texts where there is no answer
    extraction), ``token_overlap`` (mean over sets of the mean pairwise Jaccard overlap of the
    candidates' lower-cased word tokens) and ``n_sets``."""
    tids = list(candidates)
    if not tids:
        raise ValueError("content_measures: no candidate sets")
    extract = get_dataset(dataset).answer if dataset and is_dataset(dataset) else None
    answers = [[extract(c) for c in candidates[t]] if extract else [c.strip() or None for c in candidates[t]]
               for t in tids]
    ok = [list(passes[t]) for t in tids]
    overlaps = [v for t in tids if (v := M.token_overlap([_WORD.findall(c.lower()) for c in candidates[t]]))
                is not None]
    return {
        "n_sets": len(tids), "oracle": M.oracle_accuracy(ok), "random_pick": M.random_pick_accuracy(ok),
        "majority_vote": M.majority_vote_accuracy(answers, ok) if extract else None,
        "distinct_answers": sum(M.distinct_answers(a) for a in answers) / len(answers),
        "token_overlap": sum(overlaps) / len(overlaps) if overlaps else None,
    }


def significance(log: ResultsLog, keys: list[tuple[str, int]], rows: dict[str, dict]) -> dict[str, dict]:
    """McNemar-style paired tests of DG-JKR's consistency against the random gate, naive and KVCOMM."""
    out: dict[str, dict] = {}
    for a, b in (("dg_jkr", "random_gate"), ("dg_jkr", "naive"), ("dg_jkr", "kvcomm")):
        if a not in rows or b not in rows:
            continue
        ks = [k for k in keys if (*k, a) in log and (*k, b) in log
              and log.get((*k, a))["consistent"] is not None and log.get((*k, b))["consistent"] is not None]
        if not ks:
            continue
        ca = [bool(log.get((*k, a))["consistent"]) for k in ks]
        cb = [bool(log.get((*k, b))["consistent"]) for k in ks]
        test = M.paired_test(ca, cb)
        out[f"{a}_vs_{b}"] = {**test, "jcr_a": M.rate(ca), "jcr_b": M.rate(cb), "gap": M.rate(ca) - M.rate(cb),
                              "significant": test["p_value"] < 0.05}
    return out


def partition(log: ResultsLog, keys: list[tuple[str, int]], lengths: dict[str, list[int]] | None,
              unit: str) -> dict | None:
    """Candidate lengths where DG-JKR's arms agreed vs fell back (Mann-Whitney), over ``keys``."""
    if not lengths:
        return None
    agree, disagree = [], []
    for k in keys:
        r = log.get((*k, "dg_jkr"))
        if r is not None and k[0] in lengths:
            (agree if gate_accepted(r) else disagree).append(lengths[k[0]])
    if not agree and not disagree:
        return None
    return {"unit": unit, **M.partition_analysis(agree, disagree)}
