"""The meta-reasoning risk gate: predict from cheap reuse-side features whether naive keeps dense's decision.

Per judge call (problem x shuffle seed, all N candidates) the features below are computed on the reuse
side only (dense is run once per call, for the label ``y = naive winner == dense winner``):

* naive's label distribution: margin (top-1 minus top-2 label log-prob), entropy and top probability of
  the labels renormalised, the log of the mass on the labels;
* ``kvcomm`` (when among the methods): agreement with naive and the mean absolute label log-prob gap;
* layer-1 key deviation of the reused candidates (mean and max over slots; the one-layer probe of
  :mod:`~kvjudge.experiments.diagnostics.hybrid`, ~1/L of a dense prefill);
* the candidates: N, token-length mean and coefficient of variation, the naive winner's length over the
  mean, pairwise token-set Jaccard similarity (mean, max), the naive winner's slot (0 first, 1 last).

Classifiers (scikit-learn): logistic regression on standardised features, and gradient boosting. Held-out
predictions come from ``GroupKFold`` by problem: a problem's calls (its shuffles) are never both in a
training and a test fold. AUC is computed on those held-out predictions only, with a bootstrap CI that
resamples problems (clusters). The gate accepts naive when the predicted keep-probability reaches a
threshold; at the lowest threshold whose accepted calls are >= 95% / 99% consistent we report coverage
(share of calls reusing) and the gate's JCR (rejected calls fall back to dense, which is consistent by
definition). Those thresholds are picked on the same held-out predictions (an optimistic read; the AUC is not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kvjudge.experiments.diagnostics.common import Call, Progress, case_of, figure, run_method, save
from kvjudge.experiments.diagnostics.hybrid import key_deviation
from kvjudge.judges.judge import Judge

PAPER_AUC = 0.82  # seed 001 (2601.08343): the preliminary meta-reasoning classifier
CLASSIFIERS = ("logreg", "gboost")
PRECISIONS = (0.95, 0.99)


def _jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def call_features(judge: Judge, call: Call, with_kvcomm: bool) -> tuple[dict[str, float], bool, dict]:
    """``(features, y, info)`` of one call: ``y`` is whether naive's winner equals dense's."""
    case = case_of(judge, call)
    naive = run_method(judge, case, "naive")
    dense = run_method(judge, case, "dense")
    s = naive.scores.double()
    p = torch.softmax(s, 0)
    top = torch.topk(s, min(2, s.numel())).values
    lens = [len(c) for c in case.prompt.candidates]
    n, w = len(lens), naive.winner - 1
    sims = [_jaccard(a, b) for a, b in combinations(case.prompt.candidates, 2)] or [1.0]
    dev = key_deviation(judge, case)
    mean_len = sum(lens) / n
    f = {
        "margin": float(top[0] - top[1]) if n > 1 else 0.0,
        "entropy": float(-(p * p.clamp_min(1e-30).log()).sum()),
        "top_prob": float(p.max()),
        "label_logmass": float(torch.logsumexp(s, 0)),
        "key_dev_mean": sum(dev) / n,
        "key_dev_max": max(dev),
        "n": float(n),
        "len_mean": mean_len,
        "len_cv": float(np.std(lens) / mean_len) if mean_len else 0.0,
        "winner_len_rel": lens[w] / mean_len if mean_len else 1.0,
        "sim_mean": float(np.mean(sims)),
        "sim_max": float(np.max(sims)),
        "winner_slot": w / (n - 1) if n > 1 else 0.0,
    }
    info = {"naive": naive.winner, "dense": dense.winner}
    if with_kvcomm:
        kv = run_method(judge, case, "kvcomm")
        f["kvcomm_agree"] = float(kv.winner == naive.winner)
        f["kvcomm_gap"] = float((kv.scores.double() - s).abs().mean())
        info["kvcomm"] = kv.winner
    return f, naive.winner == dense.winner, info


@dataclass
class Heldout:
    """Held-out (out-of-fold) keep-probabilities and the folds that produced them."""

    proba: np.ndarray  # [n] P(naive keeps dense's decision), each from a model that never saw its problem
    folds: list[tuple[np.ndarray, np.ndarray]]  # (train indices, test indices)


def _classifier(kind: str, seed: int):
    if kind == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    if kind == "gboost":
        return GradientBoostingClassifier(n_estimators=100, max_depth=2, learning_rate=0.1, subsample=0.8,
                                          random_state=seed)
    raise ValueError(f"unknown classifier {kind!r}; known: {', '.join(CLASSIFIERS)}")


def grouped_heldout(X: np.ndarray, y: np.ndarray, groups: Sequence[str], kind: str = "logreg",
                    n_splits: int = 5, seed: int = 0) -> Heldout:
    """Out-of-fold P(y=1) ``[n]`` from ``GroupKFold`` by ``groups`` (no group in both train and test).
    A training fold with one class predicts its constant rate."""
    groups = np.asarray([str(g) for g in groups])
    k = min(n_splits, len(set(groups)))
    if k < 2:
        raise ValueError("grouped cross-validation needs calls from at least two problems")
    proba = np.full(len(y), np.nan)
    folds = []
    for train, test in GroupKFold(n_splits=k).split(X, y, groups):
        folds.append((train, test))
        if len(set(y[train])) < 2:
            proba[test] = float(y[train].mean())
            continue
        model = _classifier(kind, seed).fit(X[train], y[train])
        proba[test] = model.predict_proba(X[test])[:, 1]
    return Heldout(proba, folds)


def auc_ci(y: np.ndarray, proba: np.ndarray, groups: Sequence[str], reps: int = 1000,
           seed: int = 0) -> tuple[float | None, tuple[float, float] | None]:
    """AUC of held-out ``proba`` and its 95% bootstrap CI, resampling groups (problems) with replacement."""
    if len(set(y.tolist())) < 2:
        return None, None
    auc = float(roc_auc_score(y, proba))
    groups = np.asarray([str(g) for g in groups])
    uniq = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in uniq}
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(reps):
        idx = np.concatenate([members[g] for g in rng.choice(uniq, size=len(uniq), replace=True)])
        if len(set(y[idx].tolist())) == 2:
            stats.append(roc_auc_score(y[idx], proba[idx]))
    if not stats:
        return auc, None
    return auc, (float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5)))


def gate_at_precision(y: np.ndarray, proba: np.ndarray, precision: float) -> dict | None:
    """The lowest threshold whose accepted calls (proba >= t) are at least ``precision`` consistent:
    ``{"threshold", "coverage", "jcr", "precision"}`` (None when no threshold reaches it)."""
    best = None
    for t in np.unique(proba):
        acc = proba >= t
        prec = float(y[acc].mean())
        if prec >= precision:
            best = {"threshold": float(t), "coverage": float(acc.mean()), "precision": prec,
                    "jcr": float(1.0 - (acc & (y == 0)).mean())}
            break
    return best


def run_risk(judge: Judge, calls: list[Call], methods: Sequence[str], out: Path, progress: Progress = None,
             classifiers: Sequence[str] = CLASSIFIERS, n_splits: int = 5) -> dict:
    """Features per call, grouped held-out AUC per classifier, ROC curve, gate coverage at 95% / 99%
    precision; writes ``risk_roc.png`` into ``out``."""
    with_kvcomm = "kvcomm" in methods
    feats, ys, groups, infos = [], [], [], []
    for call in calls:
        f, y, info = call_features(judge, call, with_kvcomm)
        feats.append(f)
        ys.append(int(y))
        groups.append(call.task_id)
        infos.append({"task_id": call.task_id, "seed": call.seed, "y": int(y), **info, "features": f})
        if progress:
            progress(f"risk {call.task_id} seed {call.seed}")
    names = list(feats[0])
    X = np.array([[f[k] for k in names] for f in feats], dtype=float)
    y = np.array(ys)
    result = {"kind": "risk", "features": names, "calls": len(ys), "problems": len(set(groups)),
              "naive_jcr": float(y.mean()), "flips": int((y == 0).sum()), "paper_auc": PAPER_AUC,
              "classifiers": {}, "rows": infos}
    curves = {}
    if len(set(groups)) < 2 or len(set(ys)) < 2:
        why = "fewer than two problems" if len(set(groups)) < 2 else \
            ("naive never flipped dense's decision" if y.all() else "naive never kept dense's decision")
        result["skipped"] = f"no AUC: {why} ({len(ys)} calls)"
        result["figures"] = []
        return result
    for kind in classifiers:
        held = grouped_heldout(X, y, groups, kind, n_splits)
        auc, ci = auc_ci(y, held.proba, groups)
        fpr, tpr, _ = roc_curve(y, held.proba)
        curves[kind] = (fpr, tpr, auc)
        result["classifiers"][kind] = {
            "auc": auc, "auc_ci95": ci, "folds": len(held.folds),
            "gate": {f"{int(p * 100)}%": gate_at_precision(y, held.proba, p) for p in PRECISIONS},
            "heldout_proba": [round(float(v), 6) for v in held.proba],
        }
    result["figures"] = [plot_roc(curves, out / "risk_roc.png")]
    return result


def plot_roc(curves: dict, path: Path) -> str:
    fig = figure(5.0, 4.6)
    ax = fig.subplots()
    for kind, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{kind} (held-out AUC {auc:.2f})")
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--", label="chance")
    ax.scatter([], [], marker="", label=f"seed 001: AUC {PAPER_AUC:.2f}")
    ax.set_xlabel("false positive rate (flips predicted safe)")
    ax.set_ylabel("true positive rate (keeps predicted safe)")
    ax.set_title("Risk gate: does naive keep dense's decision?", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return save(fig, path)
