"""The judge's tensor engine: dense scoring and naive assembly of a :class:`JudgeCase` on a :class:`KVRunner`.

Both entry points that answer (:meth:`JudgeEngine.dense` and :meth:`JudgeEngine.score_pieces`)
dispatch on ``case.output``: ``"label"`` reads the label log-probs at the last prompt position;
``"generate"`` decodes greedily on the very cache the method assembled (dense: the whole prompt's;
reuse: the placed pieces + the prefilled suffix) and parses the chosen number from the text
(:func:`kvjudge.judges.parse.parse_choice`). So every method, whatever KV it builds, answers in
either mode, and its decode steps run on its own (reused) cache.
"""

from __future__ import annotations

import torch

from kvjudge.cache.compat import cache_kwargs
from kvjudge.cache.encoder import KVRunner
from kvjudge.cache.segments import KVSegment, place, to_cache
from kvjudge.judges.base import JudgeCase, Outcome
from kvjudge.judges.debias import case_prior
from kvjudge.judges.parse import parse_choice
from kvjudge.judges.prompt import JudgeInputError, JudgePrompt


def stop_ids(model: torch.nn.Module, tokenizer) -> frozenset[int]:
    """The model's own end-of-turn ids (``generation_config.eos_token_id``), else the tokenizer's EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return frozenset(t for t in (eos if isinstance(eos, (list, tuple)) else [eos]) if t is not None)


class JudgeEngine:
    """Dense scoring and naive assembly of a :class:`JudgeCase` on one :class:`KVRunner`.

    ``decoded_tokens`` counts the tokens generated in ``generate`` output (one forward each, not
    counted in the runner's ``forward_tokens``).
    """

    def __init__(self, runner: KVRunner, max_positions: int | None = None, tokenizer=None) -> None:
        self.runner = runner
        self.max_positions = max_positions
        self.tokenizer = tokenizer
        self.stops = stop_ids(runner.model, tokenizer)
        self.decoded_tokens = 0

    def check_length(self, prompt: JudgePrompt) -> None:
        total = len(prompt.ids())
        if self.max_positions and total > self.max_positions:
            raise JudgeInputError(
                f"judge prompt has {total} tokens, more than the model's {self.max_positions} positions"
            )

    def _scores(self, logprobs: torch.Tensor, prompt: JudgePrompt) -> torch.Tensor:
        return logprobs[list(prompt.labels)].cpu()

    def _answer(self, case: JudgeCase, logprobs: torch.Tensor, kv: KVSegment | None, reused: bool,
                method: str | None = None) -> Outcome:
        """The outcome of a prompt whose last-position log-probs are ``logprobs`` and whose whole KV
        (from position 0) is ``kv`` (needed in generate output only). With ``case.debias`` set, the label
        scores ``[N]`` are ``log p - log prior`` of ``method`` (the one place scores are debiased)."""
        if case.output != "generate":
            scores = self._scores(logprobs, case.prompt)
            prior = case_prior(case, method)
            if prior is not None:
                scores = scores - torch.tensor(prior, dtype=scores.dtype)
            return Outcome(scores, reused)
        ids = self._decode(logprobs, kv, case.max_new_tokens)
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        choice, rule = parse_choice(text, case.prompt.n)
        return Outcome(torch.empty(0), reused, text=text, choice=choice, parse_rule=rule)

    @torch.inference_mode()
    def _decode(self, logprobs: torch.Tensor, kv: KVSegment, max_new_tokens: int) -> list[int]:
        """Greedy decoding after the prompt held by ``kv`` (``[L, H, T, D]`` from position 0), whose
        next-token log-probs ``[V]`` are ``logprobs``; stops at an end-of-turn id (not returned).
        ``kv`` is left untouched (the cache appends new tensors)."""
        model = self.runner.model
        cache = to_cache(kv, model.config)
        pos, dev = kv.length, self.runner.device
        limit = max_new_tokens if not self.max_positions else min(max_new_tokens, self.max_positions - pos)
        out: list[int] = []
        tok = int(logprobs.argmax())
        while tok not in self.stops and len(out) < limit:
            out.append(tok)
            self.decoded_tokens += 1
            if len(out) == limit:
                break
            logits = model(
                input_ids=torch.tensor([[tok]], device=dev),
                position_ids=torch.tensor([[pos]], device=dev),
                **cache_kwargs(model, cache),
                use_cache=True,
                logits_to_keep=1,
            ).logits
            pos += 1
            tok = int(logits[0, -1].argmax())
        return out

    def dense(self, case: JudgeCase, keep_cache: bool = False) -> tuple[Outcome, KVSegment | None]:
        """Full prefill of the whole prompt (memoised per case; ``keep_cache`` also returns its KV). Its
        label scores are debiased with ``dense``'s prior, whichever method asked for them."""
        hit = case.memo.get("dense")
        if hit is not None and (hit[1] is not None or not keep_cache):
            return hit
        ids = case.prompt.ids()
        generate = case.output == "generate"
        logprobs, kv = self.runner.forward(ids, keep_cache=keep_cache or generate)
        # generate output computed the KV anyway: keep it, so a later keep_cache call decodes nothing again
        result = (self._answer(case, logprobs, kv, reused=False, method="dense"), kv if keep_cache or generate else None)
        case.memo["dense"] = result
        return result

    def pieces(self, case: JudgeCase) -> list[tuple[str, int, KVSegment]]:
        """Prefix KV + every glue piece (encoded after the prefix) + every candidate piece (encoded
        after ``case.context(slot)``: the prefix, the agent's prompt, or nothing), all cached and
        placed back to back from position 0. ``(kind, slot, segment)``, slot 0-based."""
        if "pieces" in case.memo:  # DG-JKR's two methods share one placement
            return list(case.memo["pieces"])
        prompt = case.prompt
        kinds, segs = [], []
        for kind, slot, ids in prompt.pieces()[:-1]:
            if kind == "prefix":
                seg = self.runner.context(ids)
            elif kind == "glue":
                seg = self.runner.encode(prompt.prefix, ids)
            else:
                seg = self.runner.encode(case.context(slot), ids, keep_context=False)  # a prompt used once
            kinds.append((kind, slot))
            segs.append(seg)
        placed = place(segs, self.runner.inv_freq)
        case.memo["pieces"] = [(kind, slot, seg) for (kind, slot), seg in zip(kinds, placed)]
        return list(case.memo["pieces"])

    def score_partial(self, case: JudgeCase, redo: list[torch.Tensor], method: str | None = None) -> Outcome:
        """Like :meth:`score_pieces` on :meth:`pieces`, with the tokens ``redo[i]`` (bool ``[len]`` per
        placed piece, in piece order) recomputed in the judge's real context in the suffix's forward."""
        generate = case.output == "generate"
        segs = [seg for _, _, seg in self.pieces(case)]
        logprobs, kv = self.runner.forward_partial(segs, redo, case.prompt.suffix, keep_cache=generate)
        return self._answer(case, logprobs, kv, reused=True, method=method)

    def score_pieces(self, case: JudgeCase, segs: list[KVSegment], method: str | None = None) -> Outcome:
        """Prefill only the suffix against the assembled pieces and answer (labels, or decode on that cache).
        ``method``: the caller's registered name, whose slot prior debiases the labels (``case.debias``)."""
        generate = case.output == "generate"
        logprobs, kv = self.runner.forward(case.prompt.suffix, past=segs, keep_cache=generate)
        return self._answer(case, logprobs, kv, reused=True, method=method)
