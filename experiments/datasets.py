"""The dataset registry: a name maps to its loader and its grader, so a dataset is one entry and no
dataset can ever be graded with another's checker.

A grader takes ``(problem, candidate text)`` and says whether the candidate is correct: HumanEval
runs the unit tests in the sandbox (:mod:`kvjudge.experiments.sandbox`), GSM8K compares the final
number, MMLU the chosen letter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kvjudge.experiments.data import (
    ALIASES,
    DataError,
    check_gsm8k,
    check_mmlu,
    extract_choice,
    gsm8k_answer,
    iter_jsonl,
    load_gsm8k,
    load_humaneval,
    load_mmlu,
    sample_rows,
)
from kvjudge.experiments.sandbox import check_humaneval, isolation_level, require_isolation


@dataclass(frozen=True)
class Dataset:
    """A benchmark: ``load(path=None, limit=None) -> [{"id", "prompt", "answer", ...}]`` and
    ``grade(problem, text, unsafe_exec) -> bool``; ``sandboxed`` graders run untrusted code (in parallel,
    refused without sandbox isolation unless ``unsafe_exec``). ``answer(text)`` is the final answer a
    candidate commits to, as its grader reads it (``None``: this data set has no short answer to vote
    on); ``strata`` is the row key a ``--limit`` sample is stratified over (MMLU: ``topic``)."""

    name: str
    load: Callable[..., list[dict]]
    grade: Callable[[dict, str, bool], bool]
    sandboxed: bool = False
    answer: Callable[[str], str | None] | None = None
    strata: str | None = None


def _grade_humaneval(problem: dict, text: str, unsafe_exec: bool = False) -> bool:
    return check_humaneval(problem, text, unsafe_exec=unsafe_exec).passed


DATASETS: dict[str, Dataset] = {
    "humaneval": Dataset("humaneval", load_humaneval, _grade_humaneval, sandboxed=True),
    "gsm8k": Dataset("gsm8k", load_gsm8k, lambda p, text, unsafe_exec=False: check_gsm8k(text, p["answer"]),
                     answer=gsm8k_answer),
    "mmlu": Dataset("mmlu", load_mmlu, lambda p, text, unsafe_exec=False: check_mmlu(text, p["answer"]),
                    answer=extract_choice, strata="topic"),
}


def sandbox_for(dataset: str, unsafe_exec: bool = False) -> str | None:
    """The isolation level grading ``dataset`` will run at (``None``: it runs no code); a one-line
    error when its code would run unisolated and ``unsafe_exec`` was not given."""
    if not get_dataset(dataset).sandboxed:
        return None
    require_isolation(unsafe_exec)
    return isolation_level()


def get_dataset(name: str) -> Dataset:
    """The registered dataset ``name`` (case-insensitive, aliases such as ``human-eval``)."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(sorted(DATASETS))}")
    return DATASETS[key]


def load_dataset(name: str, path: str | None = None, limit: int | None = None, offset: int = 0,
                 sample_seed: int | None = None) -> list[dict]:
    """The problems of dataset ``name`` (from its package, or ``path``) in its sampling order, the first
    ``offset`` skipped, ``limit`` kept (:func:`sample_problems`)."""
    return sample_problems(name, get_dataset(name).load(path=path), limit, offset, sample_seed)


def sample_problems(name: str, problems: list[dict], limit: int | None = None, offset: int = 0,
                    sample_seed: int | None = None) -> list[dict]:
    """The one sampling rule of every command (``--limit``, ``--offset``, ``--sample-seed``): a data set
    with ``strata`` (MMLU: subjects) is taken round-robin over its strata in a seeded order (seed 0 by
    default), so ``--limit 57`` gives one MMLU problem per subject; the others keep their order, or a
    seeded shuffle with ``sample_seed``. See :func:`kvjudge.experiments.data.sample_rows`."""
    return sample_rows(problems, limit, offset, sample_seed, get_dataset(name).strata)


def sample_ids(ids: Sequence[str], dataset: str | None = None, limit: int | None = None, offset: int = 0,
               sample_seed: int | None = None) -> list[str]:
    """The same sampling rule for task ids that already exist (a candidates file): ordered as
    :func:`sample_problems` orders ``dataset`` (ids it does not hold last, in the given order), then
    ``offset`` and ``limit``. Without a known ``dataset``: the given order, or a seeded shuffle."""
    ids = [str(t) for t in ids]
    if dataset and is_dataset(dataset):
        wanted = set(ids)
        order = [str(p["id"]) for p in load_dataset(dataset, sample_seed=sample_seed) if str(p["id"]) in wanted]
        known = set(order)
        rows = [{"id": t} for t in order + [t for t in ids if t not in known]]
        return [r["id"] for r in sample_rows(rows, limit, offset)]
    return [r["id"] for r in sample_rows([{"id": t} for t in ids], limit, offset, sample_seed)]


def describe_sample(name: str | None, problems: Sequence[dict], limit: int | None, offset: int,
                    sample_seed: int | None) -> dict:
    """What ``summary.json`` says of the sample: the rule, its seed, offset and limit, the problem ids in
    order and, for a stratified data set, how many problems each stratum gave."""
    strata = get_dataset(name).strata if name and is_dataset(name) else None
    order = ("stratified round-robin over " + strata if strata else
             "seeded shuffle" if sample_seed is not None else "data set order")
    out: dict = {"order": order, "seed": (sample_seed or 0) if strata else sample_seed, "offset": offset,
                 "limit": limit, "problem_ids": [str(p["id"]) for p in problems]}
    if strata:
        counts: dict[str, int] = {}
        for p in problems:
            counts[str(p.get(strata))] = counts.get(str(p.get(strata)), 0) + 1
        out[f"{strata}_counts"] = dict(sorted(counts.items()))
    return out


def is_dataset(spec: str) -> bool:
    key = spec.strip().lower()
    return ALIASES.get(key, key) in DATASETS


def load_problems(spec: str, limit: int | None = None, offset: int = 0, sample_seed: int | None = None) -> list[dict]:
    """A dataset name (sampled by :func:`sample_problems`), or a JSONL file of ``{"id", "prompt"}`` lines
    (other keys are kept; file order, or a seeded shuffle, then ``offset`` and ``limit``)."""
    if is_dataset(spec):
        problems = load_dataset(spec, limit=limit, offset=offset, sample_seed=sample_seed)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError(f"--problems {spec!r}: neither a dataset ({', '.join(DATASETS)}) nor a JSONL file")
        problems = []
        for n, item in iter_jsonl(path):
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or "id" not in item:
                raise DataError(f"{path}:{n}: each line needs an \"id\" and a string \"prompt\"")
            problems.append({**item, "id": str(item["id"])})
        problems = sample_rows(problems, limit, offset, sample_seed)
    if not problems:
        raise DataError(f"--problems {spec!r} holds no problems")
    return problems


def grade_candidates(dataset: str, problems: Sequence[dict], candidates: dict[str, list[str]],
                     workers: int = 2, unsafe_exec: bool = False) -> dict[str, list[bool]]:
    """Pass/fail of every candidate, once: ``{task_id: [passed per original candidate]}``."""
    ds = get_dataset(dataset)
    jobs = [(p, i, text) for p in problems for i, text in enumerate(candidates[str(p["id"])])]
    with ThreadPoolExecutor(max_workers=max(1, workers if ds.sandboxed else 1)) as pool:
        results = list(pool.map(lambda job: bool(ds.grade(job[0], job[2], unsafe_exec)), jobs))
    out = {str(p["id"]): [False] * len(candidates[str(p["id"])]) for p in problems}
    for (p, i, _), ok in zip(jobs, results):
        out[str(p["id"])][i] = ok
    return out
