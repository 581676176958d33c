"""What every judge method shares: the case to judge, the engine that runs it, the verdict, a registry.

A method is a dataclass (its config and state) registered by name whose ``__call__(engine, case)``
returns an :class:`Outcome`; :class:`kvjudge.judges.judge.Judge` times it and turns it into a
:class:`Verdict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch

from kvjudge.cache.encoder import KVRunner
from kvjudge.cache.segments import KVSegment, place
from kvjudge.judges.prompt import JudgeInputError, JudgePrompt


@dataclass
class JudgeCase:
    """One judge call: the prompt (candidates in display order) and each candidate's source agent."""

    prompt: JudgePrompt
    sources: tuple[str, ...]
    memo: dict = field(default_factory=dict)  # results shared by methods within one call (dense)


@dataclass
class Outcome:
    """What a method computed: per-candidate label log-probs ``[N]`` and how."""

    scores: torch.Tensor
    reused: bool
    decision: dict | None = None


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

    def to_dict(self) -> dict:
        return asdict(self)


class JudgeMethod(Protocol):
    name: str

    def __call__(self, engine: "JudgeEngine", case: JudgeCase) -> Outcome: ...


METHODS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a method dataclass available as ``name``."""

    def deco(cls: type) -> type:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def known_methods() -> list[str]:
    import kvjudge.judges.methods  # noqa: F401  (registers every method file)

    return sorted(METHODS)


def make_method(name: str, **options) -> JudgeMethod:
    """Instantiate a registered method; unknown names list the known ones."""
    known = known_methods()
    if name not in METHODS:
        raise JudgeInputError(f"unknown judge method {name!r}; known methods: {', '.join(known)}")
    try:
        return METHODS[name](**options)
    except TypeError as exc:
        raise JudgeInputError(f"bad options for judge method {name!r}: {exc}") from exc


class JudgeEngine:
    """Dense scoring and naive assembly of a :class:`JudgeCase` on one :class:`KVRunner`."""

    def __init__(self, runner: KVRunner, max_positions: int | None = None) -> None:
        self.runner = runner
        self.max_positions = max_positions

    def check_length(self, prompt: JudgePrompt) -> None:
        total = len(prompt.ids())
        if self.max_positions and total > self.max_positions:
            raise JudgeInputError(
                f"judge prompt has {total} tokens, more than the model's {self.max_positions} positions"
            )

    def _scores(self, logprobs: torch.Tensor, prompt: JudgePrompt) -> torch.Tensor:
        return logprobs[list(prompt.labels)].cpu()

    def dense(self, case: JudgeCase, keep_cache: bool = False) -> tuple[Outcome, KVSegment | None]:
        """Full prefill of the whole prompt (memoised per case; ``keep_cache`` also returns its KV)."""
        hit = case.memo.get("dense")
        if hit is not None and (hit[1] is not None or not keep_cache):
            return hit
        ids = case.prompt.ids()
        logprobs, kv = self.runner.forward(ids, keep_cache=keep_cache)
        result = (Outcome(self._scores(logprobs, case.prompt), False), kv)
        case.memo["dense"] = result
        return result

    def pieces(self, case: JudgeCase) -> list[tuple[str, int, KVSegment]]:
        """Prefix KV + every candidate / glue piece encoded after the prefix (cached), placed back to back."""
        if "pieces" in case.memo:  # DG-JKR's two methods share one placement
            return list(case.memo["pieces"])
        prompt = case.prompt
        kinds, segs = [], []
        for kind, slot, ids in prompt.pieces()[:-1]:
            seg = self.runner.context(ids) if kind == "prefix" else self.runner.encode(prompt.prefix, ids)
            kinds.append((kind, slot))
            segs.append(seg)
        placed = place(segs, self.runner.inv_freq)
        case.memo["pieces"] = [(kind, slot, seg) for (kind, slot), seg in zip(kinds, placed)]
        return list(case.memo["pieces"])

    def score_pieces(self, case: JudgeCase, segs: list[KVSegment]) -> Outcome:
        """Prefill only the suffix against the assembled pieces and score the labels."""
        logprobs, _ = self.runner.forward(case.prompt.suffix, past=segs)
        return Outcome(self._scores(logprobs, case.prompt), True)
