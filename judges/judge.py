"""The judge: builds the prompt, runs a registered method, times it, returns a :class:`Verdict`."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from kvjudge.models import LoadedModel
from kvjudge.cache.encoder import KVRunner, segment_key
from kvjudge.judges.base import JudgeCase, JudgeMethod, Verdict
from kvjudge.judges.engine import JudgeEngine
from kvjudge.judges.methods import make_method
from kvjudge.judges.prompt import JudgeInputError, build_prompt


class Judge:
    """Picks the best of N candidates with any registered method, reusing cached KV across calls.

    Candidate segments are encoded once per (model, prefix, text) and kept by the runner, so
    later calls, other methods and shuffles of the same candidates only re-index positions.
    """

    def __init__(self, lm: LoadedModel, method: str = "dense", method_options: dict | None = None) -> None:
        self.lm = lm
        self.runner = KVRunner(lm.model, lm.model_id)
        self.engine = JudgeEngine(self.runner, getattr(lm.model.config, "max_position_embeddings", None))
        self._methods: dict[str, JudgeMethod] = {}
        self.default = method
        self.method(method, **(method_options or {}))

    def method(self, name: str, **options) -> JudgeMethod:
        """The (stateful) instance of method ``name``, created on first use."""
        if name not in self._methods or options:
            self._methods[name] = make_method(name, **options)
        return self._methods[name]

    def case(self, problem: str, candidates: Sequence[str], sources: Sequence[str] | None = None) -> JudgeCase:
        if isinstance(candidates, str) or isinstance(sources, str):
            raise JudgeInputError("candidates and sources must be lists of strings, not one string")
        prompt = build_prompt(self.lm.tokenizer, problem, list(candidates))
        self.engine.check_length(prompt)
        if sources is None:
            sources = [f"candidate-{i + 1}" for i in range(len(candidates))]
        if len(sources) != len(candidates):
            raise JudgeInputError(f"{len(sources)} sources for {len(candidates)} candidates")
        return JudgeCase(prompt, tuple(str(s) for s in sources))

    def candidate_kv_request(self, problem: str, answer: str) -> dict:
        """``{"context_ids", "ids", "key"}``: the KV of ``answer`` this judge looks up for ``problem``
        (encoded after the judge prompt's prefix, under the store key its runner computes)."""
        prompt = build_prompt(self.lm.tokenizer, problem, [answer])
        context, ids = list(prompt.prefix), list(prompt.candidates[0])
        return {"context_ids": context, "ids": ids, "key": segment_key(self.lm.model_id, context, ids)}

    def prefetch(self, problem: str, candidates: Sequence[str]) -> None:
        """Encode the prefix, every candidate and glue piece now (what a pipeline's store provides)."""
        self.engine.pieces(self.case(problem, candidates))

    def judge(
        self,
        problem: str,
        candidates: Sequence[str],
        method: str | None = None,
        sources: Sequence[str] | None = None,
    ) -> Verdict:
        """Judge ``candidates`` (display order) for ``problem``; ``sources`` name the agent of each."""
        name = method or self.default
        impl = self.method(name)
        case = self.case(problem, candidates, sources)
        runner = self.runner
        before = (runner.forward_tokens, runner.encode_tokens)
        _sync(runner.device)
        t0 = time.perf_counter()
        outcome = impl(self.engine, case)
        _sync(runner.device)
        latency = (time.perf_counter() - t0) * 1000.0
        encoded = runner.encode_tokens - before[1]
        scores = outcome.scores.float()
        return Verdict(
            method=name,
            winner=int(scores.argmax()) + 1,
            scores=[float(s) for s in scores],
            reused=outcome.reused,
            latency_ms=latency,
            prefilled_tokens=runner.forward_tokens - before[0] - encoded,
            encoded_tokens=encoded,
            decision=outcome.decision,
            gate=outcome.gate,
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
