"""Random gate: accept the reuse answer with probability ``coverage``, else run dense (seeded).

The control of the DG-JKR paper: a gate that falls back to dense as often as DG-JKR does, but blindly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from kvjudge.judges import methods as registry  # the registry package (attribute read at call time)
from kvjudge.judges.base import JudgeCase, Outcome
from kvjudge.judges.engine import JudgeEngine


@dataclass
class RandomGate:
    coverage: float = 0.83
    seed: int = 0
    reuse: str = "naive"
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.coverage <= 1.0:
            raise TypeError(f"coverage must be in [0, 1], got {self.coverage}")
        self._rng = random.Random(self.seed)
        self._reuse = registry.make_method(self.reuse)

    def __call__(self, engine: JudgeEngine, case: JudgeCase) -> Outcome:
        accepted = self._rng.random() < self.coverage
        outcome = self._reuse(engine, case) if accepted else engine.dense(case)[0]
        outcome.decision = {"accepted": accepted}
        outcome.gate = "accepted" if accepted else "fallback"
        return outcome
