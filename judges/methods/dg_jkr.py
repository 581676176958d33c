"""DG-JKR: run two structurally different reuse methods; accept their winner when they agree, fall
back to dense prefill when they disagree (the disagreement is the safety signal).

``decision["measured"]`` is True when either arm answered from a dense prefill it ran to measure
anchors (KVCOMM's arm on a new content): dense's answer was then known to the gate. Winners are the
arms' :attr:`Outcome.winner` (label argmax, or the parsed choice in ``generate`` output, where two
unparseable answers do not count as agreeing)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvjudge.judges import methods as registry  # the registry package (attribute read at call time)
from kvjudge.judges.base import JudgeCase, Outcome
from kvjudge.judges.engine import JudgeEngine


@dataclass
class DGJKR:
    first: str = "naive"
    second: str = "kvcomm"

    def __post_init__(self) -> None:
        self._first = registry.make_method(self.first)
        self._second = registry.make_method(self.second)

    def __call__(self, engine: JudgeEngine, case: JudgeCase) -> Outcome:
        a = self._first(engine, case)
        b = self._second(engine, case)
        wa, wb = a.winner, b.winner
        agreed = wa is not None and wa == wb
        # On agreement the answer is the first method's (reused KV); otherwise dense decides.
        # A second method that already ran dense (e.g. to measure a KVCOMM anchor) left it memoised.
        out = a if agreed else engine.dense(case)[0]
        measured = any(bool((o.decision or {}).get("measured")) for o in (a, b))
        decision = {"agreed": agreed, self.first: wa, self.second: wb, f"{self.second}_reused": b.reused,
                    "measured": measured}
        return replace(out, reused=agreed, decision=decision, gate="accepted" if agreed else "fallback")
