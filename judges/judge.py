"""The judge: builds the prompt, runs a registered method, times it, returns a :class:`Verdict`."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from kvjudge.models import LoadedModel
from kvjudge.models.chat import agent_prompt_ids
from kvjudge.cache.encoder import KVRunner, segment_key
from kvjudge.judges.base import CandidateLike, Fetch, JudgeCase, Verdict
from kvjudge.judges.candidate import DEFAULT_MAX_NEW_TOKENS, Candidate, answer_ids, as_candidates, check_mode
from kvjudge.judges.debias import (PriorError, PriorKey, PriorTable, check_debias, load_table, needed_methods,
                                   priors_for, rotation, template_hash)
from kvjudge.judges.engine import JudgeEngine
from kvjudge.judges.methods import JudgeMethod, make_method
from kvjudge.judges.prompt import JudgeInputError, build_prompt


ID_PADDING = 16  # whitespace characters a candidate's token_ids may add around its text (agents add 0-2)


class Judge:
    """Picks the best of N candidates with any registered method, reusing cached KV across calls.

    Candidate segments are encoded once per (model, context, ids) and kept by the runner, so later
    calls, other methods and shuffles of the same candidates only re-index positions. Where each
    candidate's KV comes from is ``candidate_kv`` (see :mod:`kvjudge.judges.candidate`); how the
    judge answers is ``output`` (``label`` / ``generate``, with ``max_new_tokens``). All three can be
    overridden per call.

    ``debias`` (``none`` / ``pride`` / ``content_free``, :mod:`kvjudge.judges.debias`): label scores
    minus each method's saved slot prior. ``permutations`` K > 1: permutation consensus, the K cyclic
    rotations of the candidates are judged (K capped at N) and the candidate with the highest summed
    (debiased) score wins; in ``generate`` output each rotation's parsed choice is a vote, and ``pride``
    there means this vote over all N rotations (there are no label scores to debias).
    """

    def __init__(
        self,
        lm: LoadedModel,
        method: str = "dense",
        method_options: dict | None = None,
        candidate_kv: str = "judge_prefix",
        output: str = "label",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        debias: str = "none",
        permutations: int = 1,
        fetch: Fetch | None = None,
    ) -> None:
        check_mode(candidate_kv, output, max_new_tokens)
        check_debias(debias, output, permutations)
        self.debias, self.permutations = debias, int(permutations)
        self._tables: dict[PriorKey, PriorTable | None] = {}
        self._templates: dict[str, str] = {}
        self.lm = lm
        self.runner = KVRunner(lm.model, lm.model_id)
        self.runner.fetch = fetch  # e.g. the shared store's lookup: segments found there are not encoded
        max_pos = getattr(lm.model.config, "max_position_embeddings", None)
        self.engine = JudgeEngine(self.runner, max_pos, lm.tokenizer)
        self._methods: dict[str, JudgeMethod] = {}
        self.default = method
        self.candidate_kv, self.output, self.max_new_tokens = candidate_kv, output, int(max_new_tokens)
        self.method(method, **(method_options or {}))

    @property
    def model_id(self) -> str:
        return self.lm.model_id

    @property
    def device(self) -> str:
        return str(self.lm.device)

    @property
    def fetched(self) -> int:
        """Candidate segments found through ``fetch`` so far."""
        return self.runner.fetched

    def check_candidates(self, problem: str, n: int) -> str | None:
        """Why this judge cannot take ``n`` candidates (e.g. more than its single-token labels), or ``None``."""
        try:
            # the label limit does not depend on where candidate KV comes from: probe in the plainest mode
            self.case(problem, [f"candidate {i + 1}" for i in range(n)], candidate_kv="judge_prefix")
        except JudgeInputError as exc:
            return str(exc)
        return None

    def method(self, name: str, **options) -> JudgeMethod:
        """The (stateful) instance of method ``name``, created on first use."""
        if name not in self._methods or options:
            self._methods[name] = make_method(name, **options)
        return self._methods[name]

    def configure(self, options: dict[str, dict] | None) -> None:
        """Set methods' options, ``{method: {key: value}}`` (``--method-option METHOD.KEY=VALUE``)."""
        for name, opts in (options or {}).items():
            self.method(name, **opts)

    def check_priors(self, methods: Sequence[str], sizes: Sequence[int],
                     instances: dict[str, JudgeMethod] | None = None) -> None:
        """Before a batch of calls: every prior that ``methods`` will read for sets of these ``sizes``
        exists (else one line naming them all and the calibrate command), under this judge's modes.
        ``instances``: how a method will be configured when it runs, where that differs from :meth:`method`'s."""
        if self.debias == "none" or self.output != "label":
            return
        impls = {name: (instances or {}).get(name) or self.method(name) for name in methods}
        needed = list(dict.fromkeys(m for name, impl in impls.items() for m in needed_methods(name, impl)))
        for n in sorted({int(n) for n in sizes if int(n) > 1}):
            key = self.prior_key(self.debias, self.candidate_kv, self.output, n)
            priors_for(key, needed, self.prior_table(key))

    def adopt(self, name: str, impl: JudgeMethod) -> None:
        """Judge with ``impl`` when asked for method ``name`` (kept if ``name`` is taken: e.g. a gate's cheap
        path under its prior name, so ``kvjudge calibrate`` can judge it alone)."""
        self._methods.setdefault(name, impl)

    def case(
        self,
        problem: str,
        candidates: Sequence[CandidateLike],
        sources: Sequence[str] | None = None,
        candidate_kv: str | None = None,
        output: str | None = None,
        max_new_tokens: int | None = None,
        debias: str | None = None,
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
            self._check_agent_kv(cands, contexts, ids)
        prompt = build_prompt(tok, problem, texts, candidate_ids=ids, output=output)
        if mode == "isolated":
            contexts = tuple(() for _ in cands)
        self.engine.check_length(prompt)
        debias = debias or self.debias
        priors = None
        if debias != "none" and output == "label":  # every saved prior of this key (checked in judge())
            key = self.prior_key(debias, mode, output, prompt.n)
            priors = priors_for(key, (), self.prior_table(key))
        return JudgeCase(
            prompt, tuple(str(s) for s in sources), contexts=contexts, exact_first=mode == "judge_prefix",
            candidate_kv=mode, output=output, max_new_tokens=max_new, debias=debias, priors=priors,
        )

    def prior_key(self, kind: str, candidate_kv: str, output: str, n: int) -> PriorKey:
        """The key of this judge's slot prior of ``kind`` for ``n`` candidates in these modes."""
        if output not in self._templates:
            self._templates[output] = template_hash(self.lm.tokenizer, output)
        return PriorKey(self.lm.model_id, kind, candidate_kv, output, int(n), self._templates[output],
                        model_arg=getattr(self.lm, "spec", ""))

    def prior_table(self, key: PriorKey) -> PriorTable | None:
        """The saved prior table of ``key`` (read once; :meth:`reload_priors` forgets what was read)."""
        if key not in self._tables:
            self._tables[key] = load_table(key)
        return self._tables[key]

    def reload_priors(self) -> None:
        self._tables.clear()

    def use_priors(self, table: PriorTable) -> None:
        """Judge with ``table`` for its key from now on (e.g. priors estimated in this run, not saved)."""
        if table.key != self.prior_key(table.key.kind, table.key.candidate_kv, table.key.output, table.key.n):
            raise PriorError(f"slot prior for {table.key.describe()} does not fit this judge ({self.lm.model_id})")
        self._tables[table.key] = table

    def _agent_context(self, cand: Candidate, number: int) -> tuple[int, ...]:
        if cand.prompt_ids:
            return cand.prompt_ids
        if cand.agent_prompt:
            return tuple(agent_prompt_ids(self.lm.tokenizer, cand.agent_prompt))
        raise JudgeInputError(
            f"candidate {number} has no agent_prompt: candidate-KV mode 'agent' needs the prompt its agent "
            "answered (token ids or text)"
        )

    def _check_agent_kv(self, cands: Sequence[Candidate], contexts: Sequence[Sequence[int]],
                        ids: Sequence[Sequence[int]]) -> None:
        """One-line :class:`JudgeInputError` before any forward when a candidate's given ids are not
        this model's (outside its vocabulary, or not decoding to the candidate's text: the judge would
        read other tokens than the grader graded), or its agent prompt plus answer exceed the context."""
        emb = getattr(self.lm.model, "get_input_embeddings", lambda: None)()
        vocab = getattr(emb, "num_embeddings", None) or getattr(self.lm.model.config, "vocab_size", None)
        limit = self.engine.max_positions
        for i, (c, ctx, seq) in enumerate(zip(cands, contexts, ids), start=1):
            for name, given in (("token_ids", c.token_ids), ("prompt_ids", c.prompt_ids)):
                bad = [t for t in given or () if t < 0 or (vocab and t >= vocab)]
                if bad:
                    raise JudgeInputError(f"candidate {i}: {name} holds id {bad[0]}, outside the model's vocabulary "
                                          f"0..{(vocab or 0) - 1}")
            if c.token_ids:
                why = self._ids_mismatch(list(c.token_ids), c.text)
                if why:
                    raise JudgeInputError(f"candidate {i}: token_ids {why}")
            if limit and len(ctx) + len(seq) > limit:
                raise JudgeInputError(f"candidate {i}: its agent prompt ({len(ctx)} tokens) and answer ({len(seq)} "
                                      f"tokens) take {len(ctx) + len(seq)} positions, more than the model's {limit}")

    def _ids_mismatch(self, ids: list[int], text: str) -> str | None:
        """Why ``ids`` are not the tokens of ``text`` (``None``: they are). The agents' own rule is
        ``text = decode(ids, skip special).strip()``; on top of it special tokens may only end the ids
        (an end-of-text mark) and the ends may add at most :data:`ID_PADDING` characters of whitespace,
        so padding or tokens slipped in change nothing the judge reads that the grader did not grade."""
        tok = self.lm.tokenizer
        special = set(getattr(tok, "all_special_ids", ()) or ())
        body = list(ids)
        while body and body[-1] in special:
            body.pop()
        if any(t in special for t in body):
            return "hold a special token inside the answer (only a trailing end-of-text mark is allowed)"
        decoded = tok.decode(body)
        if decoded.strip() != text.strip():
            return "do not decode to its text (ids from another model or tokenizer, or an edited text)"
        if len(decoded) - len(decoded.strip()) > ID_PADDING:
            return (f"pad its text with {len(decoded) - len(decoded.strip())} characters of whitespace "
                    f"(at most {ID_PADDING})")
        return None

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
        debias: str | None = None,
        permutations: int | None = None,
    ) -> Verdict:
        """Judge ``candidates`` (display order) for ``problem``; ``sources`` name the agent of each.
        ``debias`` / ``permutations`` override the judge's for this call (see the class)."""
        debias, out_mode = debias or self.debias, output or self.output
        k = int(permutations or self.permutations)
        if debias == "pride" and out_mode == "generate" and k == 1:
            k = len(candidates)  # no label scores: pride is the vote over every rotation
        check_debias(debias, out_mode, k)
        k = min(k, len(candidates))
        if k > 1:
            return self._consensus(problem, candidates, method, sources, candidate_kv, output, max_new_tokens,
                                   debias, k)
        return self._once(problem, candidates, method, sources, candidate_kv, output, max_new_tokens, debias)

    def _once(self, problem: str, candidates: Sequence[CandidateLike], method: str | None,
              sources: Sequence[str] | None, candidate_kv: str | None, output: str | None,
              max_new_tokens: int | None, debias: str) -> Verdict:
        """One judge call in the given display order."""
        name = method or self.default
        impl = self.method(name)
        case = self.case(problem, candidates, sources, candidate_kv, output, max_new_tokens, debias)
        if case.priors is not None:  # every method this one reads must have its prior (one line naming calibrate)
            key = self.prior_key(case.debias, case.candidate_kv, case.output, case.prompt.n)
            case.priors = priors_for(key, needed_methods(name, impl), self.prior_table(key))
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
            debias=case.debias if case.priors is not None else "none",
        )

    def _consensus(self, problem: str, candidates: Sequence[CandidateLike], method: str | None,
                   sources: Sequence[str] | None, candidate_kv: str | None, output: str | None,
                   max_new_tokens: int | None, debias: str, k: int) -> Verdict:
        """Permutation consensus: judge rotations 0..k-1 (:func:`~kvjudge.judges.debias.rotation`) and
        combine them per candidate (in the given display order): summed label scores, argmax; in
        generate output the most voted candidate (ties: the earliest rotation's). Costs add up; with
        reuse each extra rotation is a re-index plus a suffix prefill."""
        if isinstance(candidates, str) or isinstance(sources, str):
            raise JudgeInputError("candidates and sources must be lists of strings, not one string")
        cands = as_candidates(candidates)
        n = len(cands)
        srcs = list(sources) if sources is not None else [c.source or f"candidate-{i + 1}" for i, c in enumerate(cands)]
        if len(srcs) != n:
            raise JudgeInputError(f"{len(srcs)} sources for {n} candidates")
        base = self.case(problem, cands, srcs, candidate_kv, output, max_new_tokens, "none")
        verdicts: list[Verdict] = []
        picks: list[int | None] = []  # per rotation: the winner as a 0-based index of the given order
        total = [0.0] * n
        for r in range(k):
            order = rotation(n, r)
            v = self._once(problem, [cands[i] for i in order], method, [srcs[i] for i in order], candidate_kv,
                           output, max_new_tokens, debias)
            verdicts.append(v)
            picks.append(None if v.winner is None else order[v.winner - 1])
            for slot, score in enumerate(v.scores):
                total[order[slot]] += score
        if base.output == "label":
            winner = max(range(n), key=lambda i: total[i]) + 1
        else:
            votes = {i: picks.count(i) for i in picks if i is not None}
            winner = (max(votes, key=lambda i: (votes[i], -picks.index(i))) + 1) if votes else None
        first = verdicts[0]
        gates = [v.gate for v in verdicts if v.gate is not None]
        decisions = [v.decision for v in verdicts]
        decision = None if all(d is None for d in decisions) else {
            **(first.decision or {}), "measured": any(bool((d or {}).get("measured")) for d in decisions),
            "rotations": decisions}
        prefilled = sum(v.prefilled_tokens for v in verdicts)
        consensus = {
            "permutations": k,
            "winners": [None if p is None else p + 1 for p in picks],
            "consistent": winner is not None and all(p == winner - 1 for p in picks),
            "agreement": sum(p == (winner or 0) - 1 for p in picks) / k,
            "cost_x_dense": prefilled / len(base.prompt.ids()),
        }
        return Verdict(
            method=first.method, winner=winner, scores=total if base.output == "label" else [],
            reused=all(v.reused for v in verdicts), latency_ms=sum(v.latency_ms for v in verdicts),
            prefilled_tokens=prefilled, encoded_tokens=sum(v.encoded_tokens for v in verdicts),
            decision=decision, gate=None if not gates else "fallback" if "fallback" in gates else "accepted",
            candidate_kv=first.candidate_kv, output=first.output, answer_text=first.answer_text,
            parse_rule=first.parse_rule, decoded_tokens=sum(v.decoded_tokens for v in verdicts),
            debias=first.debias if base.output == "label" else debias, consensus=consensus,
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
