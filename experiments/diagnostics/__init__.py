"""``kvjudge diagnose KIND``: the analyses of seed 001 (2601.08343) on any candidate file, with plots.

Kinds (explicit registry below): ``attention`` (answer-position attention per candidate slot),
``progressive`` (JCR vs number of candidates), ``hybrid`` (k candidates recomputed in place),
``risk`` (a classifier predicting whether naive keeps dense's decision), or ``all``. Each writes
``DIR/KIND.json`` and its figures; ``DIR/diagnostics.md`` is rewritten from every result in ``DIR``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kvjudge.experiments.diagnostics.attention import run_attention
from kvjudge.experiments.diagnostics.common import (
    PAPER_SEEDS, DiagnoseError, Progress, load_calls, make_judge, resolve_model,
)
from kvjudge.experiments.diagnostics.hybrid import run_hybrid
from kvjudge.experiments.diagnostics.progressive import run_progressive
from kvjudge.experiments.diagnostics.report import write_report
from kvjudge.experiments.diagnostics.risk import run_risk
from kvjudge.models import LoadedModel

DEFAULT_METHODS: tuple[str, ...] = ("naive", "kvcomm")

KINDS: dict[str, Callable[..., dict]] = {
    "attention": lambda judge, calls, methods, out, progress: run_attention(judge, calls, methods, out, progress),
    "progressive": lambda judge, calls, methods, out, progress: run_progressive(judge, calls, methods, out, progress),
    "hybrid": lambda judge, calls, methods, out, progress: run_hybrid(judge, calls, out, progress=progress),
    "risk": lambda judge, calls, methods, out, progress: run_risk(judge, calls, methods, out, progress),
}


def run_diagnose(kind: str, candidates: str | Path, model: str | LoadedModel = "smollm2-135m",
                 methods: Sequence[str] | None = None, candidate_kv: str = "agent",
                 seeds: Sequence[int] | None = None, limit: int | None = None, out: str | Path = "diagnostics",
                 dataset: str | None = None, progress: Progress = None, topology: str | None = None,
                 offset: int = 0, sample_seed: int | None = None, debias: str = "none") -> dict:
    """Run diagnostic ``kind`` (or ``all``) on the candidate file ``candidates``; write ``KIND.json``,
    its figures and ``diagnostics.md`` into ``out``. Returns ``{kind: result, ..., "report": path}``.

    ``topology`` (a file or shipped name, e.g. ``progressive_refinement``): rebuilds the agent prompts
    of a file written before prompts were kept (``agent`` mode only). Bad input (unknown kind or
    method, missing file, agent mode without agent prompts) raises a one-line :class:`DiagnoseError`
    / ``ValueError``."""
    kinds = list(KINDS) if kind == "all" else [kind]
    if kinds[0] not in KINDS:
        raise DiagnoseError(f"unknown diagnostic {kind!r}; known: {', '.join(KINDS)}, all")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise DiagnoseError(f"--out {out} exists and is not a folder")
    methods = list(methods or DEFAULT_METHODS)
    seeds = [int(s) for s in (seeds if seeds is not None else PAPER_SEEDS)]
    lm = resolve_model(model)
    calls = load_calls(candidates, seeds, limit, candidate_kv, lm.model_id, dataset, topology, offset, sample_seed)
    out.mkdir(parents=True, exist_ok=True)
    judge = make_judge(lm, candidate_kv, debias)
    results: dict = {}
    for k in kinds:
        t0 = time.perf_counter()
        res = KINDS[k](judge, calls, methods, out, progress)
        res["config"] = {"model": lm.model_id, "candidates": str(candidates), "candidate_kv": candidate_kv,
                         "topology": topology,
                         "seeds": seeds, "limit": limit, "offset": offset, "sample_seed": sample_seed,
                         "methods": methods, "calls": len(calls),
                         "seconds": round(time.perf_counter() - t0, 1)}
        (out / f"{k}.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
        results[k] = res
    results["report"] = str(write_report(out))
    return results


__all__ = ["DEFAULT_METHODS", "KINDS", "DiagnoseError", "run_diagnose"]
