"""Metrics against small hand-computed cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from kvjudge.experiments.metrics import (
    bootstrap_ci,
    chance_agreement,
    cohen_kappa,
    coverage,
    distinct_answers,
    expected_gated_jcr,
    jcr,
    jcr_by_slot,
    jcr_f,
    kappa_bootstrap_ci,
    majority_vote_accuracy,
    mean_latency,
    mean_std_over_seeds,
    oracle_accuracy,
    paired_test,
    partition_analysis,
    pass_at_1,
    position_consistency,
    precision_on_agreement,
    random_pick_accuracy,
    reuse_rate,
    slot_histogram,
    token_overlap,
)


def test_jcr_hand_case_and_identity():
    dense = [0, 2, 1, 3, 1]
    assert jcr(dense, dense) == 1.0
    assert jcr([0, 1, 1, 0, 1], dense) == pytest.approx(3 / 5)
    assert jcr([None, 2], [None, 2]) == 0.5  # None never matches
    with pytest.raises(ValueError):
        jcr([1], [1, 2])
    with pytest.raises(ValueError):
        jcr([], [])


def test_jcr_f_hand_case():
    assert jcr_f([True, False, True, True], [True, True, True, False]) == 0.5
    assert jcr_f([1, 0], [True, False]) == 1.0


def test_rates():
    assert pass_at_1([True, False, False, True]) == 0.5
    assert reuse_rate([False] * 7) == 0.0
    assert reuse_rate([True] * 7) == 1.0
    assert coverage([True, True, False, True]) == 0.75
    assert mean_latency([1.0, 2.0, 6.0]) == 3.0
    with pytest.raises(ValueError):
        pass_at_1([])


def test_precision_and_expected_gated_jcr():
    assert precision_on_agreement([True, True, False, True], [True, False, False, True]) == pytest.approx(2 / 3)
    assert precision_on_agreement([False, False], [True, True]) is None
    # Paper eq. 2: d + (1 - d) p
    assert expected_gated_jcr(0.2, 0.5) == pytest.approx(0.6)


def test_bootstrap_ci_contains_mean_and_is_reproducible():
    rng = np.random.default_rng(1)
    vals = rng.integers(0, 2, size=60).astype(float)
    low, high = bootstrap_ci(vals)
    assert low <= vals.mean() <= high and low < high
    assert bootstrap_ci(vals) == (low, high)  # same seed -> same interval
    assert bootstrap_ci(vals, confidence=0.5)[1] - bootstrap_ci(vals, confidence=0.5)[0] < high - low
    lo_med, hi_med = bootstrap_ci(vals * 3, stat=np.median, n_resamples=500)
    assert lo_med <= np.median(vals * 3) <= hi_med


def test_bootstrap_ci_degenerate_inputs():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bootstrap_ci([0.7] * 10) == (0.7, 0.7)
        assert bootstrap_ci([3.0]) == (3.0, 3.0)
        assert bootstrap_ci([True, True, True]) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_mean_std_over_seeds_population_std():
    mean, std = mean_std_over_seeds({42: 0.80, 123: 0.79, 456: 0.81})
    assert mean == pytest.approx(0.80)
    assert std == pytest.approx(math.sqrt((0.0001 + 0.0001) / 3))  # ddof = 0
    assert mean_std_over_seeds({42: 0.5}) == (0.5, 0.0)


def test_paired_test_exact_mcnemar():
    # 10 records: 6 where only A is consistent, 1 where only B is, 3 concordant.
    a = [True] * 6 + [False] + [True, True, False]
    b = [False] * 6 + [True] + [True, True, False]
    res = paired_test(a, b)
    assert res["a_only"] == 6 and res["b_only"] == 1 and res["n_discordant"] == 7
    # Hand computation: two-sided exact binomial, k = 6 of 7, p = 2 * P(X >= 6) = 2 * 8 / 128.
    assert res["p_value"] == pytest.approx(16 / 128)
    assert res["p_value"] == pytest.approx(stats.binomtest(6, 7, 0.5).pvalue)
    assert res["statistic"] == 6


def test_paired_test_no_discordant_pairs():
    res = paired_test([True, False, True], [True, False, True])
    assert res["p_value"] == 1.0 and res["n_discordant"] == 0
    assert paired_test([0.5, 0.25], [0.5, 0.25])["p_value"] == 1.0


def test_paired_test_non_binary_uses_wilcoxon():
    a = [0.9, 0.8, 0.7, 0.95, 0.85, 0.6]
    b = [0.5, 0.6, 0.65, 0.4, 0.7, 0.55]
    res = paired_test(a, b)
    assert res["test"].startswith("Wilcoxon")
    assert res["p_value"] == pytest.approx(stats.wilcoxon(np.subtract(a, b)).pvalue)


def test_partition_analysis_matches_direct_mannwhitneyu():
    agree = [[100, 120, 140, 160], [200, 210], [90, 95, 100], [300, 310, 320], [150]]
    disagree = [[110, 130], [250, 260, 270], [80, 400]]
    out = partition_analysis(agree, disagree)
    ma = [np.mean(g) for g in agree]
    md = [np.mean(g) for g in disagree]
    va = [np.var(g) for g in agree]
    vd = [np.var(g) for g in disagree]
    ref_m = stats.mannwhitneyu(ma, md, alternative="two-sided")
    ref_v = stats.mannwhitneyu(va, vd, alternative="two-sided")
    assert out["mean_length_test"]["U"] == pytest.approx(ref_m.statistic)
    assert out["mean_length_test"]["p_value"] == pytest.approx(ref_m.pvalue)
    assert out["length_variance_test"]["U"] == pytest.approx(ref_v.statistic)
    assert out["length_variance_test"]["p_value"] == pytest.approx(ref_v.pvalue)
    assert out["agreement"]["count"] == 5 and out["disagreement"]["count"] == 3
    assert out["agreement"]["fraction"] == pytest.approx(5 / 8)
    assert out["agreement"]["mean_length"] == pytest.approx((np.mean(ma), np.std(ma)))
    assert out["disagreement"]["length_variance"] == pytest.approx((np.mean(vd), np.std(vd)))
    assert out["agreement"]["length_variance"][0] == pytest.approx(np.mean(va))


def test_partition_analysis_empty_partition():
    out = partition_analysis([[10, 20], [30]], [])
    assert out["disagreement"]["count"] == 0 and out["disagreement"]["mean_length"] is None
    assert out["agreement"]["fraction"] == 1.0
    assert out["mean_length_test"] == {"U": None, "p_value": None}
    assert out["length_variance_test"]["p_value"] is None
    assert partition_analysis([], [])["agreement"]["fraction"] is None
    with pytest.raises(ValueError):
        partition_analysis([[]], [[1]])


# --- chance-corrected agreement ------------------------------------------------------------------

def test_kappa_and_chance_agreement_on_a_hand_table():
    # 10 calls, slots 1..3. Confusion (rows A, cols B): [[3,1,0],[0,2,1],[1,0,2]]
    a = [1, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    b = [1, 1, 1, 2, 2, 2, 3, 1, 3, 3]
    # p_o = 7/10; marginals A = (.4, .3, .3), B = (.4, .3, .3) -> p_e = .16 + .09 + .09 = .34
    assert chance_agreement(a, b) == pytest.approx(0.34)
    assert cohen_kappa(a, b) == pytest.approx((0.7 - 0.34) / (1 - 0.34))
    assert jcr(a, b) == pytest.approx(0.7)  # kappa's p_o is JCR on the same calls
    assert slot_histogram(a, 4) == pytest.approx([0.4, 0.3, 0.3, 0.0])
    # dense at slot 1: 4 calls (b = 1 at index 0,1,2,7), method agrees on 3; slot 2: 3 calls, 2 agree
    by_slot = jcr_by_slot(a, b, 4)
    assert by_slot[:3] == pytest.approx([3 / 4, 2 / 3, 2 / 3]) and by_slot[3] is None


def test_kappa_matches_sklearn_and_drops_unnamed_calls():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(3)
    a = rng.integers(1, 5, size=200).tolist()
    b = [x if rng.random() < 0.5 else int(rng.integers(1, 5)) for x in a]
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    # None slots leave the call out of kappa exactly as they leave it out of JCR
    assert cohen_kappa(a + [None, 2], b + [3, None]) == pytest.approx(cohen_kappa(a, b))


def test_kappa_is_one_for_identical_judges_and_zero_for_independent_ones():
    rng = np.random.default_rng(0)
    marg = [0.1, 0.2, 0.3, 0.4]
    a = (rng.choice(4, size=200_000, p=marg) + 1).tolist()
    b = (rng.choice(4, size=200_000, p=marg) + 1).tolist()  # independent, same marginals
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert cohen_kappa(a, b) == pytest.approx(0.0, abs=0.01)
    # raw agreement is far from 0 although the judges share nothing but their slot preference
    assert jcr(a, b) == pytest.approx(sum(p * p for p in marg), abs=0.01)
    # a heavy position prior: high JCR, still no agreement beyond chance
    skew = [0.01, 0.01, 0.01, 0.97]
    a = (rng.choice(4, size=200_000, p=skew) + 1).tolist()
    b = (rng.choice(4, size=200_000, p=skew) + 1).tolist()
    assert jcr(a, b) > 0.93 and abs(cohen_kappa(a, b)) < 0.02
    # both always on one slot: kappa undefined
    assert cohen_kappa([4, 4, 4], [4, 4, 4]) is None
    with pytest.raises(ValueError):
        cohen_kappa([None], [1])


def test_kappa_bootstrap_ci_resamples_problems_and_is_seeded():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(5)
    problems = [f"p{i}" for i in range(40) for _ in range(3)]  # 40 problems x 3 seeds
    a = rng.integers(1, 5, size=120).tolist()
    b = [x if rng.random() < 0.6 else int(rng.integers(1, 5)) for x in a]
    low, high = kappa_bootstrap_ci(a, b, problems, n_resamples=1000, seed=1)
    assert low < cohen_kappa(a, b) < high
    assert kappa_bootstrap_ci(a, b, problems, n_resamples=1000, seed=1) == (low, high)
    # the vectorised resample equals a plain loop over the same draws
    rs = np.random.default_rng(7)
    names = list(dict.fromkeys(problems))
    draws = rs.integers(0, len(names), size=(200, len(names)))
    loop = []
    for row in draws:
        idx = [i for g in row for i, p in enumerate(problems) if p == names[g]]
        loop.append(cohen_kappa_score([a[i] for i in idx], [b[i] for i in idx]))
    ref = (float(np.quantile(loop, 0.025)), float(np.quantile(loop, 0.975)))
    assert kappa_bootstrap_ci(a, b, problems, n_resamples=200, seed=7) == pytest.approx(ref)
    assert kappa_bootstrap_ci([4, 4], [4, 4], ["x", "y"]) is None


def test_position_consistency_hand_case():
    choices = {
        "p1": [2, 2, 2],      # same under every seed
        "p2": [0, 1, 1],      # 1 of 3 pairs agree
        "p3": [3, None, 3],   # None never agrees: 1 of 3 pairs
        "p4": [1],            # one seed: not counted
    }
    out = position_consistency(choices)
    assert out["n_problems"] == 3
    assert out["all"] == pytest.approx(1 / 3)
    assert out["pairwise"] == pytest.approx((3 + 1 + 1) / 9)
    assert position_consistency({"p": [1]}) == {"all": None, "pairwise": None, "n_problems": 0}


def test_accuracy_baselines_hand_case():
    passes = [[True, False, False, False], [False, False], [True, True, False, True]]
    assert oracle_accuracy(passes) == pytest.approx(2 / 3)
    assert random_pick_accuracy(passes) == pytest.approx((0.25 + 0 + 0.75) / 3)
    answers = [["18", "7", "7", None],   # majority 7 (wrong)
               ["3", "4"],               # tie 3/4, both wrong -> 0
               ["B", "B", "C", "B"]]     # majority B (right)
    assert majority_vote_accuracy(answers, passes) == pytest.approx((0 + 0 + 1) / 3)
    # a tie between a right and a wrong answer scores one half
    assert majority_vote_accuracy([["5", "6"]], [[True, False]]) == pytest.approx(0.5)
    assert majority_vote_accuracy([[None, None]], [[False, False]]) == 0.0


def test_diversity_hand_case():
    assert distinct_answers(["7", "7", None, "8"]) == 2
    # {a,b,c} vs {a,b}: 2/3; {a,b,c} vs {d}: 0; {a,b} vs {d}: 0 -> mean 2/9
    assert token_overlap([["a", "b", "c"], ["a", "b", "b"], ["d"]]) == pytest.approx(2 / 9)
    assert token_overlap([["x"]]) is None
    assert token_overlap([[1, 2], [2, 1]]) == 1.0


# --- the summary: kappa on the calls JCR counts ------------------------------------------------------

def _rec(tid, seed, method, perm, slot):
    orig = None if slot is None else perm[slot - 1]
    return {"task_id": tid, "seed": seed, "method": method, "permutation": perm, "winner_slot": slot,
            "winner_original": orig, "passed": orig == 0, "consistent": None, "reused": method != "dense",
            "latency_ms": 1.0, "decision": None, "gate": None}


def test_summary_kappa_is_taken_on_the_calls_jcr_counts(tmp_path):
    from kvjudge.experiments.summary import content_measures, summarize
    from kvjudge.runtime.results import ResultsLog

    perms = {42: [0, 1, 2], 123: [2, 0, 1]}
    # (problem, seed) -> (dense slot, naive slot); naive names no candidate on one call
    calls = {("p1", 42): (1, 3), ("p2", 42): (2, 2), ("p3", 42): (3, 3), ("p4", 42): (3, None),
             ("p1", 123): (2, 3), ("p2", 123): (1, 1), ("p3", 123): (3, 3), ("p4", 123): (3, 3)}
    log = ResultsLog(tmp_path / "results.jsonl", key=lambda r: (r["task_id"], r["seed"], r["method"]))
    for (t, s), (d, n) in calls.items():
        log.append(_rec(t, s, "dense", perms[s], d))
        log.append(_rec(t, s, "naive", perms[s], n))
    out = summarize(log, ["p1", "p2", "p3", "p4"], [42, 123], ["dense", "naive"])
    row = out["methods"]["naive"]
    both = [(n, d) for (d, n) in calls.values() if n is not None]  # the 7 calls JCR counts
    ns, ds = [b[0] for b in both], [b[1] for b in both]
    assert row["jcr"] == pytest.approx(jcr(ns, ds)) == pytest.approx(5 / 7)
    assert row["p_e"] == pytest.approx(chance_agreement(ns, ds))
    assert row["kappa"] == pytest.approx(cohen_kappa(ns, ds))
    # by hand: dense slots 1,2,3 = 2,2,3 of 7; naive 1,2,3 = 1,1,5 of 7
    assert row["p_e"] == pytest.approx((2 * 1 + 2 * 1 + 3 * 5) / 49)
    assert row["jcr_by_dense_slot"] == pytest.approx([1 / 2, 1 / 2, 1.0])
    assert row["winner_slots"] == pytest.approx([1 / 7, 1 / 7, 5 / 7])  # the method's own 7 named winners
    assert out["methods"]["dense"]["kappa"] == pytest.approx(1.0)
    # the original candidate chosen per seed: p1 (2, 1), p2 (1, 2), p3 (2, 1), p4 (None, 1) -> never the same
    assert row["position_consistency"] == {"all": 0.0, "pairwise": 0.0, "n_problems": 4}
    # dense: p1 (0, 0), p2 (1, 2), p3 (2, 1), p4 (2, 1)
    assert out["methods"]["dense"]["position_consistency"]["all"] == pytest.approx(1 / 4)
    lo, hi = row["kappa_ci"]
    assert lo <= row["kappa"] <= hi
    assert set(row["per_seed"]["42"]) >= {"kappa", "p_e"}

    content = content_measures("gsm8k", {"a": ["so 18", "18.0", "17"], "b": ["5", "6", "no idea"]},
                               {"a": [True, True, False], "b": [False, False, False]})
    assert content["oracle"] == 0.5 and content["random_pick"] == pytest.approx((2 / 3 + 0) / 2)
    assert content["majority_vote"] == pytest.approx((1 + 0) / 2)  # "18" twice; 5 vs 6 tie, both wrong
    assert content["distinct_answers"] == pytest.approx((2 + 2) / 2)
    assert content_measures("humaneval", {"a": ["x", "x "]}, {"a": [True, True]})["majority_vote"] is None
