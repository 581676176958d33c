"""Judging candidate sets under shuffles: one record per (problem, seed, method).

For each shuffle seed the candidates of each problem are permuted with
``random.Random(f"{seed}:{task_id}")`` and dense plus every requested method judge the **same**
permutation on one in-process :class:`~kvjudge.judges.judge.Judge` (candidate KV is encoded once
and only re-indexed afterwards). Winners are mapped back to the original candidate index before
they are compared with dense's. ``random_gate`` is coverage-matched: its coverage on a seed is
DG-JKR's agreement rate on that seed (DG-JKR runs first), or the paper's 0.83 without DG-JKR.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence

from kvjudge.experiments import metrics as M
from kvjudge.experiments.candidates import CandidateSet
from kvjudge.experiments.config import PAPER_RANDOM_COVERAGE
from kvjudge.experiments.summary import gate_accepted
from kvjudge.judges.base import Verdict
from kvjudge.judges.judge import Judge
from kvjudge.topologies.results import ResultsLog


def record_key(rec: dict) -> tuple[str, int, str]:
    """The key of an eval record: ``(task_id, seed, method)``."""
    return str(rec["task_id"]), int(rec["seed"]), str(rec["method"])


def permutation(seed: int, task_id: str, n: int) -> list[int]:
    """The shuffle of ``n`` candidates for (``seed``, ``task_id``): ``perm[slot] = original index``
    (slot 0-based, display order)."""
    perm = list(range(n))
    random.Random(f"{seed}:{task_id}").shuffle(perm)
    return perm


def to_original(perm: Sequence[int], winner_slot: int) -> int:
    """Map a 1-based display slot (``Verdict.winner``) back to the original 0-based candidate index."""
    if not 1 <= winner_slot <= len(perm):
        raise ValueError(f"winner slot {winner_slot} outside 1..{len(perm)}")
    return int(perm[winner_slot - 1])


def gate_seed(seed: int, task_id: str) -> int:
    """The random gate's seed for one (shuffle seed, problem): independent of run order, so a
    resumed run draws exactly what an uninterrupted one would."""
    # a 64-bit hash: crc32 seeds of near-identical strings gave visibly correlated first draws
    # (60 of 60 below 0.87 on one run)
    return int.from_bytes(hashlib.sha256(f"random_gate:{seed}:{task_id}".encode()).digest()[:8], "little")


def judge_record(task_id: str, seed: int, perm: list[int], verdict: Verdict, passes: list[bool], dense: dict | None,
            extra: dict | None = None) -> dict:
    orig = to_original(perm, verdict.winner)
    rec = {
        "task_id": task_id,
        "seed": seed,
        "method": verdict.method,
        "permutation": list(perm),
        "winner_slot": int(verdict.winner),
        "winner_original": orig,
        "passed": bool(passes[orig]),
        "consistent": True if dense is None else orig == dense["winner_original"],
        "reused": bool(verdict.reused),
        "latency_ms": float(verdict.latency_ms),
        "decision": verdict.decision,
        "gate": verdict.gate,
        "scores": [float(s) for s in verdict.scores],
        "prefilled_tokens": int(verdict.prefilled_tokens),
        "encoded_tokens": int(verdict.encoded_tokens),
    }
    if extra:
        rec.update(extra)
    return rec


def running_metrics(log: ResultsLog) -> str:
    """Pass@1 of dense and JCR of each reuse method over the records so far (for the progress line)."""
    by_method: dict[str, list[dict]] = {}
    for rec in log.latest():
        by_method.setdefault(rec["method"], []).append(rec)
    parts = []
    if by_method.get("dense"):
        parts.append(f"pass@1 {M.pass_at_1([r['passed'] for r in by_method['dense']]):.2f}")
    for name, recs in sorted(by_method.items()):
        if name != "dense":
            parts.append(f"JCR {name} {M.rate([r['consistent'] for r in recs]):.2f}")
    return "  ".join(parts)


def dg_coverage(log: ResultsLog, seed: int, task_ids: Sequence[str]) -> float | None:
    """DG-JKR's agreement rate on ``seed`` over ``task_ids`` (``None`` without DG-JKR records)."""
    flags = [gate_accepted(r) for t in task_ids
             if (r := log.get((t, seed, "dg_jkr"))) is not None]
    return (sum(flags) / len(flags)) if flags else None


def judge_all(judge: Judge, problems: Sequence[dict], sets: dict[str, CandidateSet], passes: dict[str, list[bool]],
              seeds: Sequence[int], methods: Sequence[str], log: ResultsLog,
              progress: Callable[[str], None] | None = None) -> dict[int, float]:
    """Judge every (problem, seed, method) not already in ``log``; returns random_gate's coverage per seed.

    Per seed: dense, then DG-JKR, then the other methods, problem by problem on the same
    permutation; then the coverage-matched random gate over all problems.
    """
    methods = list(methods)
    first = ["dense"] + (["dg_jkr"] if "dg_jkr" in methods else [])
    rest = first + [m for m in methods if m not in first and m != "random_gate"]
    task_ids = [str(p["id"]) for p in problems]
    used: dict[int, float] = {}
    warmed = False
    for seed in seeds:
        for p in problems:
            tid = str(p["id"])
            cs = sets[tid]
            perm = permutation(seed, tid, len(cs.candidates))
            shown = [cs.candidates[i] for i in perm]
            sources = [cs.sources[i] for i in perm]
            todo = [m for m in rest if (tid, seed, m) not in log]
            if not todo:
                continue
            judge.prefetch(p["prompt"], shown)  # the store would hold these: not part of any latency
            if not warmed:  # first-call overheads (kernels, allocator) out of the timed runs
                judge.judge(p["prompt"], shown, method="dense", sources=sources)
                warmed = True
            for m in todo:
                v = judge.judge(p["prompt"], shown, method=m, sources=sources)
                log.append(judge_record(tid, seed, perm, v, passes[tid], log.get((tid, seed, "dense"))))
                if progress:
                    progress(f"seed {seed} {tid} {m}")
        if "random_gate" in methods:
            cov = dg_coverage(log, seed, task_ids) if "dg_jkr" in methods else None
            cov = PAPER_RANDOM_COVERAGE if cov is None else cov
            used[seed] = cov
            for p in problems:
                tid = str(p["id"])
                if (tid, seed, "random_gate") in log:
                    continue
                cs = sets[tid]
                perm = permutation(seed, tid, len(cs.candidates))
                shown = [cs.candidates[i] for i in perm]
                sources = [cs.sources[i] for i in perm]
                judge.prefetch(p["prompt"], shown)
                if not warmed:  # a resumed run that only judges the gate
                    judge.judge(p["prompt"], shown, method="dense", sources=sources)
                    warmed = True
                gs = gate_seed(seed, tid)
                judge.method("random_gate", coverage=cov, seed=gs)
                v = judge.judge(p["prompt"], shown, method="random_gate", sources=sources)
                log.append(judge_record(tid, seed, perm, v, passes[tid], log.get((tid, seed, "dense")),
                                   {"coverage_target": cov, "gate_seed": gs}))
                if progress:
                    progress(f"seed {seed} {tid} random_gate")
    return used
