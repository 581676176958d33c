"""PNG plots of an evaluation summary (matplotlib, Agg backend: no display needed).

* ``jcr_vs_coverage.png``: JCR against coverage (gates) / reuse rate (others) per method, ours
  filled, the paper's hollow (paper Figure 2's cost-consistency picture, consistency side);
* ``latency_ratio.png``: mean judge latency as a multiple of Dense Prefill per method, ours beside
  the paper's Table 4 ratios.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=True)  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402

from kvjudge.experiments.report import METHOD_NAMES, PAPER  # noqa: E402
from kvjudge.judges.catalog import ordered  # noqa: E402

__all__ = ["plot_jcr_vs_coverage", "plot_latency_ratio", "write_plots"]


def _order(methods: dict) -> list[str]:
    return ordered(methods)


def plot_jcr_vs_coverage(summary: dict, path: Path) -> Path:
    ms = summary["methods"]
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=110)
    colors = plt.get_cmap("tab10")
    for i, m in enumerate(_order(ms)):
        r = ms[m]
        x = r["coverage"] if r.get("coverage") is not None else r["reuse_rate"]
        y = r.get("jcr")
        if y is None or x is None:  # undefined (e.g. no generated answer named a candidate): no point, "n/a"
            ax.scatter([], [], color=colors(i), label=f"{METHOD_NAMES.get(m, m)}: JCR n/a")
        else:
            lo, hi = r.get("jcr_ci") or (y, y)
            ax.errorbar([100 * x], [100 * y], yerr=[[100 * (y - lo)], [100 * (hi - y)]], fmt="o", color=colors(i),
                        capsize=3, label=METHOD_NAMES.get(m, m))
        p = PAPER["points"].get(m)
        if p is not None:
            ax.scatter([p[0]], [p[1]], facecolors="none", edgecolors=colors(i), marker="s", s=45)
    ax.scatter([], [], facecolors="none", edgecolors="gray", marker="s", label="paper (hollow)")
    ax.set_xlabel("coverage (gates) / reuse rate (%)")
    ax.set_ylabel("JCR (%)")
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    cfg = summary.get("config", {})
    ax.set_title(f"JCR vs coverage — {cfg.get('dataset', '')}, {cfg.get('model', '')}", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_latency_ratio(summary: dict, path: Path) -> Path:
    ms = summary["methods"]
    order = _order(ms)
    ours = [ms[m].get("latency_ratio") or 0.0 for m in order]
    paper = [(PAPER["points"].get(m) or (None, None, None))[2] for m in order]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    xs = list(range(len(order)))
    w = 0.38
    bars = ax.bar([x - w / 2 for x in xs], ours, width=w, label="ours", color="tab:blue")
    ax.bar([x + w / 2 for x in xs], [p or 0.0 for p in paper], width=w, label="paper", color="tab:gray", alpha=0.6)
    for b, v in zip(bars, ours):
        ax.annotate(f"{v:.2f}×", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(xs)
    ax.set_xticklabels([METHOD_NAMES.get(m, m) for m in order], rotation=20, fontsize=8)
    ax.set_ylabel("latency / dense")
    ax.set_title("Judge latency relative to Dense Prefill", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_plots(summary: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    return [plot_jcr_vs_coverage(summary, out_dir / "jcr_vs_coverage.png"),
            plot_latency_ratio(summary, out_dir / "latency_ratio.png")]
