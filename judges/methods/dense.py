"""Dense: prefill the whole judge prompt. The reference every other method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from kvjudge.judges.base import JudgeCase, Outcome
from kvjudge.judges.engine import JudgeEngine


@dataclass
class Dense:
    def __call__(self, engine: JudgeEngine, case: JudgeCase) -> Outcome:
        outcome, _ = engine.dense(case)
        return outcome
