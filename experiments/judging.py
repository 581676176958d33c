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

from kvjudge.cache.compress.registry import compress_segment
from kvjudge.cache.segments import CompressedSegment
from kvjudge.experiments import metrics as M
from kvjudge.experiments.candidates import CandidateSet
from kvjudge.experiments.config import PAPER_RANDOM_COVERAGE
from kvjudge.experiments.summary import gate_accepted
from kvjudge.judges.base import Verdict
from kvjudge.judges.judge import Judge
from kvjudge.judges.methods.random_gate import exact_coverage_choice
from kvjudge.runtime.results import ResultsLog


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
    orig = None if verdict.winner is None else to_original(perm, verdict.winner)
    rec = {
        "task_id": task_id,
        "seed": seed,
        "method": verdict.method,
        "permutation": list(perm),
        "winner_slot": verdict.winner,
        "winner_original": orig,
        "passed": orig is not None and bool(passes[orig]),
        # None: this answer or dense's named no candidate (generated output); such records leave JCR
        "consistent": (True if dense is None else
                       None if orig is None or dense["winner_original"] is None else orig == dense["winner_original"]),
        "reused": bool(verdict.reused),
        "latency_ms": float(verdict.latency_ms),
        "decision": verdict.decision,
        "gate": verdict.gate,
        "scores": [float(s) for s in verdict.scores],
        "prefilled_tokens": int(verdict.prefilled_tokens),
        "encoded_tokens": int(verdict.encoded_tokens),
    }
    if verdict.output != "label":
        rec.update(output=verdict.output, answer_text=verdict.answer_text, parse_rule=verdict.parse_rule)
    if verdict.candidate_kv != "judge_prefix":
        rec["candidate_kv"] = verdict.candidate_kv
    if verdict.debias != "none":  # scores are log p - log prior of the method's slot prior
        rec["debias"] = verdict.debias
    if verdict.consensus is not None:  # permutation consensus: per-rotation winners mapped to original indices
        rec["consensus"] = {**verdict.consensus, "winners_original": [
            None if w is None else to_original(perm, w) for w in verdict.consensus["winners"]]}
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
        if name != "dense":  # consistency is undefined (None) where dense's generated answer did not parse
            flags = [r["consistent"] for r in recs if r.get("consistent") is not None]
            parts.append(f"JCR {name} {M.rate(flags):.2f}" if flags else f"JCR {name} n/a")
    return "  ".join(parts)


def dg_coverage(log: ResultsLog, seed: int, task_ids: Sequence[str]) -> float | None:
    """DG-JKR's agreement rate on ``seed`` over ``task_ids`` (``None`` without DG-JKR records)."""
    flags = [gate_accepted(r) for t in task_ids
             if (r := log.get((t, seed, "dg_jkr"))) is not None]
    return (sum(flags) / len(flags)) if flags else None


def shown_candidates(cs: CandidateSet, perm: Sequence[int], candidate_kv: str,
                     model_id: str | None = None) -> tuple[list, list[str]]:
    """The candidates of ``cs`` in display order ``perm`` as the judge takes them, and their sources.

    In ``agent`` mode each candidate carries what its KV was computed under: the agent's token ids when
    the file has them for this judge's model, else its prompt text (one prefill of prompt + answer)."""
    sources = [cs.sources[i] for i in perm]
    if candidate_kv != "agent":
        return [cs.candidates[i] for i in perm], sources
    return [cs.candidate(i, model_id) for i in perm], sources


def compress_candidates(judge: Judge, problem: str, candidates: list, compress: dict) -> None:
    """Replace the candidates' cached KV by its token-compressed form, as a compressing store would
    hand it to the judge (``store.compress`` / ``--compress``); dense prefill is unaffected."""
    runner = judge.runner
    for cand in candidates:
        req = judge.candidate_kv_request(problem, cand)
        seg = runner.lookup(req["key"])
        if seg is None or isinstance(seg, CompressedSegment):
            continue
        context = runner.context(req["context_ids"]) if req["context_ids"] else None
        runner.remember(req["key"], compress_segment(seg, judge.lm.model, compress["method"],
                                                     float(compress["ratio"]), context=context))


def judge_all(judge: Judge, problems: Sequence[dict], sets: dict[str, CandidateSet], passes: dict[str, list[bool]],
              seeds: Sequence[int], methods: Sequence[str], log: ResultsLog,
              progress: Callable[[str], None] | None = None, gate_arm: str = "naive",
              compress: dict | None = None) -> dict[int, float]:
    """Judge every (problem, seed, method) not already in ``log``; returns random_gate's coverage per seed.

    Per seed: dense, then DG-JKR, then the other methods, problem by problem on the same
    permutation; then the coverage-matched random gate over all problems.
    """
    first = ["dense"] + (["dg_jkr"] if "dg_jkr" in methods else [])
    rest = first + [m for m in methods if m not in first and m != "random_gate"]
    task_ids = [str(p["id"]) for p in problems]
    step = _Step(judge, sets, passes, log, progress, compress)
    used: dict[int, float] = {}
    for seed in seeds:
        for p in problems:
            step.run(p, seed, [m for m in rest if (str(p["id"]), seed, m) not in log])
        if "random_gate" in methods:
            cov = dg_coverage(log, seed, task_ids) if "dg_jkr" in methods else None
            used[seed] = cov = PAPER_RANDOM_COVERAGE if cov is None else cov
            # exactly round(cov * n) records of this seed take the reuse arm; which ones is a seeded draw
            gs = gate_seed(seed, "exact-coverage")
            choice = exact_coverage_choice(len(problems), cov, gs)
            gate = judge.method("random_gate", coverage=cov, seed=gs, arm=gate_arm)
            for p, accept in zip(problems, choice):
                if (str(p["id"]), seed, "random_gate") not in log:
                    gate.accept = accept
                    step.run(p, seed, ["random_gate"], {"coverage_target": cov, "gate_seed": gs})
    return used


class _Step:
    """Judges one problem under one seed's permutation with some methods, appending a record each."""

    def __init__(self, judge: Judge, sets: dict[str, CandidateSet], passes: dict[str, list[bool]],
                 log: ResultsLog, progress: Callable[[str], None] | None, compress: dict | None = None) -> None:
        self.judge, self.sets, self.passes, self.log, self.progress = judge, sets, passes, log, progress
        self.compress = compress
        self.warmed = False

    def run(self, problem: dict, seed: int, methods: list[str], extra: dict | None = None) -> None:
        if not methods:
            return
        tid = str(problem["id"])
        cs = self.sets[tid]
        perm = permutation(seed, tid, len(cs.candidates))
        shown, sources = shown_candidates(cs, perm, self.judge.candidate_kv, self.judge.model_id)
        self.judge.prefetch(problem["prompt"], shown)  # the store would hold these: not part of any latency
        if self.compress:
            compress_candidates(self.judge, problem["prompt"], shown, self.compress)
        if not self.warmed:  # first-call overheads (kernels, allocator) out of the timed runs
            self.judge.judge(problem["prompt"], shown, method="dense", sources=sources)
            self.warmed = True
        for m in methods:
            v = self.judge.judge(problem["prompt"], shown, method=m, sources=sources)
            dense = self.log.get((tid, seed, "dense"))
            self.log.append(judge_record(tid, seed, perm, v, self.passes[tid], dense, extra))
            if self.progress:
                self.progress(f"seed {seed} {tid} {m}")
