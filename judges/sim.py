"""The judge of the simulated model (:mod:`kvjudge.models.sim`): a deterministic winner, no model.

:class:`SimJudge` is a :class:`~kvjudge.judges.base.JudgeLike` (as the real
:class:`~kvjudge.judges.judge.Judge`), so the judge actor hosts either. A call sleeps ``spec.judge_s``
seconds (no CPU), looks every candidate's KV up through ``fetch`` when one is given (so a pipeline
moves the same segments through the store as with a real judge), and picks ``winner = 1 +
sha256(problem, candidate texts) mod N``, the same for every method. Torch-free: method names and
options are checked against :mod:`kvjudge.judges.catalog`, not by building the (torch) methods.

Token ids follow the simulated tokenizer (UTF-8 bytes); the ``judge_prefix`` context of a problem
is the bytes of ``"Problem:\\n" + problem + "\\n\\nCandidate #1:\\n"``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

from kvjudge.cache.keys import segment_key
from kvjudge.judges.base import CandidateLike, Fetch, Verdict
from kvjudge.judges.candidate import DEFAULT_MAX_NEW_TOKENS, Candidate, as_candidates, check_mode
from kvjudge.judges.catalog import METHOD_OPTIONS
from kvjudge.judges.debias import check_debias
from kvjudge.judges.prompt import JudgeInputError, clean_candidate, header
from kvjudge.models.sim import SimSpec, parse_sim_spec, tokenize


def check_method(name: str, options: dict | None = None) -> None:
    """One-line :class:`JudgeInputError` for a method name or option names the registry does not know
    (as :func:`kvjudge.judges.methods.make_method` says it, without building the method)."""
    if name not in METHOD_OPTIONS:
        raise JudgeInputError(f"unknown judge method {name!r}; known methods: {', '.join(METHOD_OPTIONS)}")
    unknown = sorted(set(options or {}) - set(METHOD_OPTIONS[name]))
    if unknown:
        raise JudgeInputError(f"bad options for judge method {name!r}: unknown option(s) {', '.join(unknown)} "
                              f"(known: {', '.join(METHOD_OPTIONS[name]) or 'none'})")


def candidate_slot_ids(problem: str, text: str, mode: str) -> tuple[list[int], list[int]]:
    """``(context_ids, ids)`` the simulated judge encodes candidate ``text`` from in candidate-KV mode
    ``isolated`` (no context) or ``judge_prefix`` (after the problem and the first slot's header)."""
    ids = tokenize(clean_candidate(text))
    if mode == "isolated":
        return [], ids
    return tokenize(f"Problem:\n{problem.strip()}\n\n{header(1)}"), ids


class SimJudge:
    """Deterministic stand-in for :class:`~kvjudge.judges.judge.Judge` on a ``sim:...`` spec."""

    def __init__(self, spec: str | SimSpec, method: str = "dense", method_options: dict | None = None,
                 candidate_kv: str = "judge_prefix", output: str = "label",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, fetch: Fetch | None = None, debias: str = "none",
                 permutations: int = 1) -> None:
        check_mode(candidate_kv, output, max_new_tokens)
        check_debias(debias, output, permutations)  # accepted and ignored: the simulated winner has no position bias
        self.spec = parse_sim_spec(spec) if isinstance(spec, str) else spec
        check_method(method, method_options)
        self.default = method
        self.candidate_kv, self.output, self.max_new_tokens = candidate_kv, output, int(max_new_tokens)
        self.fetch = fetch
        self._fetched = 0
        self.calls = 0

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def device(self) -> str:
        return "sim"

    @property
    def fetched(self) -> int:
        """Candidate segments found through ``fetch`` so far."""
        return self._fetched

    def check_candidates(self, problem: str, n: int) -> str | None:
        """Always ``None``: the simulated judge takes any number of candidates."""
        return None

    def _slot_ids(self, problem: str, cand: Candidate, mode: str, number: int) -> tuple[list[int], list[int]]:
        """``(context_ids, ids)`` the KV of ``cand`` is encoded from in candidate-KV ``mode``."""
        if mode == "agent":
            if cand.prompt_ids:
                context = list(cand.prompt_ids)
            elif cand.agent_prompt:
                context = tokenize(cand.agent_prompt)
            else:
                raise JudgeInputError(f"candidate {number} has no agent_prompt: candidate-KV mode 'agent' needs "
                                      "the prompt its agent answered (token ids or text)")
            return context, list(cand.token_ids or tokenize(cand.text))
        return candidate_slot_ids(problem, cand.text, mode)

    def candidate_kv_request(self, problem: str, answer: CandidateLike, mode: str | None = None) -> dict:
        """``{"context_ids", "ids", "key", "mode"}`` as :meth:`Judge.candidate_kv_request` returns."""
        mode = mode or self.candidate_kv
        check_mode(mode, self.output, self.max_new_tokens)
        self._check(problem, [answer])
        context, ids = self._slot_ids(problem, as_candidates([answer])[0], mode, 1)
        return {"context_ids": context, "ids": ids, "key": segment_key(self.model_id, context, ids), "mode": mode}

    def prefetch(self, problem: str, candidates: Sequence[CandidateLike], candidate_kv: str | None = None) -> None:
        """Nothing to encode ahead of time in a simulation."""

    def _check(self, problem: str, candidates: Sequence) -> None:
        if not problem or not problem.strip():
            raise JudgeInputError("the problem is empty")
        if isinstance(candidates, str) or not candidates:
            raise JudgeInputError("no candidates to judge: give a list of at least one")

    def judge(self, problem: str, candidates: Sequence[CandidateLike], method: str | None = None,
              sources: Sequence[str] | None = None, candidate_kv: str | None = None, output: str | None = None,
              max_new_tokens: int | None = None) -> Verdict:
        """Sleep ``judge_s``, fetch each candidate's KV (when a fetch is set), return the hashed winner."""
        name = method or self.default
        check_method(name)
        mode, out = candidate_kv or self.candidate_kv, output or self.output
        max_new = int(max_new_tokens or self.max_new_tokens)
        check_mode(mode, out, max_new)
        self._check(problem, candidates)
        cands = as_candidates(candidates)
        if sources is not None and len(sources) != len(cands):
            raise JudgeInputError(f"{len(sources)} sources for {len(cands)} candidates")
        slots = [self._slot_ids(problem, c, mode, i) for i, c in enumerate(cands, start=1)]
        t0 = time.perf_counter()
        if self.fetch is not None and name != "dense":  # dense reuses nothing
            for context, ids in slots:
                if self.fetch(segment_key(self.model_id, context, ids)) is not None:
                    self._fetched += 1
        time.sleep(self.spec.judge_s)
        digest = hashlib.sha256(problem.encode())
        for c in cands:
            digest.update(b"\x00" + c.text.encode())
        winner = int.from_bytes(digest.digest()[:8], "little") % len(cands) + 1
        scores = [-0.1 if i == winner else -2.0 - i / 10 for i in range(1, len(cands) + 1)]
        self.calls += 1
        generated = out == "generate"
        return Verdict(
            method=name, winner=winner, scores=[] if generated else scores, reused=name != "dense",
            latency_ms=(time.perf_counter() - t0) * 1000.0, prefilled_tokens=0, encoded_tokens=0,
            candidate_kv=mode, output=out, answer_text=f"Candidate #{winner}" if generated else None,
        )
