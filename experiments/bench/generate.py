"""``kvjudge bench generate``: what batching buys an agent -- greedy generation throughput of a real
model per batch size (:meth:`~kvjudge.agents.generate.Generator.generate_batch`, ``new_tokens`` each,
no early stop; the best of ``repeats`` runs counts, after one warm-up)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from kvjudge.agents.base import GenRequest
from kvjudge.agents.generate import Generator
from kvjudge.models import LoadedModel

BENCH_PROMPTS = (
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers and say why they are prime.",
    "What is the capital of France? Answer and add one fact about it.",
    "Describe a cat to someone who has never seen one.",
    "Give a recipe for toast.",
    "Why do we sleep?",
    "Name the planets of the solar system in order.",
)


def bench_generation(model: LoadedModel | Generator, batch_sizes: Sequence[int] = (1, 4), new_tokens: int = 64,
                     prompts: Sequence[str] = BENCH_PROMPTS, repeats: int = 1) -> dict:
    """Greedy generation throughput per batch size.

    Returns ``{"batches": {B: {"seconds", "tokens", "tokens_per_s"}}, "speedup": {B: tok/s(B) / tok/s(first B)},
    "new_tokens", "threads", "device"}``.
    """
    gen = model if isinstance(model, Generator) else Generator(model)
    gen.generate_batch([GenRequest(prompts[0], 4, keep_kv=False)])  # warm-up
    rows: dict[int, dict] = {}
    for b in batch_sizes:
        reqs = [GenRequest(prompts[i % len(prompts)], new_tokens, keep_kv=False) for i in range(b)]
        best = None
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            outs = gen.generate_batch(reqs, ignore_eos=True)
            dt = time.perf_counter() - t0
            best = dt if best is None or dt < best else best
        n = sum(len(o.token_ids) for o in outs)
        rows[b] = {"seconds": best, "tokens": n, "tokens_per_s": n / best}
    base = rows[batch_sizes[0]]["tokens_per_s"]
    return {
        "batches": rows,
        "speedup": {b: r["tokens_per_s"] / base for b, r in rows.items()},
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "device": str(gen.lm.device),
    }
