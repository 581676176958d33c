"""The agent side of the simulated model (:mod:`kvjudge.models.sim`): :class:`SimGenerator` is a
:class:`~kvjudge.agents.base.GeneratorLike` that sleeps instead of computing. Torch-free: a simulated
agent actor imports neither torch nor transformers.

A batch sleeps ``spec.batch_seconds(longest answer, batch size)`` in one ``time.sleep`` (no CPU
meanwhile) and returns deterministic answers and synthetic KV segments ``[L, H, T, D]`` of the
spec's shape (:class:`~kvjudge.models.sim.SimSegment`, numpy), keys "rotated" for positions
``len(prompt)..`` as a real agent's are.
"""

from __future__ import annotations

import time

from kvjudge.agents.base import Generation, GenRequest
from kvjudge.models.sim import SimSegment, SimSpec, answer_ids, detokenize, synthetic_kv, tokenize


class SimGenerator:
    """Simulated generation and encoding under a :class:`SimSpec`."""

    def __init__(self, spec: SimSpec) -> None:
        self.spec = spec

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def max_positions(self) -> int | None:
        """No context limit: the simulated model takes any prompt."""
        return None

    def prompt_ids(self, prompt: str) -> list[int]:
        return tokenize(prompt)

    def segment(self, ids: list[int], start: int) -> SimSegment:
        return synthetic_kv(self.spec, ids, start)

    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0) -> Generation:
        return self.generate_batch([GenRequest(prompt, max_new_tokens, temperature, seed)])[0]

    def generate_batch(self, requests: list[GenRequest], ignore_eos: bool = False) -> list[Generation]:
        """Answers of ``min(answer_tokens, max_new_tokens)`` tokens, a function of (prompt, seed)."""
        if not requests:
            return []
        t0 = time.perf_counter()
        prompts = [self.prompt_ids(r.prompt) for r in requests]
        answers = [answer_ids(p, r.seed, min(self.spec.answer_tokens, max(0, r.max_new_tokens)))
                   for p, r in zip(prompts, requests)]
        time.sleep(self.spec.batch_seconds(max(len(a) for a in answers), len(requests)))
        seconds = time.perf_counter() - t0
        return [
            Generation(detokenize(a), a, len(p), seconds, self.segment(a, len(p)) if r.keep_kv and a else None,
                       p, len(requests))
            for r, p, a in zip(requests, prompts, answers)
        ]

    def encode(self, context_ids: list[int], ids: list[int]) -> SimSegment:
        """Synthetic KV of ``ids`` after ``context_ids`` (sleeps ``prefill_seconds`` of both)."""
        time.sleep(self.spec.prefill_seconds(len(context_ids) + len(ids)))
        return self.segment(list(ids), len(context_ids))

    def compress(self, segment: SimSegment, method: str, ratio: float, context_ids: list[int] | None) -> SimSegment:
        """The segment itself: the simulated model stores its synthetic KV uncompressed."""
        return segment
