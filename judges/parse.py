"""Reading the chosen candidate out of a judge's generated answer (``output="generate"``).

The rule, applied to the text with ``N`` candidates (numbers outside ``1..N`` are ignored everywhere):

1. ``explicit``: the first line holding an answer statement ``Best candidate`` followed by an
   optional ``is`` / ``:`` / ``=`` / ``-``, an optional ``Candidate`` and ``#k`` or ``k``
   (what the generate-mode instruction asks for: ``Best candidate: #2``), case-insensitive.
2. ``mention``: else the first line that mentions ``#k`` or ``Candidate k`` / ``Candidate #k``.
3. ``bare``: else the first non-empty line when it is nothing but one number (``2``, ``(2)``, ``#2.``).

Within the deciding line (rules 1 and 2), two different numbers make the answer ``ambiguous``
(``Candidate 1 or Candidate 2``); repeats of one number are fine. Ambiguous or ``none`` (no rule
applies) answers have no winner: the caller records the text and leaves the item out of JCR, as the
2601.08343 reference does (``paper_repair/eval/jcr.py`` counts only items where both ids parse).
Number words (``the second candidate``) are not read.
"""

from __future__ import annotations

import re

_EXPLICIT = re.compile(r"best\s+candidate\s*(?:is\b|[:=\-])?\s*(?:candidate\s*)?#?\s*(\d+)", re.IGNORECASE)
_MENTION = re.compile(r"#\s*(\d+)|\bcandidate\s*#?\s*(\d+)", re.IGNORECASE)
_BARE = re.compile(r"^\W*(\d+)\W*$")

RULES = ("explicit", "mention", "bare", "ambiguous", "none")


def _numbers(pattern: re.Pattern, line: str, n: int) -> list[int]:
    found = []
    for m in pattern.finditer(line):
        k = int(next(g for g in m.groups() if g is not None))
        if 1 <= k <= n:
            found.append(k)
    return found


def parse_choice(text: str, n: int) -> tuple[int | None, str]:
    """``(winner, rule)``: the 1-based candidate the answer picks (or ``None``) and which rule of
    this module decided (one of :data:`RULES`)."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    for rule, pattern in (("explicit", _EXPLICIT), ("mention", _MENTION)):
        for line in lines:
            found = _numbers(pattern, line, n)
            if found:
                return (found[0], rule) if len(set(found)) == 1 else (None, "ambiguous")
    if lines:
        m = _BARE.match(lines[0].strip())
        if m and 1 <= int(m.group(1)) <= n:
            return int(m.group(1)), "bare"
    return None, "none"
