"""The judge's tensor engine: dense scoring and naive assembly of a :class:`JudgeCase` on a :class:`KVRunner`."""

from __future__ import annotations

import torch

from kvjudge.cache.encoder import KVRunner
from kvjudge.cache.segments import KVSegment, place
from kvjudge.judges.base import JudgeCase, Outcome
from kvjudge.judges.prompt import JudgeInputError, JudgePrompt


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
