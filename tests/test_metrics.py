"""Metrics against small hand-computed cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from kvjudge.experiments.metrics import (
    bootstrap_ci,
    coverage,
    expected_gated_jcr,
    jcr,
    jcr_f,
    mean_latency,
    mean_std_over_seeds,
    paired_test,
    partition_analysis,
    pass_at_1,
    precision_on_agreement,
    reuse_rate,
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
