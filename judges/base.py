"""What every judge method shares: the case to judge, what a method returns, the verdict.

A method is a dataclass (its config and state) in :mod:`kvjudge.judges.methods` whose
``__call__(engine, case)`` returns an :class:`Outcome`; :class:`kvjudge.judges.judge.Judge` times
it and turns it into a :class:`Verdict`. The engine is :class:`kvjudge.judges.engine.JudgeEngine`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from kvjudge.judges.prompt import JudgePrompt

if TYPE_CHECKING:  # typing only: this module stays importable without torch
    import torch

    from kvjudge.judges.engine import JudgeEngine

Gate = Literal["accepted", "fallback"]


@dataclass
class JudgeCase:
    """One judge call: the prompt (candidates in display order) and each candidate's source agent."""

    prompt: JudgePrompt
    sources: tuple[str, ...]
    memo: dict = field(default_factory=dict)  # results shared by methods within one call (dense)


@dataclass
class Outcome:
    """What a method computed: per-candidate label log-probs ``[N]`` and how.

    ``gate`` is set by gating methods only: ``"accepted"`` when the reuse answer was kept,
    ``"fallback"`` when dense decided. ``decision`` holds method-specific details.
    """

    scores: "torch.Tensor"
    reused: bool
    decision: dict | None = None
    gate: Gate | None = None


@dataclass
class Verdict:
    """A judge decision. ``winner`` is 1-based, as shown to the judge; ``scores[i]`` is the
    log-probability (full vocabulary) of slot ``i+1``'s label at the answer position."""

    method: str
    winner: int
    scores: list[float]
    reused: bool
    latency_ms: float
    prefilled_tokens: int
    encoded_tokens: int
    decision: dict | None = None
    gate: Gate | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class JudgeMethod(Protocol):
    name: str

    def __call__(self, engine: "JudgeEngine", case: JudgeCase) -> Outcome: ...
