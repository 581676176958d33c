"""Candidate sets: generated once per problem through a topology, kept in ``candidates.jsonl``.

A line is ``{"task_id", "candidates": [texts], "sources": [agent ids], "problem"?}``; a line that
carries its own ``problem`` text needs no dataset to be judged again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kvjudge.experiments.config import EvalConfig
from kvjudge.experiments.data import iter_jsonl
from kvjudge.topologies import load_topology, resolve_topology
from kvjudge.topologies.results import read_records
from kvjudge.topologies.runner import RunError, run
from kvjudge.topologies.schema import JudgeSpec
from kvjudge.topologies.telemetry import Reporter


@dataclass
class CandidateSet:
    """One problem's candidates (original order) and the agent that wrote each."""

    task_id: str
    candidates: list[str]
    sources: list[str]
    problem: str | None = None


def load_candidates(path: str | Path) -> dict[str, CandidateSet]:
    """Read ``{"task_id", "candidates": [texts], "sources": [agent ids]}`` lines (``sources`` optional)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"--candidates: file not found: {path}")
    out: dict[str, CandidateSet] = {}
    for n, rec in iter_jsonl(path):
        if not isinstance(rec, dict) or "task_id" not in rec:
            raise ValueError(f"{path}:{n}: each line needs a \"task_id\" and a list \"candidates\"")
        cands = rec.get("candidates")
        if not isinstance(cands, list) or not cands or not all(isinstance(c, str) for c in cands):
            raise ValueError(f"{path}:{n}: \"candidates\" must be a non-empty list of strings")
        sources = rec.get("sources") or [f"candidate-{i + 1}" for i in range(len(cands))]
        if not isinstance(sources, list) or len(sources) != len(cands):
            raise ValueError(f"{path}:{n}: {len(sources) if isinstance(sources, list) else 'no'} sources "
                             f"for {len(cands)} candidates")
        problem = rec.get("problem")
        if problem is not None and not isinstance(problem, str):
            raise ValueError(f"{path}:{n}: \"problem\" must be a string")
        tid = str(rec["task_id"])
        out[tid] = CandidateSet(tid, list(cands), [str(s) for s in sources], problem)
    if not out:
        raise ValueError(f"--candidates: {path} holds no candidates")
    return out


def write_candidates(path: Path, sets: Iterable[CandidateSet]) -> None:
    """Write ``sets`` atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for cs in sets:
            line = {"task_id": cs.task_id, "candidates": cs.candidates, "sources": cs.sources}
            if cs.problem is not None:
                line["problem"] = cs.problem
            fh.write(json.dumps(line) + "\n")
    tmp.replace(path)


def generate_candidates(cfg: EvalConfig, problems: list[dict], reporter: Reporter) -> None:
    """Run ``problems`` through the topology on Ray, appending to ``OUT/generation/results.jsonl``
    (resumable); :func:`generated_sets` reads what it produced."""
    topo = load_topology(resolve_topology(cfg.topology))
    # The pipeline's own judge is not what we measure: dense keeps generation cheap.
    topo = topo.model_copy(update={"judge": JudgeSpec(method="dense")})
    try:
        run(topo, problems, cfg.out / "generation", model=cfg.model, resume=cfg.resume, reporter=reporter)
    except RunError as exc:
        raise ValueError(f"generation: {exc}") from exc


def generation_records(gen_dir: Path) -> list[dict]:
    """Every record of the generation run in ``gen_dir`` (torn lines skipped)."""
    return read_records(gen_dir / "results.jsonl")


def generated_sets(gen_dir: Path, problems: dict[str, str] | None = None) -> dict[str, CandidateSet]:
    """Candidate sets of the problems a generation run in ``gen_dir`` finished ("ok" records);
    ``problems`` (id -> text) fills each set's ``problem``."""
    sets: dict[str, CandidateSet] = {}
    for rec in generation_records(gen_dir):
        if rec.get("status") != "ok":
            continue
        cands = rec["candidates"]
        tid = str(rec["id"])
        sets[tid] = CandidateSet(tid, [c["text"] for c in cands],
                                 [str(c.get("agent", f"candidate-{i + 1}")) for i, c in enumerate(cands)],
                                 (problems or {}).get(tid))
    return sets
