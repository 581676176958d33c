"""Re-score recorded judge calls under another debias mode, without judging again (``eval --rescore-from``).

A label-output call of ``dense``, ``naive`` or ``partial`` answers the argmax of the scores it records,
and those scores are the label log-probs minus the method's slot prior (``debias: pride`` /
``content_free``) or the log-probs themselves (``none``). So the call under another mode is the same
forward pass with the prior swapped: ``scores' = scores + prior_src - prior_dst``, winner its argmax
(ties to the lower slot, as the judge's argmax). Exact up to float rounding. Methods that choose a path
from their scores (gates, KVCOMM's and PAL-KV's tests) are not re-scorable and are judged as usual.

Records are matched on (problem, seed, method); the source folder must have judged the same candidate
file with the same model, candidate-KV mode and label output (its ``manifest.json``), one rotation per
call, and each record's permutation must be the one this run draws.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from kvjudge.experiments.judging import judge_record, permutation
from kvjudge.judges.base import Verdict
from kvjudge.judges.debias import prior_name, prior_path, read_table
from kvjudge.runtime.manifest import file_digest
from kvjudge.runtime.results import ResultsLog

RESCORABLE = ("dense", "naive", "partial")  # the answer is the argmax of the recorded scores, always
MATCHED = ("model", "dataset", "candidates", "candidate_kv", "judge_output", "judge_permutations", "compress",
           "method_options")


def check_source(src: Path, manifest: dict) -> list[dict]:
    """The source folder's records, after checking its manifest matches this run's on :data:`MATCHED`."""
    try:
        theirs = json.loads((src / "manifest.json").read_text(encoding="utf-8"))
        lines = (src / "results.jsonl").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as exc:
        raise ValueError(f"--rescore-from {src}: not an eval folder ({exc})") from None
    if theirs.get("candidates") == "generated" and (src / "candidates.jsonl").is_file():
        # a run that generated its sets judged what it wrote to candidates.jsonl: that file is its candidates
        theirs = {**theirs, "candidates": file_digest(src / "candidates.jsonl")}
    for key in MATCHED:
        if theirs.get(key) != manifest.get(key):
            raise ValueError(f"--rescore-from {src}: its {key} is {theirs.get(key)!r}, this run's {manifest.get(key)!r}")
    if manifest.get("candidates") == "generated":
        raise ValueError(f"--rescore-from needs the candidates judged there: pass --candidates {src / 'candidates.jsonl'}")
    if manifest.get("judge_output") != "label" or (manifest.get("judge_permutations") or 1) != 1:
        raise ValueError("--rescore-from needs label output and one rotation per call (--judge-permutations 1)")
    return [json.loads(line) for line in lines if line.strip()]


def recorded_priors(src: Path) -> dict[tuple[str, str, int], list[float]]:
    """``{(debias, method, n): log prior}`` that the source run estimated itself (``--calibrate-on``: kept
    in its ``summary.json`` under ``config.calibration``), so its calls can be re-scored without a
    prior in ``$KVJUDGE_CACHE``; ``{}`` for a run that read its priors from the cache."""
    try:
        cal = json.loads((src / "summary.json").read_text(encoding="utf-8"))["config"].get("calibration") or {}
    except (OSError, ValueError, KeyError, AttributeError):
        return {}
    kind = cal.get("kind")
    return {(kind, m, int(n)): list(p) for n, by_method in (cal.get("priors") or {}).items()
            for m, p in by_method.items()} if kind else {}


def log_prior(judge, debias: str, method: str, n: int) -> list[float]:
    """The slot prior ``[n]`` that ``debias`` subtracts for ``method`` (zeros for ``none``)."""
    if debias == "none":
        return [0.0] * n
    key = judge.prior_key(debias, judge.candidate_kv, "label", n)
    table = read_table(prior_path(key), key)
    prior = table.log_prior(method) if table else None
    if prior is None:
        raise ValueError(f"--rescore-from: no {debias} slot prior for {method} ({key.describe()})")
    return list(prior)


def rescore(judge, records: Sequence[dict], log: ResultsLog, task_ids: Sequence[str], seeds: Sequence[int],
            methods: Sequence[str], passes: dict[str, list[bool]], source: str,
            source_priors: dict[tuple[str, str, int], list[float]] | None = None) -> int:
    """Append to ``log`` the re-scored record of every (problem, seed, re-scorable method) it lacks and
    ``records`` hold (dense first: the others' consistency is against it); returns how many.
    ``source_priors``: the priors the source run estimated itself (:func:`recorded_priors`), used to
    undo its prior instead of the cache's."""
    by_key = {(str(r["task_id"]), int(r["seed"]), r["method"]): r for r in records}
    recorded = source_priors or {}
    priors: dict[tuple[str, str, int], list[float]] = {}  # (debias, method, n) -> prior, read once

    def prior(debias: str, method: str, n: int) -> list[float]:
        if (debias, method, n) not in priors:
            priors[debias, method, n] = log_prior(judge, debias, method, n)
        return priors[debias, method, n]

    order = ["dense"] + [m for m in methods if m in RESCORABLE and m != "dense"]
    setting = {m: prior_name(judge.method(m)) for m in order}  # the name of this run's setting of m's prior
    added = 0
    for seed in seeds:
        for tid in task_ids:
            for m in order:
                src = by_key.get((tid, seed, m))
                if src is None or (tid, seed, m) in log:
                    continue
                n = len(src["scores"])
                if list(src["permutation"]) != permutation(seed, tid, n):
                    raise ValueError(f"--rescore-from: {tid} seed {seed} was judged under another permutation")
                was, pm = src.get("debias", "none"), setting[m]
                old = recorded.get((was, pm, n)) or prior(was, pm, n)
                new = prior(judge.debias, pm, n)
                scores = [s + a - b for s, a, b in zip(src["scores"], old, new)]
                winner = max(range(n), key=lambda i: (scores[i], -i)) + 1
                verdict = Verdict(
                    method=m, winner=winner, scores=scores, reused=src["reused"], latency_ms=src["latency_ms"],
                    prefilled_tokens=src["prefilled_tokens"], encoded_tokens=src["encoded_tokens"],
                    decision=src.get("decision"), gate=src.get("gate"),
                    candidate_kv=src.get("candidate_kv", "judge_prefix"), debias=judge.debias)
                dense = log.get((tid, seed, "dense"))
                log.append(judge_record(tid, seed, list(src["permutation"]), verdict, passes[tid], dense,
                                        {"rescored_from": source}))
                added += 1
    return added
