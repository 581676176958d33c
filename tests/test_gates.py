"""Selective gates: the calibration guarantee on a synthetic stream, the selective method's endpoints
against dense and its cheap path, and gate files refused outside what they were fitted for."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from kvjudge.experiments import gates as G


# ---------------------------------------------------------------------------- the calibration math
def _risk_above(lam: float) -> float:
    """Disagreement among accepted calls of the synthetic stream, exactly: s ~ U(0, 1) and
    P(disagree | s) = 0.4 (1 - s)^2, so E[f(s) | s >= lam] = 0.4 (1 - lam)^2 / 3 (0 when nothing is
    accepted)."""
    return 0.0 if lam >= 1 else 0.4 * (1 - lam) ** 2 / 3


def _calibrate(rng: np.random.Generator, n: int, alpha: float, delta: float, bound: str = "cp") -> float:
    s = rng.random(n)
    err = rng.random(n) < 0.4 * (1 - s) ** 2
    if bound == "cp":
        return G.fixed_sequence_lambda(s, err, alpha, delta, G.grid("risk", 200))["lambda"]
    # the same walk with the plain empirical rate instead of the upper bound (no guarantee)
    order = np.argsort(-s)
    lam = math.inf
    for t in G.grid("risk", 200):
        k = int((s >= t).sum())
        if k < max(G.MIN_ACCEPTED, G.min_calls(alpha, delta)):
            continue
        if err[order[:k]].mean() > alpha:
            break
        lam = t
    return lam


def test_clopper_pearson_matches_the_binomial_tail():
    """The bound u solves P(Binom(n, u) <= k) = delta (closed form of the exact one-sided bound)."""
    for k, n, d in ((0, 30, 0.1), (3, 50, 0.1), (10, 200, 0.05)):
        u = G.clopper_pearson_upper(k, n, d)
        assert stats.binom.cdf(k, n, u) == pytest.approx(d, abs=1e-9)
    assert G.clopper_pearson_upper(5, 5, 0.1) == 1.0


def test_calibrated_lambda_keeps_the_risk_in_1_minus_delta_of_200_calibrations():
    alpha, delta = 0.05, 0.1
    rng = np.random.default_rng(0)
    lams = [_calibrate(rng, 500, alpha, delta) for _ in range(200)]
    held = [_risk_above(lam) <= alpha for lam in lams]
    assert sum(held) / len(held) >= 1 - delta
    assert np.mean([lam < 1 for lam in lams]) > 0.9  # it does accept: the guarantee is not bought by never reusing


def test_the_guarantee_needs_the_bound():
    """The same walk on the empirical rate breaks the guarantee on this stream (so the test above can fail)."""
    alpha, delta = 0.05, 0.1
    rng = np.random.default_rng(0)
    lams = [_calibrate(rng, 500, alpha, delta, bound="empirical") for _ in range(200)]
    assert np.mean([_risk_above(lam) <= alpha for lam in lams]) < 1 - delta


def test_too_few_accepted_or_failing_first_threshold_never_accepts():
    s = [0.9] * 10 + [0.1] * 100
    err = [False] * 10 + [True] * 100
    assert G.fixed_sequence_lambda(s, err, 0.05, 0.1, G.grid("risk"))["lambda"] == math.inf


def test_margin_grid_and_kappa_and_wilson():
    g = G.grid("margin", 4)
    assert g == sorted(g, reverse=True) and g[-1] == 0.0
    assert g[0] == pytest.approx(-math.log(0.25))
    assert G.kappa([1, 1, 2, 2], [1, 1, 2, 2]) == pytest.approx(1.0)
    assert G.kappa([4, 4, 4], [4, 4, 4]) is None  # both always pick the same slot: undefined
    lo, hi = G.wilson(45, 50)
    assert lo < 0.9 < hi and hi <= 1


def test_risk_model_recovers_a_logistic_truth():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 2))
    y = rng.random(4000) < 1 / (1 + np.exp(-(2.0 * x[:, 0] - 0.5)))
    fit = G.fit_risk(x, y, ["a", "b"], c=100.0)
    w = np.asarray(fit["coef"]) / np.asarray(fit["scale"])
    assert w[0] == pytest.approx(2.0, abs=0.25) and abs(w[1]) < 0.25
