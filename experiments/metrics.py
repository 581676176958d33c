"""Evaluation metrics of the DG-JKR study, as pure functions over plain lists.

Conventions used by every function here:

* one record = one (problem, seed) pair; parallel lists are aligned **by index** and must have
  the same length (``ValueError`` otherwise);
* an empty input raises ``ValueError`` (a rate over nothing is undefined) except where noted;
* winners must already be mapped back to the **original** candidate ids (the id before the
  shuffle), so that a method and Dense Prefill run under the same permutation compare equal
  when they choose the same candidate;
* standard deviations are population standard deviations (``ddof=0``) unless noted.
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
