"""Rich renderables for verdicts and benchmark results (pure: data in, renderable out); one builder
per result, named after it (``verdict_table``, ``bench_judge_table``, ``bench_run_table``)."""

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


def bench_judge_table(result: dict) -> Table:
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


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def bench_run_table(result: dict) -> Table:
    """A two-column summary of :func:`kvjudge.experiments.bench.run.bench_run`'s result."""
    ratio = result["ratio_to_bound"]
    store = result["store"]
    rows = [
        ("problems", f"{result['done']} ok / {result['problems']} ({result['failed']} failed)"),
        ("replicas", ", ".join(f"{m}: {n}" for m, n in result["replicas"].items())),
        ("concurrency", str(result["concurrency"])),
        ("start-up", f"{result['startup_s']:.2f} s (until every replica was up; not in the makespan)"),
        ("makespan", f"{result['makespan_s']:.2f} s"),
        ("lower bound", f"{result['lower_bound_s']:.2f} s (critical path {result['critical_path_s']:.2f} s, "
                        f"work/capacity {result['work_bound_s']:.2f} s, judge {result['judge_bound_s']:.2f} s; "
                        f"from {result['bound_from']})"),
        ("makespan / bound", f"{ratio:.2f}x" if ratio else "-"),
        ("throughput", f"{result['throughput_per_s']:.2f} problems/s"),
        ("agent utilisation", f"{100 * result['agent_utilisation']:.0f}% (mean batch {result['mean_batch']:.1f})"),
        ("store bytes by node", ", ".join(f"{n[:8]}: {_mib(b)}" for n, b in store["bytes_by_node"].items()) or "-"),
        ("bytes read by node", ", ".join(f"{n[:8]}: {_mib(b)}" for n, b in store["bytes_read_by_node"].items())
         or "-"),
        ("judge fetches", str(store["judge_fetches"])),
    ]
    table = Table(title=f"bench run {result['topology']} on {result['model']}")
    for col in ("", "value"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    return table
