"""What every agent generator shares, torch-free: a request, its result, and the interface the agent
actor drives (:class:`GeneratorLike`), met by the real :class:`~kvjudge.agents.generate.Generator`
and the simulated :class:`~kvjudge.agents.sim.SimGenerator` (a test checks both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # typing only: the simulated agent runs without torch
    from kvjudge.cache.segments import KVSegment
    from kvjudge.models.sim import SimSegment

    Segment = KVSegment | SimSegment
else:
    Segment = Any


@dataclass(frozen=True)
class GenRequest:
    """One agent turn to generate: greedy when ``temperature == 0``, else seeded sampling."""

    prompt: str
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    keep_kv: bool = True  # return ``agent_kv`` (costs one decode step per batch, a copy per request)


@dataclass
class Generation:
    """One agent turn: the answer text and tokens, the prompt ids, timing and the answer's own KV
    (``agent_kv``: ``[L, H, T, D]``, keys rotated for positions ``len(prompt_ids)..``).

    ``seconds`` is the wall time of the batch the request ran in (``batch_size`` requests).
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    seconds: float
    agent_kv: Segment | None = None
    prompt_ids: list[int] | None = None
    batch_size: int = 1

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


@runtime_checkable
class GeneratorLike(Protocol):
    """What the agent actor calls on a generator (real or simulated).

    ``max_positions``: the longest sequence the model holds (``None``: no limit).
    ``compress(segment, method, ratio, context_ids)``: ``segment`` token-compressed by the press
    ``method`` to ``ratio`` (``context_ids``: what it was encoded after), the segment itself when the
    generator cannot compress (the simulated one).
    """

    @property
    def model_id(self) -> str: ...

    @property
    def max_positions(self) -> int | None: ...

    def prompt_ids(self, prompt: str) -> list[int]: ...

    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
                 seed: int = 0) -> Generation: ...

    def generate_batch(self, requests: list[GenRequest], ignore_eos: bool = False) -> list[Generation]: ...

    def encode(self, context_ids: list[int], ids: list[int]) -> Segment: ...

    def compress(self, segment: Segment, method: str, ratio: float, context_ids: list[int] | None) -> Segment: ...
