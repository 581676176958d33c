"""Summary statistics of an eval run: per method JCR, JCR-F, pass@1, coverage, latency (with bootstrap
CIs and per-seed mean/std), paired significance tests of DG-JKR against the other gates, and the
partition analysis (candidate lengths where DG-JKR's arms agree vs fall back)."""

from __future__ import annotations

from collections.abc import Sequence

from kvjudge.experiments import metrics as M
from kvjudge.judges.catalog import GATE_METHODS
from kvjudge.topologies.results import ResultsLog


def gate_accepted(rec: dict) -> bool:
    """Whether a gated record kept the reuse answer (``gate``; older records: ``decision``)."""
    if "gate" in rec:
        return rec.get("gate") == "accepted"
    decision = rec.get("decision") or {}
    return bool(decision.get("agreed", decision.get("accepted")))


def _ci(values: Sequence[float]) -> list[float]:
    return list(M.bootstrap_ci([float(v) for v in values]))


def summarize(log: ResultsLog, task_ids: Sequence[str], seeds: Sequence[int], methods: Sequence[str],
              lengths: dict[str, list[int]] | None = None) -> dict:
    """``{"methods", "significance", "partition"}`` from the records of ``log`` (fractions in [0, 1])."""
    keys = [(t, s) for s in seeds for t in task_ids if (t, s, "dense") in log]
    if not keys:
        raise ValueError("no judged (problem, seed) pairs to summarise")
    dense = {k: log.get((*k, "dense")) for k in keys}
    dense_lat = M.mean_latency([dense[k]["latency_ms"] for k in keys])
    out: dict[str, dict] = {}
    for m in methods:
        ks = [k for k in keys if (*k, m) in log]
        if not ks:
            continue
        recs = [log.get((*k, m)) for k in ks]
        won = [r["winner_original"] for r in recs]
        dwon = [dense[k]["winner_original"] for k in ks]
        passed = [bool(r["passed"]) for r in recs]
        dpassed = [bool(dense[k]["passed"]) for k in ks]
        cons = [a == b for a, b in zip(won, dwon)]
        fcons = [a == b for a, b in zip(passed, dpassed)]
        reused = [bool(r["reused"]) for r in recs]
        lat = [float(r["latency_ms"]) for r in recs]
        accepted = [gate_accepted(r) for r in recs] if m in GATE_METHODS else None
        row: dict = {
            "n": len(recs),
            "pass_at_1": M.pass_at_1(passed), "pass_at_1_ci": _ci(passed),
            "jcr": M.jcr(won, dwon), "jcr_ci": _ci(cons),
            "jcr_f": M.jcr_f(passed, dpassed), "jcr_f_ci": _ci(fcons),
            "reuse_rate": M.reuse_rate(reused), "reuse_rate_ci": _ci(reused),
            "coverage": M.coverage(accepted) if accepted else None,
            "coverage_ci": _ci(accepted) if accepted else None,
            "latency_ms": M.mean_latency(lat), "latency_ms_ci": _ci(lat),
        }
        row["latency_ratio"] = row["latency_ms"] / dense_lat if dense_lat > 0 else None
        if accepted:
            row["precision"] = M.precision_on_agreement(accepted, cons)
            row["precision_f"] = M.precision_on_agreement(accepted, fcons)
        per_seed: dict[str, dict] = {}
        for s in seeds:
            idx = [i for i, k in enumerate(ks) if k[1] == s]
            if not idx:
                continue
            ps = {"n": len(idx),
                  "jcr": M.rate([cons[i] for i in idx]),
                  "jcr_f": M.rate([fcons[i] for i in idx]),
                  "pass_at_1": M.rate([passed[i] for i in idx]),
                  "reuse_rate": M.rate([reused[i] for i in idx]),
                  "latency_ms": M.mean_latency([lat[i] for i in idx])}
            if accepted:
                ps["coverage"] = M.rate([accepted[i] for i in idx])
            if m == "random_gate":
                ps["coverage_target"] = recs[idx[0]].get("coverage_target")
            per_seed[str(s)] = ps
        row["per_seed"] = per_seed
        for metric in ("jcr", "pass_at_1", "jcr_f") + (("coverage",) if accepted else ()):
            row[f"{metric}_mean_std"] = list(M.mean_std_over_seeds({s: v[metric] for s, v in per_seed.items()}))
        out[m] = row

    significance: dict[str, dict] = {}
    for a, b in (("dg_jkr", "random_gate"), ("dg_jkr", "naive"), ("dg_jkr", "kvcomm")):
        if a in out and b in out:
            ks = [k for k in keys if (*k, a) in log and (*k, b) in log]
            ca = [bool(log.get((*k, a))["consistent"]) for k in ks]
            cb = [bool(log.get((*k, b))["consistent"]) for k in ks]
            test = M.paired_test(ca, cb)
            significance[f"{a}_vs_{b}"] = {**test, "jcr_a": M.rate(ca), "jcr_b": M.rate(cb),
                                           "gap": M.rate(ca) - M.rate(cb), "significant": test["p_value"] < 0.05}

    partition = None
    if "dg_jkr" in out and lengths:
        agree, disagree = [], []
        for k in keys:
            r = log.get((*k, "dg_jkr"))
            if r is None or k[0] not in lengths:
                continue
            (agree if gate_accepted(r) else disagree).append(lengths[k[0]])
        if agree or disagree:
            partition = {"unit": "(problem, seed) record", **M.partition_analysis(agree, disagree)}
    return {"methods": out, "significance": significance, "partition": partition}
