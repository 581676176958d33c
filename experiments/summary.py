"""Summary statistics of an eval run, per method: JCR, JCR-F, pass@1, coverage, reuse and measuring
rates, latency (bootstrap CIs and per-seed mean/std), plus paired significance tests of DG-JKR
against the other methods and the partition analysis (candidate lengths where DG-JKR's arms agree
vs fall back).

Records whose generated answer names no candidate (``winner_original`` None, ``generate`` output)
are left out of JCR, as the reference evaluation does (``paper_repair/eval/jcr.py``), and counted
as ``unparseable``; pass@1 counts them as failures.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvjudge.experiments import metrics as M
from kvjudge.judges.catalog import GATE_METHODS
from kvjudge.topologies.results import ResultsLog

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
              lengths: dict[str, list[int]] | None = None) -> dict:
    """``{"methods", "significance", "partition", "partition_pooled"}`` from the records of ``log``
    (fractions in [0, 1])."""
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
    return {"methods": out, "significance": significance(log, keys, out),
            "partition": partition(log, seed42, lengths, unit=f"problem, seed {PAPER_PARTITION_SEED}") or pooled,
            "partition_pooled": pooled}


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
        ps = {"n": len(idx), "jcr": _rate(sc), "jcr_f": M.rate([fcons[i] for i in idx]),
              "pass_at_1": M.rate([passed[i] for i in idx]), "reuse_rate": M.rate([reused[i] for i in idx]),
              "latency_ms": M.mean_latency([lat[i] for i in idx])}
        if accepted:
            ps["coverage"] = M.rate([accepted[i] for i in idx])
        if m == "random_gate":
            ps["coverage_target"] = recs[idx[0]].get("coverage_target")
        per_seed[str(s)] = ps
    row["per_seed"] = per_seed
    for metric in ("jcr", "pass_at_1", "jcr_f") + (("coverage",) if accepted else ()):
        vals = {s: v[metric] for s, v in per_seed.items() if v[metric] is not None}
        row[f"{metric}_mean_std"] = list(M.mean_std_over_seeds(vals)) if vals else None
    return row


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
