"""Naive reuse: cached prefix + candidates encoded alone after it, RoPE re-indexed to their slots and
concatenated; only the suffix is prefilled. Exact for one candidate; loses cross-candidate attention
for the others (Liang et al., 2026)."""

from __future__ import annotations

from dataclasses import dataclass

from kvjudge.judges.base import JudgeCase, Outcome
from kvjudge.judges.debias import prior_name
from kvjudge.judges.engine import JudgeEngine


@dataclass
class Naive:
    def __call__(self, engine: JudgeEngine, case: JudgeCase) -> Outcome:
        return engine.score_pieces(case, [seg for _, _, seg in engine.pieces(case)], prior_name(self))
