"""Random gate: take the reuse arm's answer on a share ``coverage`` of the records, dense on the rest.

The control of the DG-JKR paper: a gate that falls back to dense as often as DG-JKR does, but blindly.
The reuse arm is selectable (``arm``: ``naive``, ``kvcomm`` or ``pal_kv``; the paper's 68.12% JCR
fits KVCOMM's answer). Coverage is matched exactly by the evaluation protocol: it draws, per seed,
which records take the arm with :func:`exact_coverage_choice` (exactly ``round(coverage * n)`` of
them) and hands each record's choice to the gate as ``accept``. Left at None, ``accept`` is a
Bernoulli draw with probability ``coverage`` from the gate's seeded RNG (``kvjudge run``). On a
fallback the arm does not run (nothing of it is paid for, and its anchor pools do not see the record).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from kvjudge.judges import methods as registry  # the registry package (attribute read at call time)
from kvjudge.judges.base import JudgeCase, Outcome
from kvjudge.judges.engine import JudgeEngine
from kvjudge.judges.prompt import JudgeInputError

ARMS = ("naive", "kvcomm", "pal_kv")


def exact_coverage_choice(n: int, coverage: float, seed: int) -> list[bool]:
    """Which of ``n`` records (in the caller's order) take the reuse arm: exactly ``round(coverage * n)``
    of them (Python's ``round``, ties to even), chosen uniformly by a ``random.Random(seed)`` draw."""
    if n < 0 or not 0.0 <= coverage <= 1.0:
        raise JudgeInputError(f"need n >= 0 and coverage in [0, 1], got n={n}, coverage={coverage}")
    chosen = set(random.Random(seed).sample(range(n), round(coverage * n)))
    return [i in chosen for i in range(n)]


@dataclass
class RandomGate:
    coverage: float = 0.83
    seed: int = 0
    arm: str = "naive"
    accept: bool | None = None  # the protocol's per-record choice; None = seeded Bernoulli(coverage)
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.coverage <= 1.0:
            raise TypeError(f"coverage must be in [0, 1], got {self.coverage}")
        if self.arm not in ARMS:
            raise TypeError(f"arm must be one of {', '.join(ARMS)}, not {self.arm!r}")
        if self.accept not in (None, True, False):
            raise TypeError(f"accept must be true, false or null, not {self.accept!r}")
        self._rng = random.Random(self.seed)
        self._arm = registry.make_method(self.arm)

    def __call__(self, engine: JudgeEngine, case: JudgeCase) -> Outcome:
        accepted = self._rng.random() < self.coverage if self.accept is None else bool(self.accept)
        outcome = self._arm(engine, case) if accepted else engine.dense(case)[0]
        measured = bool(accepted and (outcome.decision or {}).get("measured"))
        decision = {"accepted": accepted, "arm": self.arm, "measured": measured}
        return replace(outcome, decision=decision, gate="accepted" if accepted else "fallback")
