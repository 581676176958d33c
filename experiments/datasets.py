"""The dataset registry: a name maps to its loader and its grader, so a dataset is one entry and no
dataset can ever be graded with another's checker.

A grader takes ``(problem, candidate text)`` and says whether the candidate is correct: HumanEval
runs the unit tests in the sandbox (:mod:`kvjudge.sandbox`; the grader is below), GSM8K compares the final
number, MMLU the chosen letter.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kvjudge.experiments.data import (
    ALIASES,
    ROW_FIELDS,
    DataError,
    IdRegistry,
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
from kvjudge.sandbox import SandboxResult, isolation_level, require_isolation, run_untrusted


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

    @property
    def fields(self) -> dict[str, tuple[type, ...]]:
        """The fields (and JSON types) every row of its file must have; its loader reads the file with
        :func:`~kvjudge.experiments.data.read_rows`, which refuses any other row in one line."""
        return ROW_FIELDS[self.name]


# --- HumanEval: the candidate's code runs in the sandbox, the dataset's tests in its trusted harness ---

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str, entry_point: str | None = None) -> str:
    """Strip Markdown code fences from a model answer.

    No ```` ``` ```` in ``text``: returned unchanged (a raw completion keeps its indentation).
    Otherwise the fenced blocks are collected (an unclosed final fence runs to the end of the
    text) and one is chosen: the first that defines ``def entry_point(`` when ``entry_point``
    is given, else the first tagged ``python``/``py`` (or untagged), else the longest.
    """
    if "```" not in text:
        return text
    blocks = [(lang.lower(), body) for lang, body in _FENCE_RE.findall(text)]
    if not blocks:
        return text.replace("```", "")
    if entry_point:
        pat = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.M)
        for _, body in blocks:
            if pat.search(body):
                return body
    for lang, body in blocks:
        if lang in ("python", "py", "python3", ""):
            return body
    return max(blocks, key=lambda b: len(b[1]))[1]


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.M) is not None


def _humaneval_body(problem: dict, completion: str) -> str:
    entry = problem["entry_point"]
    code = extract_code(completion, entry)
    if _defines(code, entry):
        return problem["prompt"] + "\n\n" + textwrap.dedent(code)
    return problem["prompt"] + code


def _humaneval_tests(problem: dict) -> str:
    return problem["test"] + "\n\n" + f"check({problem['entry_point']})\n"


def build_humaneval_program(problem: dict, completion: str) -> str:
    """The single-file program equivalent to one HumanEval check (for display and reuse).

    Standard form: ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``.
    When the (fence-stripped) completion restates ``def entry_point(`` itself — what chat models
    do — the body is ``prompt + "\\n\\n" + dedent(completion)`` instead: the prompt's function
    is docstring-only and therefore valid, the completion's later ``def`` replaces it, and the
    prompt's imports and helper functions (e.g. HumanEval/38, /50) stay available.
    ``check_humaneval`` runs the body in the sandbox and the test part in the trusted harness.
    """
    return _humaneval_body(problem, completion) + "\n\n" + _humaneval_tests(problem)


def check_humaneval(problem: dict, completion: str, timeout_s: float = 5.0, memory_mb: int = 512, *,
                    unsafe_exec: bool = False) -> SandboxResult:
    """Run ``problem``'s unit tests on ``completion``: the body of ``build_humaneval_program`` in
    the sandbox, ``test`` + ``check(entry_point)`` (after the prompt, for its helpers) in the
    trusted harness, calling the sandboxed ``entry_point``."""
    return run_untrusted(_humaneval_body(problem, completion), timeout_s=timeout_s, memory_mb=memory_mb,
                         tests=_humaneval_tests(problem), tests_prelude=problem["prompt"],
                         expose=(problem["entry_point"],), unsafe_exec=unsafe_exec)


def _grade_humaneval(problem: dict, text: str, unsafe_exec: bool = False) -> bool:
    return check_humaneval(problem, text, unsafe_exec=unsafe_exec).passed


DATASETS: dict[str, Dataset] = {
    "humaneval": Dataset("humaneval", load_humaneval, _grade_humaneval, sandboxed=True),
    "gsm8k": Dataset("gsm8k", load_gsm8k, lambda p, text, unsafe_exec=False: check_gsm8k(text, p["answer"]),
                     answer=gsm8k_answer),
    "mmlu": Dataset("mmlu", load_mmlu, lambda p, text, unsafe_exec=False: check_mmlu(text, p["answer"]),
                    answer=extract_choice, strata="topic"),
}
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)  # registry order; torch-free, for the CLI's choices


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
        problems, ids = [], IdRegistry(path)
        for n, item in iter_jsonl(path):
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or "id" not in item:
                raise DataError(f"{path}:{n}: each line needs an \"id\" and a string \"prompt\"")
            problems.append({**item, "id": ids.add(item["id"], n)})  # ids are strings, each once
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
