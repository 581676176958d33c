"""Progressive candidate addition: JCR as the judge sees 1, 2, ..., N candidates.

For every call (problem x shuffle seed) the first ``n`` candidates of the shuffled list are judged by
dense and by each method on one case (so methods share its dense prefill); JCR at ``n`` is the share
of calls whose winner equals dense's on that same prefix. With one candidate the winner is label
``1`` whatever the cache, so JCR(1) = 1 in every mode; the label log-prob deviation from dense
(``max |score - dense score|``, also recorded) says whether the cache itself is exact there: 0 in
``judge_prefix`` mode (slot 1 is encoded in its real context), not 0 in ``agent`` / ``isolated``.
KVCOMM-like methods keep their anchor pools across calls, as in a pipeline; calls they answered
from a dense prefill (a new anchor measured) are counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kvjudge.experiments.diagnostics.common import (
    Call, Progress, case_of, figure, mean, run_method, save, validate_methods,
)
from kvjudge.judges.judge import Judge
from kvjudge.judges.methods import known_methods

PAPER_JCR_N4 = {"naive": 23.60}  # seed 001 (2601.08343) Table 1, N = 4 agents, naive reuse JCR (%)


def progressive_rows(judge: Judge, calls: list[Call], methods: Sequence[str],
                     progress: Progress = None) -> list[dict]:
    """One row per (call, n, method): winner, dense's winner, max label log-prob deviation, answered-from-dense."""
    rows = []
    for call in calls:
        for n in range(1, call.n + 1):
            case = case_of(judge, call.first(n))
            dense = run_method(judge, case, "dense")
            for m in methods:
                out = run_method(judge, case, m)
                dev = float((out.scores - dense.scores).abs().max()) if out.scores.numel() else None
                rows.append({"task_id": call.task_id, "seed": call.seed, "n": n, "method": m, "winner": out.winner,
                             "dense_winner": dense.winner, "consistent": out.winner == dense.winner,
                             "max_score_dev": dev, "reused": bool(out.reused)})
        if progress:
            progress(f"progressive {call.task_id} seed {call.seed}")
    return rows


def jcr_by_n(rows: list[dict], methods: Sequence[str]) -> dict[str, dict[str, dict]]:
    """``{method: {n: {"jcr", "calls", "mean_score_dev", "max_score_dev", "reuse_rate"}}}``."""
    out: dict[str, dict[str, dict]] = {}
    for m in methods:
        out[m] = {}
        for n in sorted({r["n"] for r in rows}):
            sel = [r for r in rows if r["method"] == m and r["n"] == n]
            if not sel:
                continue
            devs = [r["max_score_dev"] for r in sel if r["max_score_dev"] is not None]
            out[m][str(n)] = {"jcr": mean([r["consistent"] for r in sel]), "calls": len(sel),
                              "mean_score_dev": mean(devs), "max_score_dev": max(devs) if devs else None,
                              "reuse_rate": mean([r["reused"] for r in sel])}
    return out


def run_progressive(judge: Judge, calls: list[Call], methods: Sequence[str], out: Path,
                    progress: Progress = None) -> dict:
    """JCR vs number of candidates per method; writes ``progressive.png`` into ``out``."""
    methods = validate_methods(methods, known_methods())
    rows = progressive_rows(judge, calls, methods, progress)
    table = jcr_by_n(rows, methods)
    return {"kind": "progressive", "methods": methods, "candidate_kv": judge.candidate_kv, "jcr": table,
            "paper_jcr_n4": PAPER_JCR_N4, "rows": rows, "figures": [plot_progressive(table, out / "progressive.png")]}


def plot_progressive(table: dict, path: Path) -> str:
    fig = figure(6.0, 4.2)
    ax = fig.subplots()
    for m, by_n in table.items():
        ns = sorted(int(n) for n in by_n)
        ax.plot(ns, [100 * by_n[str(n)]["jcr"] for n in ns], marker="o", label=m)
        if m in PAPER_JCR_N4:
            ax.scatter([4], [PAPER_JCR_N4[m]], marker="s", facecolors="none", edgecolors="gray",
                       label=f"{m}, seed 001 (N=4)")
    ax.set_xlabel("candidates shown (prefix of each shuffled list)")
    ax.set_ylabel("JCR vs dense on the same candidates (%)")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.set_title("Progressive candidate addition", fontsize=10)
    ax.legend(fontsize=8)
    return save(fig, path)
