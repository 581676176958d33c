"""Rich renderables for verdicts and benchmark results (pure: data in, renderable out)."""

from __future__ import annotations

from rich.table import Table

from kvjudge.judges.base import Verdict


def _preview(text: str, width: int = 48) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def verdict_table(verdict: Verdict, candidates: list[str]) -> Table:
    """Candidates with their label log-probabilities; the winner is marked."""
    title = (
        f"{verdict.method}: winner #{verdict.winner if verdict.winner is not None else '? (unparseable)'}  ·  {'reused KV' if verdict.reused else 'dense prefill'}"
        f"  ·  {verdict.latency_ms:.1f} ms  ·  {verdict.prefilled_tokens} tokens prefilled"
    )
    if verdict.decision:
        title += "  ·  " + ", ".join(f"{k}={v}" for k, v in verdict.decision.items())
    table = Table(caption=title, caption_justify="left")
    table.add_column("#", justify="right")
    table.add_column("log p(label)", justify="right")
    table.add_column("candidate")
    scores = verdict.scores or [None] * len(candidates)  # generated output has no label scores
    for i, (score, text) in enumerate(zip(scores, candidates), start=1):
        mark = "bold green" if i == verdict.winner else ""
        table.add_row(str(i), f"{score:.4f}" if score is not None else "-", _preview(text), style=mark)
    if verdict.answer_text is not None:
        table.caption += f"\njudge wrote ({verdict.parse_rule}): {_preview(verdict.answer_text, 200)}"
    return table


def bench_table(result: dict) -> Table:
    """Median latency and ratio to dense per method, from :func:`kvjudge.experiments.bench.judge.bench_judge`."""
    cfg = result["config"]
    table = Table(
        caption=f"judge latency · {cfg['model']} · {cfg['candidates']} candidates × {cfg['candidate_tokens']} tokens"
        f" · {cfg['repeats']} repeats · {cfg['device']}"
        + (f" · debias {cfg['debias']}" if cfg.get("debias", "none") != "none" else "")
        + (f" · consensus of {cfg['permutations']} rotations" if cfg.get("permutations", 1) > 1 else ""),
        caption_justify="left",
    )
    consensus = cfg.get("permutations", 1) > 1
    cols = ("method", "median ms", "× dense", "reused", "prefilled tokens") + (("position consistency",) if consensus else ())
    for col in cols:
        table.add_column(col, justify="left" if col == "method" else "right")
    for name, row in result["methods"].items():
        table.add_row(
            name,
            f"{row['median_ms']:.2f}",
            f"{row['ratio_to_dense']:.3f}" if row.get("ratio_to_dense") is not None else "-",
            f"{row['reuse_rate']:.0%}",
            str(row["prefilled_tokens"]),
            *((f"{row['position_consistency']:.0%}",) if consensus else ()),
        )
    return table
