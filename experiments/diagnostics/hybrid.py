"""Hybrid reuse: recompute k of the N candidates densely in place, reuse the rest.

The judge's cache is built piece by piece, left to right, in one ``DynamicCache``: the prefix KV,
then for each slot its block (the ``Candidate #k:`` glue before it, then the candidate): reused
(the cached, re-indexed KV appended as is) or recomputed (one forward of the block's ids against
everything already in the cache, i.e. in the judge's real context, as far as the blocks before it
are exact). Then the suffix is prefilled and the labels read. So k = 0 is naive reuse and k = N is
dense prefill (every block recomputed after an exact left context).

Which k blocks (choice rules): ``first`` / ``last`` (display order), ``random`` (a seeded draw per
call, nested in k), ``deviation`` (the k candidates whose reused keys deviate most from their real
ones in the first context-dependent layer, layer 1: a prefill of the whole prompt through layer 0
only, ~1/L of dense, CacheBlend's cheap probe; its cost is part of the rule's latency).

Latency ratio: time of (probe +) assembly + suffix over the time of one dense prefill of the same
prompt, with every cached piece already encoded (as a store provides them).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kvjudge.cache.compat import cache_kwargs
from kvjudge.cache.probe import attention_modules, fresh_keys
from kvjudge.cache.segments import to_cache
from kvjudge.experiments.diagnostics.common import Call, Progress, case_of, figure, label_scores, mean, save
from kvjudge.judges.base import JudgeCase
from kvjudge.judges.judge import Judge

RULES = ("first", "last", "random", "deviation")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def hybrid_logprobs(judge: Judge, case: JudgeCase, recompute: Sequence[int]) -> torch.Tensor:
    """Next-token log-probs ``[V]`` at the answer position with the blocks of slots ``recompute``
    (0-based) recomputed in place and every other piece reused."""
    model = judge.runner.model
    dev = judge.runner.device
    redo = set(int(s) for s in recompute)
    placed = judge.engine.pieces(case)
    ids = case.prompt.pieces()[:-1]  # same order as the placed pieces
    cache = to_cache([placed[0][2]], model.config)
    pos = placed[0][2].length
    for (kind, slot, seg), (_, _, piece_ids) in zip(placed[1:], ids[1:]):
        if slot in redo:
            model(input_ids=torch.tensor([list(piece_ids)], device=dev),
                  position_ids=torch.arange(pos, pos + len(piece_ids), device=dev).unsqueeze(0),
                  **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        else:
            for layer in range(seg.keys.shape[0]):
                cache.update(seg.keys[layer].unsqueeze(0), seg.values[layer].unsqueeze(0), layer)
        pos += len(piece_ids)
    suffix = case.prompt.suffix
    out = model(input_ids=torch.tensor([list(suffix)], device=dev),
                position_ids=torch.arange(pos, pos + len(suffix), device=dev).unsqueeze(0),
                **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    return torch.log_softmax(out.logits[0, -1].float(), dim=-1)


@torch.inference_mode()
def key_deviation(judge: Judge, case: JudgeCase) -> list[float]:
    """Per slot: mean over the candidate's tokens of ``||k_real - k_reused||`` (layer 1 keys, all KV heads,
    post-RoPE), ``k_real`` from a prefill of the whole prompt that stops before layer 1's attention."""
    model = judge.runner.model
    layer = 1 if len(attention_modules(model)) > 1 else 0
    real = fresh_keys(model, case.prompt.ids(), layer)  # [H_kv, T, D]
    devs = [0.0] * case.prompt.n
    for kind, slot, seg in judge.engine.pieces(case):
        if kind == "candidate":
            a, b = seg.start, seg.start + seg.length
            diff = real[:, a:b] - seg.keys[layer].float()  # [Hkv, n, D]
            devs[slot] = float(diff.transpose(0, 1).reshape(seg.length, -1).norm(dim=-1).mean())
    return devs


def choose(rule: str, k: int, n: int, deviation: Sequence[float] | None = None, seed: str = "") -> list[int]:
    """The ``k`` slots (0-based) of ``n`` that rule ``rule`` recomputes; nested in ``k`` for every rule."""
    if rule == "first":
        return list(range(k))
    if rule == "last":
        return list(range(n - k, n))
    if rule == "random":
        order = list(range(n))
        random.Random(f"hybrid:{seed}").shuffle(order)
        return sorted(order[:k])
    if rule == "deviation":
        if deviation is None:
            raise ValueError("the deviation rule needs the per-slot deviations")
        return sorted(sorted(range(n), key=lambda s: (-deviation[s], s))[:k])
    raise ValueError(f"unknown hybrid rule {rule!r}; known: {', '.join(RULES)}")


def _timed(fn, device: torch.device):
    _sync(device)
    t0 = time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.perf_counter() - t0


def hybrid_call(judge: Judge, call: Call, rules: Sequence[str] = RULES) -> dict:
    """Every (rule, k) on one call: winners, label deviations from dense, latency ratios."""
    case = case_of(judge, call)
    dev = judge.runner.device
    judge.engine.pieces(case)  # the store would hold every piece: not part of any latency
    labels = case.prompt.labels
    model = judge.runner.model
    ids = torch.tensor([case.prompt.ids()], device=dev)

    def dense_fn():
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return torch.log_softmax(out.logits[0, -1].float(), dim=-1)

    dense_fn()  # warm (first-call allocations out of the timing)
    dense_lp, dense_s = _timed(dense_fn, dev)
    dense_scores = label_scores(dense_lp, labels)
    deviation, probe_s = _timed(lambda: key_deviation(judge, case), dev)
    done: dict[tuple[int, ...], tuple[torch.Tensor, float]] = {}
    rows = []
    for rule in rules:
        for k in range(call.n + 1):
            slots = tuple(choose(rule, k, call.n, deviation, f"{call.seed}:{call.task_id}"))
            if slots not in done:
                lp, secs = _timed(lambda: hybrid_logprobs(judge, case, slots), dev)
                done[slots] = (label_scores(lp, labels), secs)
            scores, secs = done[slots]
            secs += probe_s if rule == "deviation" and 0 < k < call.n else 0.0
            winner = int(scores.argmax()) + 1
            rows.append({"task_id": call.task_id, "seed": call.seed, "rule": rule, "k": k, "n": call.n,
                         "slots": [s + 1 for s in slots], "winner": winner, "dense_winner": int(dense_scores.argmax()) + 1,
                         "max_score_dev": float((scores - dense_scores).abs().max()),
                         "latency_ratio": secs / dense_s if dense_s > 0 else None})
    return {"rows": rows, "deviation": [round(d, 6) for d in deviation], "dense_s": dense_s, "probe_s": probe_s}


def run_hybrid(judge: Judge, calls: list[Call], out: Path, rules: Sequence[str] = RULES,
               progress: Progress = None) -> dict:
    """JCR and latency ratio vs k for each choice rule; writes ``hybrid.png`` into ``out``."""
    rows, probes = [], []
    for call in calls:
        res = hybrid_call(judge, call, rules)
        rows += res["rows"]
        probes.append({"task_id": call.task_id, "seed": call.seed, "deviation": res["deviation"],
                       "probe_ratio": res["probe_s"] / res["dense_s"] if res["dense_s"] > 0 else None})
        if progress:
            progress(f"hybrid {call.task_id} seed {call.seed}")
    table: dict[str, dict[str, dict]] = {}
    for rule in rules:
        table[rule] = {}
        for k in sorted({r["k"] for r in rows}):
            sel = [r for r in rows if r["rule"] == rule and r["k"] == k]
            table[rule][str(k)] = {"jcr": mean([r["winner"] == r["dense_winner"] for r in sel]),
                                   "latency_ratio": mean([r["latency_ratio"] for r in sel]),
                                   "mean_score_dev": mean([r["max_score_dev"] for r in sel]), "calls": len(sel)}
    return {"kind": "hybrid", "rules": list(rules), "candidate_kv": judge.candidate_kv, "table": table,
            "probe_ratio": mean([p["probe_ratio"] for p in probes]), "probes": probes, "rows": rows,
            "figures": [plot_hybrid(table, out / "hybrid.png")]}


def plot_hybrid(table: dict, path: Path) -> str:
    fig = figure(10.0, 4.0)
    left, right = fig.subplots(1, 2)
    for rule, by_k in table.items():
        ks = sorted(int(k) for k in by_k)
        left.plot(ks, [100 * by_k[str(k)]["jcr"] for k in ks], marker="o", label=rule)
        right.plot([by_k[str(k)]["latency_ratio"] for k in ks], [100 * by_k[str(k)]["jcr"] for k in ks],
                   marker="o", label=rule)
    left.set_xticks(sorted({int(k) for by_k in table.values() for k in by_k}))
    left.set_xlabel("k candidates recomputed in place")
    left.set_ylabel("JCR vs dense (%)")
    right.set_xlabel("latency / dense prefill")
    right.set_ylabel("JCR vs dense (%)")
    for ax in (left, right):
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Hybrid: recompute k candidates densely, reuse the rest", fontsize=10)
    return save(fig, path)
