"""The calibration math of a selective gate, torch-free: bounds, the fixed-sequence choice of lambda,
the risk model's fit, and the agreement statistics the gate benchmark reports.

A selective judge accepts its cheap path when a confidence ``s`` is at least ``lambda`` and answers
with dense otherwise. :func:`fixed_sequence_lambda` picks ``lambda`` after Jung, Brahman and Choi
("Trust or Escalate", ICLR 2025): thresholds from a **fixed grid** (chosen before any data is seen)
are tested from high to low; at each, the Clopper-Pearson upper bound at level ``1 - delta`` on the
disagreement rate among the calibration calls it accepts must be ``<= alpha``; the walk stops before
the first threshold that fails. Thresholds accepting fewer than ``min_accepted`` calls (30), or fewer
than the fewest calls whose bound could pass at all (zero disagreements: ``n >= log(delta) /
log(1 - alpha)``, 45 at alpha 0.05, delta 0.1), are skipped: that rule reads only how many calls a
threshold accepts, never whether they disagree, so a threshold that cannot pass does not end the walk. On exchangeable calls this gives ``P(disagreement among accepted <= alpha) >= 1 - delta``
(over the draw of the calibration set).

Confidences live on their own scale (``margin``: nats, ``risk``: a probability); the grid is laid
on ``u in [0, 1)`` and mapped to each scale by :func:`grid`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

MIN_ACCEPTED = 30
GRID_LEVELS = 1000
SCORES = ("margin", "risk")


def clopper_pearson_upper(errors: int, n: int, delta: float) -> float:
    """One-sided ``1 - delta`` Clopper-Pearson upper bound on a binomial rate with ``errors`` of ``n``
    (``beta.ppf(1 - delta, errors + 1, n - errors)``; 1 when every trial failed or ``n == 0``)."""
    if n <= 0 or errors >= n:
        return 1.0
    return float(stats.beta.ppf(1.0 - delta, errors + 1, n - errors))


def min_calls(alpha: float, delta: float) -> int:
    """The fewest accepted calls whose bound can be ``<= alpha`` (all of them agreeing with dense)."""
    return math.ceil(math.log(delta) / math.log1p(-alpha))


def grid(score: str, levels: int = GRID_LEVELS) -> list[float]:
    """The fixed thresholds of ``score``, high to low: ``u = 1 - k/levels`` (k = 1..levels) mapped to
    the score's scale (``margin``: ``-log(1 - u)`` nats, i.e. top-label odds ``1/(1-u)``; ``risk``: ``u``)."""
    if score not in SCORES:
        raise ValueError(f"unknown gate score {score!r}; known: {', '.join(SCORES)}")
    us = [1.0 - k / levels for k in range(1, levels + 1)]
    return [-math.log1p(-u) for u in us] if score == "margin" else us


def fixed_sequence_lambda(scores: Sequence[float], errors: Sequence[bool], alpha: float, delta: float,
                          thresholds: Sequence[float], min_accepted: int = MIN_ACCEPTED) -> dict:
    """Lambda by fixed-sequence testing with Clopper-Pearson bounds (see the module docstring).

    ``scores[i]``: call i's confidence; ``errors[i]``: its cheap answer differed from dense's;
    ``thresholds``: tried in the order given (high to low). Returns ``{"lambda", "bound", "accepted",
    "errors", "coverage", "n"}``: the last threshold that passed, its upper bound, how many calibration
    calls it accepted and how many of those disagreed; ``lambda = inf`` (never accept) when none passed.
    """
    if len(scores) != len(errors):
        raise ValueError(f"{len(scores)} scores for {len(errors)} error flags")
    if not 0 < alpha < 1 or not 0 < delta < 1:
        raise ValueError(f"alpha and delta must be in (0, 1), got alpha={alpha}, delta={delta}")
    s = np.asarray(scores, dtype=float)
    e = np.asarray(errors, dtype=bool)
    need = max(min_accepted, min_calls(alpha, delta))
    order = np.argsort(-s, kind="stable")
    s_sorted, cum_err = s[order], np.cumsum(e[order])
    best = {"lambda": math.inf, "bound": None, "accepted": 0, "errors": 0, "coverage": 0.0, "n": len(s)}
    for lam in thresholds:
        k = int(np.searchsorted(-s_sorted, -lam, side="right"))  # calls with score >= lam
        if k < need:
            continue
        err = int(cum_err[k - 1])
        bound = clopper_pearson_upper(err, k, delta)
        if bound > alpha:
            break
        best = {"lambda": float(lam), "bound": bound, "accepted": k, "errors": err,
                "coverage": k / len(s), "n": len(s)}
    return best


# ---------------------------------------------------------------------------- the risk model
def fit_risk(features: Sequence[Sequence[float]], agree: Sequence[bool], names: Sequence[str], c: float = 1.0) -> dict:
    """A logistic model of P(cheap agrees with dense | features) (sklearn, L2, ``C = c``) on standardised
    features; returns ``{"features", "mean", "scale", "coef", "intercept", "n_fit"}`` (plain lists), what
    the judge needs to score a call with one dot product. One class only: a constant model (no weights)."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, dtype=float)
    y = np.asarray(agree, dtype=int)
    if x.ndim != 2 or x.shape[0] != len(y) or x.shape[1] != len(names):
        raise ValueError(f"risk features must be [n, {len(names)}] with n = {len(y)}, got {x.shape}")
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale
    if len(set(y.tolist())) < 2:
        p = float(np.clip(y.mean() if len(y) else 0.5, 1e-6, 1 - 1e-6))
        coef, intercept = np.zeros(len(names)), math.log(p / (1 - p))
    else:
        model = LogisticRegression(C=c, max_iter=1000).fit(z, y)
        coef, intercept = model.coef_[0], float(model.intercept_[0])
    return {"features": list(names), "mean": mean.tolist(), "scale": scale.tolist(), "coef": list(map(float, coef)),
            "intercept": float(intercept), "n_fit": int(len(y))}


# ---------------------------------------------------------------------------- what a frontier point reports
def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); ``(0, 1)`` for ``n == 0``."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def kappa(a: Sequence[int | None], b: Sequence[int | None]) -> float | None:
    """Cohen's kappa of two judges' winners on the same calls (:func:`kvjudge.experiments.metrics.cohen_kappa`:
    calls where either is ``None`` left out; ``None`` when undefined or when no call has both)."""
    from kvjudge.experiments.metrics import cohen_kappa

    if not any(x is not None and y is not None for x, y in zip(a, b)):
        return None
    return cohen_kappa(a, b)


def chance(a: Sequence[int | None], b: Sequence[int | None]) -> float | None:
    """The chance agreement ``p_e`` beside :func:`kappa` on the same calls
    (:func:`kvjudge.experiments.metrics.chance_agreement`; ``None`` when no call has both)."""
    from kvjudge.experiments.metrics import chance_agreement

    if not any(x is not None and y is not None for x, y in zip(a, b)):
        return None
    return chance_agreement(a, b)


def binomial_margin(alpha: float, n: int, z: float = 1.959963984540054) -> float:
    """The one-sided 95% sampling margin of a rate ``alpha`` measured on ``n`` calls: ``z sqrt(a(1-a)/n)``."""
    return math.inf if n <= 0 else z * math.sqrt(alpha * (1 - alpha) / n)
