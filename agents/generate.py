"""Answer generation for agent turns, batched, with the KV of what each agent wrote (pure torch, no Ray).

:meth:`Generator.generate_batch` runs several requests (prompts of different lengths, each with its
own ``max_new_tokens``, temperature and seed) through **one** ``model.generate`` call:

* prompts are left-padded; transformers derives position ids from the attention mask
  (``cumsum - 1``), so every row's real tokens sit at positions ``0..`` exactly as in a batch-1
  run, and the cached keys of a row need no re-indexing;
* greedy and sampled requests share the call: generation runs greedy and :class:`RowSampler`
  (a logits processor) replaces each sampled row's scores by a one-hot of a token drawn with
  that row's own ``torch.Generator`` seeded by the request's seed, so a request's tokens do not
  depend on its batch mates and the caller's global RNG is never touched;
* each row stops at its own ``max_new_tokens`` (:class:`RowBudget`) or at a stop token.

``agent_kv`` of a turn is the answer as the agent itself produced it: ``[L, H, T, D]`` for every
returned answer token (stop tokens stripped), keys rotated for positions ``len(prompt)..``,
computed under the agent's own prompt. ``generate`` leaves the last token's KV out of its cache;
one extra decode step of the batch's last tokens adds it (no prefill).

Agent prompts are untrusted text: :func:`kvjudge.models.chat.agent_prompt_ids` (shared with the
judge) wraps them in the chat template while encoding special-token strings inside them as plain
text, never as control tokens.
"""

from __future__ import annotations

import threading
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from kvjudge.agents.base import GenRequest, Generation  # torch-free home (the simulated agent shares them)
from kvjudge.cache.compat import cache_kwargs, output_cache
from kvjudge.cache.compress.registry import compress_segment
from kvjudge.cache.encoder import KVRunner
from kvjudge.cache.segments import KVSegment
from kvjudge.models import LoadedModel
from kvjudge.models.chat import agent_prompt_ids


class RowSampler(LogitsProcessor):
    """Per-row seeded temperature sampling inside a greedy ``generate``: each sampled row's scores
    ``[V]`` become a one-hot (0 at the drawn token, ``-inf`` elsewhere) so argmax picks the draw;
    rows with temperature 0 are left alone (greedy)."""

    def __init__(self, temperatures: list[float], seeds: list[int], device: torch.device) -> None:
        self.temperatures = temperatures
        self.generators = [
            torch.Generator(device=device).manual_seed(int(s)) if t > 0 else None
            for t, s in zip(temperatures, seeds)
        ]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, (t, gen) in enumerate(zip(self.temperatures, self.generators)):
            if gen is None:
                continue
            probs = torch.softmax(scores[row].float() / t, dim=-1)
            tok = torch.multinomial(probs, 1, generator=gen)
            scores[row] = float("-inf")
            scores[row, tok] = 0.0
        return scores


class RowBudget(StoppingCriteria):
    """Stops row ``b`` once it generated ``budgets[b]`` tokens (``input_ids`` ``[B, width + new]``)."""

    def __init__(self, width: int, budgets: list[int], device: torch.device) -> None:
        self.width = width
        self.budgets = torch.tensor(budgets, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return (input_ids.shape[1] - self.width) >= self.budgets


class Generator:
    """Generates answers with a KV cache (batched) and encodes token ids after a context
    (a :class:`~kvjudge.agents.base.GeneratorLike`)."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.runner = KVRunner(lm.model, lm.model_id)
        self._encode_lock = threading.Lock()  # the runner's memo is not thread-safe

    @property
    def model_id(self) -> str:
        return self.lm.model_id

    @property
    def max_positions(self) -> int | None:
        """The model's context length (``max_position_embeddings``; ``None`` when it declares none)."""
        return getattr(self.lm.model.config, "max_position_embeddings", None) or None

    def prompt_ids(self, prompt: str) -> list[int]:
        return agent_prompt_ids(self.lm.tokenizer, prompt)

    def _stops(self) -> tuple[set[int], int | list[int] | None, int | None]:
        model, tok = self.lm.model, self.lm.tokenizer
        # the model's own stop list (e.g. Llama-3: end_of_text, eom, eot), else the tokenizer's EOS
        eos = getattr(model.generation_config, "eos_token_id", None) or tok.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(stops), None)
        return stops, eos, pad

    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0) -> Generation:
        """One turn (a batch of one); see :meth:`generate_batch`."""
        return self.generate_batch([GenRequest(prompt, max_new_tokens, temperature, seed)])[0]

    @torch.inference_mode()
    def generate_batch(self, requests: list[GenRequest], ignore_eos: bool = False) -> list[Generation]:
        """Generate every request in one left-padded ``model.generate`` call; results in request order.

        ``ignore_eos`` suppresses stop tokens until every row wrote its ``max_new_tokens`` (benchmarks).
        """
        if not requests:
            return []
        model, tok, dev = self.lm.model, self.lm.tokenizer, self.lm.device
        prompts = [self.prompt_ids(r.prompt) for r in requests]
        budgets = [max(0, int(r.max_new_tokens)) for r in requests]
        stops, eos, pad = self._stops()
        width = max(len(p) for p in prompts)
        fill = pad if pad is not None else 0
        input_ids = torch.tensor([[fill] * (width - len(p)) + p for p in prompts], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
        t0 = time.perf_counter()
        sampler = RowSampler([float(r.temperature) for r in requests], [r.seed for r in requests], dev)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max(budgets) or 1,
            min_new_tokens=max(budgets) if ignore_eos else None,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=LogitsProcessorList([sampler]),
            stopping_criteria=StoppingCriteriaList([RowBudget(width, budgets, dev)]),
            eos_token_id=eos,
            pad_token_id=pad,
            return_dict_in_generate=True,
        )
        answers = [_answer(out.sequences[b, width:].tolist(), budgets[b], stops) for b in range(len(requests))]
        kvs: list[KVSegment | None] = [None] * len(requests)
        cache = output_cache(out)
        if cache is not None and any(r.keep_kv and a for r, a in zip(requests, answers)):
            cache = self._complete(out.sequences, mask, cache, answers)
            for b, (r, a) in enumerate(zip(requests, answers)):
                if r.keep_kv and a:
                    kvs[b] = _row_segment(cache, b, width, len(a), len(prompts[b]), a)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        return [
            Generation(tok.decode(a, skip_special_tokens=True).strip(), a, len(p), seconds, kv, p, len(requests))
            for a, p, kv in zip(answers, prompts, kvs)
        ]

    def _complete(self, sequences: torch.Tensor, mask: torch.Tensor, cache, answers: list[list[int]]):
        """The cache with the last column's KV too, when some row's answer reaches that column."""
        width = mask.shape[1]
        new = sequences.shape[1] - width
        if cache.get_seq_length() >= sequences.shape[1] or not any(len(a) == new for a in answers):
            return cache  # every answer's last token was fed back already
        full = torch.cat([mask, torch.ones(mask.shape[0], new, dtype=mask.dtype, device=mask.device)], dim=1)
        positions = (full.sum(dim=1, keepdim=True) - 1).long()
        out = self.lm.model(input_ids=sequences[:, -1:], attention_mask=full, position_ids=positions,
                            **cache_kwargs(self.lm.model, cache), use_cache=True, logits_to_keep=1)
        return output_cache(out)

    def encode(self, context_ids: list[int], ids: list[int]) -> KVSegment:
        """KV ``[L, H, len(ids), D]`` of ``ids`` encoded right after ``context_ids`` (memoised)."""
        with self._encode_lock:
            return self.runner.encode(context_ids, ids)

    def compress(self, segment: KVSegment, method: str, ratio: float, context_ids: list[int] | None) -> KVSegment:
        """``segment`` token-compressed by press ``method`` to ``ratio``; kept tokens keep their positions
        (``context_ids``: what it was encoded after, some presses score against it)."""
        with self._encode_lock:
            context = self.runner.context(context_ids) if context_ids else None
        return compress_segment(segment, self.lm.model, method, float(ratio), context=context)


def _answer(row: list[int], budget: int, stops: set[int]) -> list[int]:
    """Generated ids up to the first stop token (exclusive) and within ``budget``."""
    row = row[:budget]
    for i, t in enumerate(row):
        if t in stops:
            return row[:i]
    return row


def _row_segment(cache, row: int, width: int, n: int, prompt_len: int, ids: list[int]) -> KVSegment:
    """Answer columns ``width..width+n`` of batch row ``row`` (keys already at positions ``prompt_len..``)."""
    keys = torch.stack([layer.keys[row, :, width:width + n] for layer in cache.layers]).clone()
    values = torch.stack([layer.values[row, :, width:width + n] for layer in cache.layers]).clone()
    return KVSegment(keys, values, prompt_len, tuple(ids))
