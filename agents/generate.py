"""Answer generation for one agent turn, with the KV of what it wrote (pure torch, no Ray).

A turn yields the answer and ``agent_kv``: the answer tokens as the agent itself produced them,
sliced out of its own cache (keys rotated for positions ``len(prompt)..``), computed under the
agent's own prompt. :meth:`Generator.encode` is the generic other half: KV of given token ids
encoded after given context ids (the caller decides what, e.g. a judge's prompt prefix).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvjudge.cache.encoder import KVRunner
from kvjudge.cache.segments import KVSegment, from_cache
from kvjudge.models import LoadedModel


@dataclass
class Generation:
    """One agent turn: the answer text and tokens, throughput, and the answer's own KV."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    seconds: float
    agent_kv: KVSegment | None = None

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


class Generator:
    """Generates answers with a KV cache and encodes token ids after a context."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.runner = KVRunner(lm.model, lm.model_id)

    def prompt_ids(self, prompt: str) -> list[int]:
        tok = self.lm.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return list(tok(prompt)["input_ids"])

    @torch.inference_mode()
    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0) -> Generation:
        """Greedy when ``temperature == 0``, else seeded sampling; stops at EOS."""
        model, tok = self.lm.model, self.lm.tokenizer
        ids = self.prompt_ids(prompt)
        input_ids = torch.tensor([ids], device=self.lm.device)
        sample = temperature > 0
        # the model's own stop list (e.g. Llama-3: end_of_text, eom, eot), else the tokenizer's EOS
        eos = getattr(model.generation_config, "eos_token_id", None) or tok.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(stops), None)
        t0 = time.perf_counter()
        # sampling draws from a private copy of the RNG seeded by ``seed``: the caller's state is untouched
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices, enabled=sample):
            if sample:
                torch.manual_seed(seed)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_p=None,
                top_k=None,
                eos_token_id=eos,
                pad_token_id=pad,
                return_dict_in_generate=True,
            )
        seconds = time.perf_counter() - t0
        new = out.sequences[0, len(ids):].tolist()
        while new and new[-1] in stops:
            new = new[:-1]
        text = tok.decode(new, skip_special_tokens=True)
        kv = None
        cache = getattr(out, "past_key_values", None)
        if cache is not None and new:
            # the cache holds every token but the last generated one
            kept = min(len(new), cache.get_seq_length() - len(ids))
            if kept > 0:
                kv = from_cache(cache, len(ids), len(ids) + kept, tuple(new[:kept]))
        return Generation(text.strip(), new, len(ids), seconds, kv)

    def encode(self, context_ids: list[int], ids: list[int]) -> KVSegment:
        """KV ``[L, H, len(ids), D]`` of ``ids`` encoded right after ``context_ids`` (memoised)."""
        return self.runner.encode(context_ids, ids)
