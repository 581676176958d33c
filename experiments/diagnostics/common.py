"""What every diagnostic shares: candidate files -> judge calls under shuffles, the judge, plots.

A *call* is one problem judged under one shuffle seed: the candidates in display order
(``perm[slot] = original index``, :func:`kvjudge.experiments.judging.permutation`), each as the judge
takes it in the chosen candidate-KV mode (``agent``: with what its KV was computed under).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure  # the object API: files only, no pyplot state, no display

from kvjudge.experiments.candidates import CandidateSet, load_candidates, with_agent_prompts
from kvjudge.experiments.data import ALIASES
from kvjudge.experiments.datasets import DATASETS, load_dataset, sample_ids
from kvjudge.experiments.judging import permutation
from kvjudge.judges.base import JudgeCase, Outcome
from kvjudge.judges.candidate import CANDIDATE_KV_MODES
from kvjudge.judges.judge import Judge
from kvjudge.models import LoadedModel, load_model
from kvjudge.topologies import load_topology, resolve_topology

__all__ = [
    "Call", "DiagnoseError", "NO_AGENT_PROMPTS", "PAPER_SEEDS", "Progress", "calls_for", "case_of", "figure",
    "label_scores", "load_calls", "make_judge", "mean", "resolve_model", "run_method", "save", "truncated",
    "validate_methods",
]

PAPER_SEEDS: tuple[int, ...] = (42, 123, 456)
NO_AGENT_PROMPTS = "candidate file has no agent prompts: use --candidate-kv judge_prefix or isolated"
Progress = Callable[[str], None] | None


class DiagnoseError(ValueError):
    """Bad diagnose input (file, mode, method, limit); the message is one line."""


@dataclass
class Call:
    """One judge call: ``problem`` text, the candidates shown (display order) and their sources."""

    task_id: str
    seed: int
    perm: list[int]  # perm[slot] = original candidate index (0-based)
    problem: str
    shown: list  # str, or a Candidate as a dict in agent mode
    sources: list[str]

    @property
    def n(self) -> int:
        return len(self.shown)

    def first(self, n: int) -> "Call":
        """The same call with only its first ``n`` displayed candidates (progressive addition)."""
        return Call(self.task_id, self.seed, self.perm[:n], self.problem, self.shown[:n], self.sources[:n])


def _problem_texts(sets: dict[str, CandidateSet], dataset: str | None) -> dict[str, str]:
    """``task_id -> problem text``: a line's own ``problem``, else the dataset it names (or ``dataset``)."""
    texts = {tid: cs.problem for tid, cs in sets.items() if cs.problem}
    missing = [tid for tid in sets if tid not in texts]
    if not missing:
        return texts
    names = {dataset} if dataset else {tid.split("/")[0].strip().lower() for tid in missing}
    for name in sorted(names):
        key = ALIASES.get(name, name)
        if key not in DATASETS:
            raise DiagnoseError(f"{len(missing)} candidate sets carry no \"problem\" and {name!r} is no dataset "
                                f"({', '.join(sorted(DATASETS))}): add \"problem\" to each line or give --dataset")
        texts.update({str(p["id"]): p["prompt"] for p in load_dataset(key)})
    absent = [tid for tid in missing if tid not in texts]
    if absent:
        raise DiagnoseError(f"task {absent[0]!r} has no \"problem\" and is not in the dataset ({len(absent)} such)")
    return texts


def _shown(cs: CandidateSet, perm: Sequence[int], candidate_kv: str, model_id: str) -> list:
    """The candidates of ``cs`` in display order as the judge takes them in ``candidate_kv`` mode."""
    if candidate_kv != "agent":
        return [cs.candidates[i] for i in perm]
    pick = getattr(cs, "candidate", None)
    if pick is None:
        raise DiagnoseError(NO_AGENT_PROMPTS)
    try:
        return [pick(i, model_id) for i in perm]
    except ValueError:  # CandidateSet says which field is missing; the user needs the way out
        raise DiagnoseError(NO_AGENT_PROMPTS) from None


def calls_for(sets: dict[str, CandidateSet], texts: dict[str, str], seeds: Sequence[int], candidate_kv: str,
              model_id: str) -> list[Call]:
    """Every (problem, seed) call, seed-major (the eval protocol's order: KVCOMM pools see seed 1 first)."""
    out = []
    for seed in seeds:
        for tid, cs in sets.items():
            perm = permutation(int(seed), tid, len(cs.candidates))
            out.append(Call(tid, int(seed), perm, texts[tid], _shown(cs, perm, candidate_kv, model_id),
                            [cs.sources[i] for i in perm]))
    return out


def load_calls(path: str | Path, seeds: Sequence[int], limit: int | None, candidate_kv: str, model_id: str,
               dataset: str | None = None, topology: str | None = None, offset: int = 0,
               sample_seed: int | None = None) -> list[Call]:
    """The judge calls of ``limit`` candidate sets of ``path`` (after ``offset``, in the sampling order of
    their dataset, :func:`kvjudge.experiments.datasets.sample_ids`) under each shuffle seed.

    In ``agent`` mode, sets without agent prompts (files written before prompts were kept) get them
    rebuilt from ``topology`` (a file or shipped name) when one is given; else a one-line error."""
    if candidate_kv not in CANDIDATE_KV_MODES:
        raise DiagnoseError(f"unknown candidate-KV mode {candidate_kv!r}; known: {', '.join(CANDIDATE_KV_MODES)}")
    if limit is not None and int(limit) < 1:
        raise DiagnoseError(f"--limit must be at least 1, got {limit}")
    if not seeds:
        raise DiagnoseError("give at least one shuffle seed")
    sets = load_candidates(path)  # one-line ValueError on a bad file
    if limit is not None or offset or sample_seed is not None:
        prefixes = {tid.split("/")[0].strip().lower() for tid in sets}
        name = dataset or (next(iter(prefixes)) if len(prefixes) == 1 else None)
        sets = {t: sets[t] for t in sample_ids(list(sets), name, limit, offset, sample_seed)}
        if not sets:
            raise DiagnoseError(f"--offset {offset} skips every candidate set of {path}")
    texts = _problem_texts(sets, dataset)
    if candidate_kv == "agent" and topology and any(cs.agent_prompts is None for cs in sets.values()):
        with_agent_prompts(sets, texts, load_topology(resolve_topology(topology)))  # one-line ValueError
    return calls_for(sets, texts, seeds, candidate_kv, model_id)


def resolve_model(model: str | LoadedModel) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)


def make_judge(lm: LoadedModel, candidate_kv: str, debias: str = "none") -> Judge:
    """An in-process judge (label output) in ``candidate_kv`` mode; methods are made on first use.
    ``debias``: label scores minus each method's saved slot prior (:mod:`kvjudge.judges.debias`)."""
    return Judge(lm, method="dense", candidate_kv=candidate_kv, output="label", debias=debias)


def case_of(judge: Judge, call: Call) -> JudgeCase:
    """The judge's case for ``call`` (a fresh one: dense and pieces are memoised per case)."""
    return judge.case(call.problem, call.shown, call.sources)


def run_method(judge: Judge, case: JudgeCase, name: str) -> Outcome:
    """Method ``name``'s outcome on ``case`` (methods on one case share its dense prefill and pieces)."""
    return judge.method(name)(judge.engine, case)


def label_scores(logprobs: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """Label log-probs ``[N]`` out of next-token log-probs ``[V]``."""
    return logprobs[list(labels)].float().cpu()


def truncated(values: list[float]) -> list[float]:
    return [round(float(v), 6) for v in values]


def mean(values: Sequence[float]) -> float | None:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(vals) / len(vals) if vals else None


def figure(width: float = 6.4, height: float = 4.4) -> Figure:
    """A new figure (no pyplot: nothing global, nothing to close)."""
    return Figure(figsize=(width, height), dpi=110)


def save(fig: Figure, path: Path) -> str:
    """Write ``fig`` to ``path`` (PNG); returns the file name."""
    fig.tight_layout()
    fig.savefig(path)
    return Path(path).name


def validate_methods(methods: Sequence[str], allowed: Sequence[str]) -> list[str]:
    """``methods`` without dense (always the reference), each known; one-line error otherwise."""
    out = [m for m in dict.fromkeys(methods) if m != "dense"]
    bad = [m for m in out if m not in allowed]
    if bad:
        raise DiagnoseError(f"unknown or unsupported method {bad[0]!r} here; choose from {', '.join(allowed)}")
    return out
