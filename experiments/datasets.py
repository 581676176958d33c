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
    iter_jsonl,
    load_gsm8k,
    load_humaneval,
    load_mmlu,
)
from kvjudge.experiments.sandbox import check_humaneval, isolation_level, require_isolation


@dataclass(frozen=True)
class Dataset:
    """A benchmark: ``load(path=None, limit=None) -> [{"id", "prompt", "answer", ...}]`` and
    ``grade(problem, text, unsafe_exec) -> bool``; ``sandboxed`` graders run untrusted code (in parallel,
    refused without sandbox isolation unless ``unsafe_exec``)."""

    name: str
    load: Callable[..., list[dict]]
    grade: Callable[[dict, str, bool], bool]
    sandboxed: bool = False


def _grade_humaneval(problem: dict, text: str, unsafe_exec: bool = False) -> bool:
    return check_humaneval(problem, text, unsafe_exec=unsafe_exec).passed


DATASETS: dict[str, Dataset] = {
    "humaneval": Dataset("humaneval", load_humaneval, _grade_humaneval, sandboxed=True),
    "gsm8k": Dataset("gsm8k", load_gsm8k, lambda p, text, unsafe_exec=False: check_gsm8k(text, p["answer"])),
    "mmlu": Dataset("mmlu", load_mmlu, lambda p, text, unsafe_exec=False: check_mmlu(text, p["answer"])),
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


def load_dataset(name: str, path: str | None = None, limit: int | None = None) -> list[dict]:
    """The problems of dataset ``name`` (from its package, or ``path``); ``limit`` keeps the first N."""
    return get_dataset(name).load(path=path, limit=limit)


def is_dataset(spec: str) -> bool:
    key = spec.strip().lower()
    return ALIASES.get(key, key) in DATASETS


def load_problems(spec: str, limit: int | None = None) -> list[dict]:
    """A dataset name, or a JSONL file of ``{"id", "prompt"}`` lines (other keys are kept)."""
    if is_dataset(spec):
        problems = load_dataset(spec, limit=limit)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError(f"--problems {spec!r}: neither a dataset ({', '.join(DATASETS)}) nor a JSONL file")
        problems = []
        for n, item in iter_jsonl(path):
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or "id" not in item:
                raise DataError(f"{path}:{n}: each line needs an \"id\" and a string \"prompt\"")
            problems.append({**item, "id": str(item["id"])})
        if limit is not None:
            problems = problems[:limit]
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
