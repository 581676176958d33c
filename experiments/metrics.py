"""Evaluation metrics of the DG-JKR study, as pure functions over plain lists.

Conventions used by every function here:

* one record = one (problem, seed) pair; parallel lists are aligned **by index** and must have
  the same length (``ValueError`` otherwise);
* an empty input raises ``ValueError`` (a rate over nothing is undefined) except where noted;
* winners must already be mapped back to the **original** candidate ids (the id before the
  shuffle), so that a method and Dense Prefill run under the same permutation compare equal
  when they choose the same candidate;
* standard deviations are population standard deviations (``ddof=0``) unless noted.

One module (~460 lines) on purpose: small pure functions under the shared conventions above, which
splitting would scatter.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "jcr", "jcr_f", "pass_at_1", "reuse_rate", "coverage", "rate", "mean_latency",
    "precision_on_agreement", "expected_gated_jcr", "bootstrap_ci", "mean_std_over_seeds",
    "paired_test", "partition_analysis",
    "slot_histogram", "chance_agreement", "cohen_kappa", "kappa_bootstrap_ci", "jcr_by_slot",
    "position_consistency", "oracle_accuracy", "random_pick_accuracy", "majority_vote_accuracy",
    "distinct_answers", "token_overlap",
]


def _check_pair(a: Sequence, b: Sequence, what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what}: lengths differ ({len(a)} vs {len(b)})")
    if len(a) == 0:
        raise ValueError(f"{what}: no records")


def _same(x: Any, y: Any) -> bool:
    return x is not None and y is not None and x == y


def jcr(method_winners: Sequence, dense_winners: Sequence) -> float:
    """Judge Consistency Rate (paper eq. 1).

    ``JCR = (1/n) * sum_k 1[method_winners[k] == dense_winners[k]]`` over the n (problem, seed)
    pairs, aligned by index; both winners are original candidate ids under the same candidate
    permutation. A ``None`` winner (the judge produced no parseable choice) never matches,
    not even another ``None``. Returns a fraction in [0, 1]; ``jcr(d, d) == 1`` when ``d`` has
    no ``None``.
    """
    _check_pair(method_winners, dense_winners, "jcr")
    return sum(_same(m, d) for m, d in zip(method_winners, dense_winners)) / len(dense_winners)


def jcr_f(method_pass: Sequence[bool], dense_pass: Sequence[bool]) -> float:
    """Functional JCR (JCR-F, paper sec. 4.4).

    ``JCR-F = (1/n) * sum_k 1[bool(method_pass[k]) == bool(dense_pass[k])]`` where
    ``method_pass[k]`` is whether the candidate chosen by the method passes its unit tests and
    ``dense_pass[k]`` the same for Dense Prefill's choice, for the same (problem, seed).
    """
    _check_pair(method_pass, dense_pass, "jcr_f")
    return sum(bool(m) == bool(d) for m, d in zip(method_pass, dense_pass)) / len(dense_pass)


def rate(flags: Sequence[bool]) -> float:
    """Fraction of true values: ``sum(bool(f)) / len(flags)``."""
    if len(flags) == 0:
        raise ValueError("rate: no records")
    return sum(bool(f) for f in flags) / len(flags)


def pass_at_1(passed: Sequence[bool]) -> float:
    """Pass@1 with one selected candidate per record: the fraction of records whose selected
    candidate passes all its unit tests (HumanEval) / is correct (GSM8K, MMLU)."""
    return rate(passed)


def reuse_rate(reused: Sequence[bool]) -> float:
    """Reuse Rate: fraction of records decided by a KV-reuse path rather than a dense
    (fallback) prefill. Dense Prefill: 0; Naive Reuse: 1; DG-JKR: equals its coverage."""
    return rate(reused)


def coverage(accepted: Sequence[bool]) -> float:
    """Coverage of a gated method: fraction of records where the gate accepted the reused
    result (DG-JKR: Naive and KVCOMM agree; ``1 - d`` in paper eq. 2)."""
    return rate(accepted)


def mean_latency(latencies: Sequence[float]) -> float:
    """Arithmetic mean of per-record latencies (unit of the input, e.g. ms)."""
    if len(latencies) == 0:
        raise ValueError("mean_latency: no records")
    return float(np.mean(np.asarray(latencies, dtype=float)))


def precision_on_agreement(accepted: Sequence[bool], consistent: Sequence[bool]) -> float | None:
    """``p`` of paper eq. 2: among records where the gate accepted (agreement), the fraction that
    are consistent with Dense Prefill (same winner for JCR precision; same pass/fail for a
    functional precision). ``None`` when nothing was accepted."""
    _check_pair(accepted, consistent, "precision_on_agreement")
    idx = [k for k, a in enumerate(accepted) if a]
    if not idx:
        return None
    return sum(bool(consistent[k]) for k in idx) / len(idx)


def expected_gated_jcr(disagreement_rate: float, precision: float) -> float:
    """Paper eq. 2: ``JCR_gated = d + (1 - d) * p`` (fallback records are consistent by construction)."""
    return disagreement_rate + (1.0 - disagreement_rate) * precision


def bootstrap_ci(values: Sequence[float], stat: Callable = np.mean, n_resamples: int = 2000,
                 confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat(values)``.

    ``scipy.stats.bootstrap((values,), stat, method="percentile", n_resamples=...,
    confidence_level=confidence, rng=np.random.default_rng(seed))`` (``stat`` is called
    vectorised when it takes an ``axis`` argument). Degenerate inputs give a zero-width interval
    without warnings: n = 1 or all values equal -> ``(stat(values), stat(values))``. Empty input
    raises ``ValueError``.
    """
    arr = np.asarray(values, dtype=float).ravel()
    if arr.size == 0:
        raise ValueError("bootstrap_ci: no values")
    if arr.size == 1 or np.all(arr == arr[0]):
        v = float(stat(arr))
        return (v, v)
    try:
        vectorized = "axis" in inspect.signature(stat).parameters
    except (TypeError, ValueError):
        vectorized = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap((arr,), stat, n_resamples=n_resamples, confidence_level=confidence,
                              method="percentile", vectorized=vectorized,
                              rng=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if math.isnan(low) or math.isnan(high):
        v = float(stat(arr))
        return (v, v)
    return (low, high)


def mean_std_over_seeds(per_seed_values: Mapping[Any, float]) -> tuple[float, float]:
    """``(mean, std)`` of one metric over seeds (e.g. ``{42: 0.80, 123: 0.79, 456: 0.81}``).

    ``std`` is the **population** standard deviation (``np.std(..., ddof=0)``); it is 0.0 for a
    single seed. Empty input raises ``ValueError``.
    """
    vals = np.asarray(list(per_seed_values.values()), dtype=float)
    if vals.size == 0:
        raise ValueError("mean_std_over_seeds: no seeds")
    return float(vals.mean()), float(vals.std(ddof=0))


def _as_binary(xs: Sequence) -> list[int] | None:
    out = []
    for x in xs:
        f = float(x)
        if f not in (0.0, 1.0):
            return None
        out.append(int(f))
    return out


def paired_test(a: Sequence[bool | float], b: Sequence[bool | float]) -> dict:
    """Paired two-sided test of method A (e.g. DG-JKR) vs method B (the coverage-matched random
    gate) over the same (problem, seed) records.

    Binary inputs (bools, or numbers all 0/1 — e.g. per-record "consistent with dense"
    indicators): **exact McNemar test**. With ``n10`` = #(A=1, B=0) and ``n01`` = #(A=0, B=1)
    the discordant pairs, ``p = scipy.stats.binomtest(n10, n10 + n01, 0.5).pvalue``
    (two-sided); ``statistic = n10``. No discordant pair -> ``p = 1.0``.

    Non-binary inputs (e.g. per-problem JCR averaged over seeds): Wilcoxon signed-rank test
    (``scipy.stats.wilcoxon``, two-sided, zero differences dropped); all differences zero ->
    ``p = 1.0``.

    Returns ``{"statistic", "p_value", "test", "n", "n_discordant", "a_only", "b_only"}``
    (``a_only``/``b_only``/``n_discordant`` are ``None`` for the Wilcoxon case).
    """
    _check_pair(a, b, "paired_test")
    ba, bb = _as_binary(a), _as_binary(b)
    if ba is not None and bb is not None:
        n10 = sum(1 for x, y in zip(ba, bb) if x == 1 and y == 0)
        n01 = sum(1 for x, y in zip(ba, bb) if x == 0 and y == 1)
        nd = n10 + n01
        p = 1.0 if nd == 0 else float(stats.binomtest(n10, nd, 0.5, alternative="two-sided").pvalue)
        return {"statistic": float(n10), "p_value": min(1.0, p), "test": "exact McNemar (binomtest on discordant pairs)",
                "n": len(ba), "n_discordant": nd, "a_only": n10, "b_only": n01}
    da = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if np.all(da == 0):
        return {"statistic": 0.0, "p_value": 1.0, "test": "Wilcoxon signed-rank", "n": len(da),
                "n_discordant": None, "a_only": None, "b_only": None}
    res = stats.wilcoxon(da, zero_method="wilcox", alternative="two-sided")
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue), "test": "Wilcoxon signed-rank",
            "n": len(da), "n_discordant": None, "a_only": None, "b_only": None}


def _mean_std(xs: list[float]) -> tuple[float, float] | None:
    if not xs:
        return None
    arr = np.asarray(xs, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=0))


def partition_analysis(lengths_agree: Sequence[Sequence[int]],
                       lengths_disagree: Sequence[Sequence[int]]) -> dict:
    """Disagreement partition analysis (paper sec. 4.6, Table 5).

    Inputs: one entry per problem (or per (problem, seed) record), holding that problem's
    candidates' token lengths, for the agreement and the disagreement partitions. Per problem:
    ``mean_length = mean(lengths)`` and ``length_variance = var(lengths, ddof=0)`` (0 for one
    candidate; a problem with no lengths raises ``ValueError``).

    Returns::

        {"agreement":    {"count", "fraction", "mean_length": (mean, std), "length_variance": (mean, std)},
         "disagreement": {... same ...},
         "mean_length_test":     {"U", "p_value"},
         "length_variance_test": {"U", "p_value"}}

    ``fraction`` = count / (both counts) (``None`` if both are empty); ``(mean, std)`` are over
    the partition's problems (std ``ddof=0``; ``None`` for an empty partition). Tests:
    ``scipy.stats.mannwhitneyu(agree, disagree, alternative="two-sided")`` (``method="auto"``);
    ``U`` is the statistic of the agreement sample. Either partition empty -> ``U`` and
    ``p_value`` are ``None``.
    """
    def per_problem(groups: Sequence[Sequence[int]], name: str) -> tuple[list[float], list[float]]:
        means, variances = [], []
        for k, g in enumerate(groups):
            arr = np.asarray(list(g), dtype=float)
            if arr.size == 0:
                raise ValueError(f"partition_analysis: {name} problem {k} has no lengths")
            means.append(float(arr.mean()))
            variances.append(float(arr.var(ddof=0)))
        return means, variances

    ma, va = per_problem(lengths_agree, "agreement")
    md, vd = per_problem(lengths_disagree, "disagreement")
    total = len(ma) + len(md)

    def part(means: list[float], variances: list[float]) -> dict:
        return {"count": len(means), "fraction": (len(means) / total) if total else None,
                "mean_length": _mean_std(means), "length_variance": _mean_std(variances)}

    def test(x: list[float], y: list[float]) -> dict:
        if not x or not y:
            return {"U": None, "p_value": None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.mannwhitneyu(x, y, alternative="two-sided")
        p = float(res.pvalue)
        return {"U": float(res.statistic), "p_value": None if math.isnan(p) else p}

    return {"agreement": part(ma, va), "disagreement": part(md, vd),
            "mean_length_test": test(ma, md), "length_variance_test": test(va, vd)}


# --- chance-corrected agreement ------------------------------------------------------------------
#
# Two judges shown the *same* display order agree on the candidate exactly when they agree on the
# display slot, so JCR is the observed agreement p_o of the two judges' slot labels and Cohen's kappa
# is taken over display slots: p_e = sum_k p_A(k) p_B(k) with p_X(k) the share of calls in which X
# picked slot k. Slots are 1-based (``Verdict.winner``); a ``None`` slot drops the call from all of
# these, as it drops out of JCR.

def _paired_slots(a: Sequence, b: Sequence, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The calls where both judges named a slot, as two int arrays (shape ``(n,)``)."""
    _check_pair(a, b, what)
    keep = [(int(x), int(y)) for x, y in zip(a, b) if x is not None and y is not None]
    if not keep:
        raise ValueError(f"{what}: no call where both judges named a candidate")
    arr = np.asarray(keep, dtype=int)
    return arr[:, 0], arr[:, 1]


def slot_histogram(slots: Sequence[int | None], n_slots: int) -> list[float]:
    """Share of calls whose winner is display slot ``k`` (1-based), for ``k = 1..n_slots``: a list of
    ``n_slots`` fractions over the calls with a winner (``None`` winners are left out). Raises
    ``ValueError`` on no winners or a slot outside ``1..n_slots``."""
    named = [int(s) for s in slots if s is not None]
    if not named:
        raise ValueError("slot_histogram: no winners")
    if min(named) < 1 or max(named) > n_slots:
        raise ValueError(f"slot_histogram: a slot outside 1..{n_slots}")
    counts = np.bincount(np.asarray(named) - 1, minlength=n_slots)
    return [float(c) / len(named) for c in counts]


def chance_agreement(a_slots: Sequence[int | None], b_slots: Sequence[int | None]) -> float:
    """``p_e = sum_k p_A(k) p_B(k)``: the agreement two independent judges with these winner-slot
    marginals would reach by chance, over the calls where both named a slot (aligned by index)."""
    a, b = _paired_slots(a_slots, b_slots, "chance_agreement")
    k = int(max(a.max(), b.max())) + 1
    pa = np.bincount(a, minlength=k) / a.size
    pb = np.bincount(b, minlength=k) / b.size
    return float(pa @ pb)


def cohen_kappa(a_slots: Sequence[int | None], b_slots: Sequence[int | None]) -> float | None:
    """Cohen's kappa of two judges' winner slots on the same calls: ``(p_o - p_e) / (1 - p_e)`` with
    ``p_o`` the share of calls where both picked the same slot (= JCR over these calls) and ``p_e``
    from :func:`chance_agreement`. ``None`` when ``p_e == 1`` (both always pick one and the same slot:
    agreement says nothing). Equals ``sklearn.metrics.cohen_kappa_score`` otherwise."""
    a, b = _paired_slots(a_slots, b_slots, "cohen_kappa")
    p_o = float(np.mean(a == b))
    p_e = chance_agreement(a.tolist(), b.tolist())
    if p_e >= 1.0 - 1e-12:
        return None
    return (p_o - p_e) / (1.0 - p_e)


def kappa_bootstrap_ci(a_slots: Sequence[int | None], b_slots: Sequence[int | None], groups: Sequence,
                       n_resamples: int = 2000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap CI of :func:`cohen_kappa`, resampling **groups** (problems: every call of
    a drawn problem, all its shuffle seeds, comes along) with replacement, seeded by ``seed``.

    ``groups[i]`` names the problem of call ``i`` (aligned with the slots). Resamples whose kappa is
    undefined (``p_e == 1``) are left out; ``None`` when every one is, or when no call has two slots.
    Vectorised: per-problem counts ``(P, K)`` times resample weights ``(R, P)``.
    """
    _check_pair(a_slots, b_slots, "kappa_bootstrap_ci")
    _check_pair(a_slots, groups, "kappa_bootstrap_ci")
    rows = [(g, int(x), int(y)) for g, x, y in zip(groups, a_slots, b_slots) if x is not None and y is not None]
    if not rows:
        return None
    names = {g: i for i, g in enumerate(dict.fromkeys(r[0] for r in rows))}
    gi = np.asarray([names[r[0]] for r in rows])
    a = np.asarray([r[1] for r in rows])
    b = np.asarray([r[2] for r in rows])
    n_groups, k = len(names), int(max(a.max(), b.max())) + 1
    n_per = np.bincount(gi, minlength=n_groups).astype(float)  # (P,)
    agree = np.bincount(gi, weights=(a == b).astype(float), minlength=n_groups)  # (P,)
    ca = np.zeros((n_groups, k))
    cb = np.zeros((n_groups, k))
    np.add.at(ca, (gi, a), 1.0)
    np.add.at(cb, (gi, b), 1.0)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_resamples, n_groups))
    w = np.zeros((n_resamples, n_groups))
    np.add.at(w, (np.repeat(np.arange(n_resamples), n_groups), draws.ravel()), 1.0)  # (R, P) multiplicities
    n = w @ n_per  # (R,)
    p_o = (w @ agree) / n
    p_e = np.sum((w @ ca) * (w @ cb), axis=1) / n ** 2
    ok = p_e < 1.0 - 1e-12
    if not ok.any():
        return None
    kappas = (p_o[ok] - p_e[ok]) / (1.0 - p_e[ok])
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(kappas, alpha)), float(np.quantile(kappas, 1.0 - alpha))


def jcr_by_slot(method_slots: Sequence[int | None], dense_slots: Sequence[int | None],
                n_slots: int) -> list[float | None]:
    """JCR split by the display slot of dense's winner: entry ``k - 1`` is the share of calls with dense
    at slot ``k`` in which the method picked slot ``k`` too (``None`` where dense never picked ``k``).
    Calls where either judge named no slot are left out, as in JCR."""
    m, d = _paired_slots(method_slots, dense_slots, "jcr_by_slot")
    out: list[float | None] = []
    for k in range(1, n_slots + 1):
        sel = d == k
        out.append(float(np.mean(m[sel] == k)) if sel.any() else None)
    return out


def position_consistency(choices: Mapping[Any, Sequence]) -> dict:
    """How often a judge picks the same *candidate* (original index) whatever order it is shown.

    ``choices[problem]`` = the original index chosen under each shuffle seed (``None``: no choice).
    Over problems judged under at least two seeds:

    * ``all``: share of problems whose choice is one and the same (not ``None``) under every seed;
    * ``pairwise``: share of (problem, pair of seeds) with the same non-``None`` choice, pooled;
    * ``n_problems``.

    ``all`` and ``pairwise`` are ``None`` when no problem has two seeds.
    """
    full = same_pairs = pairs = n = 0
    for picks in choices.values():
        picks = list(picks)
        if len(picks) < 2:
            continue
        n += 1
        full += int(picks[0] is not None and all(p == picks[0] for p in picks))
        for i in range(len(picks)):
            for j in range(i + 1, len(picks)):
                pairs += 1
                same_pairs += int(_same(picks[i], picks[j]))
    return {"all": full / n if n else None, "pairwise": same_pairs / pairs if pairs else None, "n_problems": n}


# --- what the candidates offer a judge -----------------------------------------------------------

def oracle_accuracy(passes: Sequence[Sequence[bool]]) -> float:
    """Share of candidate sets with at least one passing candidate (a judge that always picks right)."""
    if len(passes) == 0:
        raise ValueError("oracle_accuracy: no candidate sets")
    return sum(any(bool(x) for x in p) for p in passes) / len(passes)


def random_pick_accuracy(passes: Sequence[Sequence[bool]]) -> float:
    """Expected accuracy of a uniformly random pick: mean over sets of the share of passing candidates."""
    if len(passes) == 0 or any(len(p) == 0 for p in passes):
        raise ValueError("random_pick_accuracy: no candidate sets, or an empty one")
    return float(np.mean([sum(bool(x) for x in p) / len(p) for p in passes]))


def majority_vote_accuracy(answers: Sequence[Sequence[str | None]], passes: Sequence[Sequence[bool]]) -> float:
    """Accuracy of a majority vote over the candidates' final answers (self-consistency).

    ``answers[s][i]`` is candidate ``i``'s extracted final answer in set ``s`` (``None``: none found,
    never voted for), ``passes[s][i]`` whether it is correct. The most frequent answer wins; a tie is
    scored as a uniformly random tie-break (the share of tied answers that are correct); a set with no
    answer scores 0. An answer is correct when its candidates pass (the grader reads only the answer).
    """
    _check_pair(answers, passes, "majority_vote_accuracy")
    total = 0.0
    for ans, ok in zip(answers, passes):
        if len(ans) != len(ok):
            raise ValueError("majority_vote_accuracy: answers and passes differ in length within a set")
        votes: dict[str, int] = {}
        right: dict[str, bool] = {}
        for a, p in zip(ans, ok):
            if a is None:
                continue
            votes[a] = votes.get(a, 0) + 1
            right[a] = right.get(a, False) or bool(p)
        if not votes:
            continue
        top = max(votes.values())
        tied = [a for a, v in votes.items() if v == top]
        total += sum(right[a] for a in tied) / len(tied)
    return total / len(answers)


def distinct_answers(answers: Sequence[str | None]) -> int:
    """Number of distinct final answers in one candidate set (``None``, no answer, not counted)."""
    return len({a for a in answers if a is not None})


def token_overlap(token_sets: Sequence[Sequence]) -> float | None:
    """Mean pairwise Jaccard overlap ``|A & B| / |A | B|`` of the candidates' token sets in one set
    (1.0: every candidate uses the same tokens; two empty candidates overlap 1.0). ``None`` for fewer
    than two candidates."""
    sets = [set(t) for t in token_sets]
    vals = [len(a & b) / len(a | b) if (a or b) else 1.0
            for i, a in enumerate(sets) for b in sets[i + 1:]]
    return float(np.mean(vals)) if vals else None
