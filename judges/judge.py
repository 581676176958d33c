"""The judge: builds the prompt, runs a registered method, times it, returns a :class:`Verdict`."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from kvjudge.models import LoadedModel
from kvjudge.models.chat import agent_prompt_ids
from kvjudge.cache.encoder import KVRunner, segment_key
from kvjudge.judges.base import JudgeCase, JudgeMethod, Verdict
from kvjudge.judges.candidate import DEFAULT_MAX_NEW_TOKENS, Candidate, answer_ids, as_candidates, check_mode
from kvjudge.judges.engine import JudgeEngine
from kvjudge.judges.methods import make_method
from kvjudge.judges.prompt import JudgeInputError, build_prompt

CandidateLike = str | Candidate | dict  # a text, a Candidate, or a Candidate as a dict (files, Ray)


class Judge:
    """Picks the best of N candidates with any registered method, reusing cached KV across calls.

    Candidate segments are encoded once per (model, context, ids) and kept by the runner, so later
    calls, other methods and shuffles of the same candidates only re-index positions. Where each
    candidate's KV comes from is ``candidate_kv`` (see :mod:`kvjudge.judges.candidate`); how the
    judge answers is ``output`` (``label`` / ``generate``, with ``max_new_tokens``). All three can be
    overridden per call.
    """

    def __init__(
        self,
        lm: LoadedModel,
        method: str = "dense",
        method_options: dict | None = None,
        candidate_kv: str = "judge_prefix",
        output: str = "label",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> None:
        check_mode(candidate_kv, output, max_new_tokens)
        self.lm = lm
        self.runner = KVRunner(lm.model, lm.model_id)
        max_pos = getattr(lm.model.config, "max_position_embeddings", None)
        self.engine = JudgeEngine(self.runner, max_pos, lm.tokenizer)
        self._methods: dict[str, JudgeMethod] = {}
        self.default = method
        self.candidate_kv, self.output, self.max_new_tokens = candidate_kv, output, int(max_new_tokens)
        self.method(method, **(method_options or {}))

    def method(self, name: str, **options) -> JudgeMethod:
        """The (stateful) instance of method ``name``, created on first use."""
        if name not in self._methods or options:
            self._methods[name] = make_method(name, **options)
        return self._methods[name]

    def case(
        self,
        problem: str,
        candidates: Sequence[CandidateLike],
        sources: Sequence[str] | None = None,
        candidate_kv: str | None = None,
        output: str | None = None,
        max_new_tokens: int | None = None,
    ) -> JudgeCase:
        """The :class:`JudgeCase` for ``candidates`` (display order) under the given (or default) modes.

        ``sources`` default to each candidate's ``source``, else ``candidate-<i>``. In ``agent`` mode
        every candidate needs its agent's prompt (``prompt_ids`` or ``agent_prompt``; else a one-line
        :class:`JudgeInputError` naming ``agent_prompt``); its slot holds its ``token_ids`` verbatim
        (the text's ids when it has none).
        """
        if isinstance(candidates, str) or isinstance(sources, str):
            raise JudgeInputError("candidates and sources must be lists of strings, not one string")
        mode = candidate_kv or self.candidate_kv
        output = output or self.output
        max_new = int(max_new_tokens or self.max_new_tokens)
        check_mode(mode, output, max_new)
        cands = as_candidates(candidates)
        if sources is None:
            sources = [c.source or f"candidate-{i + 1}" for i, c in enumerate(cands)]
        if len(sources) != len(cands):
            raise JudgeInputError(f"{len(sources)} sources for {len(cands)} candidates")
        tok = self.lm.tokenizer
        texts = [c.text for c in cands]
        contexts, ids = None, None
        if mode == "agent":
            contexts = tuple(self._agent_context(c, i) for i, c in enumerate(cands, start=1))
            ids = [c.token_ids or answer_ids(tok, c.text) for c in cands]
        prompt = build_prompt(tok, problem, texts, candidate_ids=ids, output=output)
        if mode == "isolated":
            contexts = tuple(() for _ in cands)
        self.engine.check_length(prompt)
        return JudgeCase(
            prompt, tuple(str(s) for s in sources), contexts=contexts, exact_first=mode == "judge_prefix",
            candidate_kv=mode, output=output, max_new_tokens=max_new,
        )

    def _agent_context(self, cand: Candidate, number: int) -> tuple[int, ...]:
        if cand.prompt_ids:
            return cand.prompt_ids
        if cand.agent_prompt:
            return tuple(agent_prompt_ids(self.lm.tokenizer, cand.agent_prompt))
        raise JudgeInputError(
            f"candidate {number} has no agent_prompt: candidate-KV mode 'agent' needs the prompt its agent "
            "answered (token ids or text)"
        )

    def candidate_kv_request(self, problem: str, answer: CandidateLike, mode: str | None = None) -> dict:
        """``{"context_ids", "ids", "key", "mode"}``: the KV of ``answer`` this judge looks up for
        ``problem`` in candidate-KV ``mode`` (default: the judge's): ``ids`` encoded right after
        ``context_ids`` (the judge prompt's prefix; the agent's prompt ids; nothing), found under the
        store key ``key = segment_key(model_id, context_ids, ids)`` its runner computes. In ``agent``
        mode a pipeline stores the KV its agent captured while generating under ``key`` (no prefill)."""
        case = self.case(problem, [answer], candidate_kv=mode, output="label")
        context, ids = list(case.context(0)), list(case.prompt.candidates[0])
        return {"context_ids": context, "ids": ids, "key": segment_key(self.lm.model_id, context, ids),
                "mode": case.candidate_kv}

    def prefetch(self, problem: str, candidates: Sequence[CandidateLike], candidate_kv: str | None = None) -> None:
        """Encode the prefix, every candidate and glue piece now (what a pipeline's store provides)."""
        self.engine.pieces(self.case(problem, candidates, candidate_kv=candidate_kv))

    def judge(
        self,
        problem: str,
        candidates: Sequence[CandidateLike],
        method: str | None = None,
        sources: Sequence[str] | None = None,
        candidate_kv: str | None = None,
        output: str | None = None,
        max_new_tokens: int | None = None,
    ) -> Verdict:
        """Judge ``candidates`` (display order) for ``problem``; ``sources`` name the agent of each."""
        name = method or self.default
        impl = self.method(name)
        case = self.case(problem, candidates, sources, candidate_kv, output, max_new_tokens)
        runner, engine = self.runner, self.engine
        before = (runner.forward_tokens, runner.encode_tokens, engine.decoded_tokens)
        _sync(runner.device)
        t0 = time.perf_counter()
        outcome = impl(engine, case)
        _sync(runner.device)
        latency = (time.perf_counter() - t0) * 1000.0
        encoded = runner.encode_tokens - before[1]
        return Verdict(
            method=name,
            winner=outcome.winner,
            scores=[float(s) for s in outcome.scores.float()],
            reused=outcome.reused,
            latency_ms=latency,
            prefilled_tokens=runner.forward_tokens - before[0] - encoded,
            encoded_tokens=encoded,
            decision=outcome.decision,
            gate=outcome.gate,
            candidate_kv=case.candidate_kv,
            output=case.output,
            answer_text=outcome.text,
            parse_rule=outcome.parse_rule,
            decoded_tokens=engine.decoded_tokens - before[2],
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
