"""Where the judge looks when it answers: attention mass at the answer position, per candidate slot.

The answer position is the suffix's last token (its next token is the label). Only that one row of
attention is read, per layer: a forward hook on every attention module takes the layer's input
``hidden_states[-1]``, projects it to the query (``q_proj``, ``q_norm`` when the model has one),
rotates it with the layer's own ``position_embeddings`` (RoPE, post-rotation like the cached keys)
and computes ``softmax(q . K^T * scaling)`` against the layer's whole cache after the forward
(reused or dense keys, plus the suffix's own), ``repeat_kv`` for GQA. Memory: ``[Hq, T]`` per
layer; no attention matrix of the whole prompt exists at any time, and the model's own attention
implementation (sdpa, flash) is untouched.

Mass is summed over the tokens of each region (slot 1..N, and the rest of the prompt: prefix, glue
pieces, suffix), so per layer and head the regions sum to 1; it is then averaged over heads (per
layer) and over layers. Reuse methods are read on the very cache they assembled (a recording
wrapper around the judge's engine keeps what a method handed to ``score_pieces``); a call a method
answered from a dense prefill (KVCOMM measuring a new anchor) shows dense's attention and is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from kvjudge.cache.compat import cache_kwargs, hook_cache
from kvjudge.cache.probe import attention_modules
from kvjudge.cache.segments import KVSegment, rotate_half, to_cache
from kvjudge.experiments.diagnostics.common import (
    Call, Progress, case_of, figure, mean, run_method, save, truncated, validate_methods,
)
from kvjudge.judges.base import JudgeCase, Outcome
from kvjudge.judges.judge import Judge
from kvjudge.judges.prompt import JudgePrompt

REUSE_METHODS = ("naive", "kvcomm", "pal_kv")  # methods that answer from one assembled cache
REST = ("prefix", "glue", "suffix")


def _row(module: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         keys: torch.Tensor) -> torch.Tensor:
    """Attention probabilities ``[Hq, T]`` of the last position. ``hidden`` ``[1, S, E]`` is the layer's
    input, ``cos``/``sin`` ``[1, S, D]`` its RoPE tables, ``keys`` ``[1, Hkv, T, D]`` the whole cache."""
    D = keys.shape[-1]
    q = module.q_proj(hidden[:, -1:]).view(1, 1, -1, D)  # [1, 1, Hq, D]
    if getattr(module, "q_norm", None) is not None:  # Qwen3-style per-head query norm
        q = module.q_norm(q)
    q = q.transpose(1, 2).float()  # [1, Hq, 1, D]
    c, s = cos[:, -1:].unsqueeze(1).float(), sin[:, -1:].unsqueeze(1).float()
    q = q * c + rotate_half(q) * s
    k = keys.float().repeat_interleave(q.shape[1] // keys.shape[1], dim=1)  # repeat_kv: [1, Hq, T, D]
    logits = (q @ k.transpose(-1, -2))[0, :, 0] * float(module.scaling)  # [Hq, T]
    return torch.softmax(logits, dim=-1)


@contextmanager
def answer_rows(model: torch.nn.Module):
    """Within the block, every forward fills ``rows[layer]`` with the last position's attention
    ``[Hq, T]`` (T: cache length after the forward). Needs ``use_cache=True`` (the hook reads the cache)."""
    rows: dict[int, torch.Tensor] = {}

    def hook(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        cache = hook_cache(kwargs)  # transformers internals: `cache` from 5.24, `past_key_values` before
        if cache is None:
            raise ValueError("answer attention needs a KV cache in the forward (use_cache=True)")
        rows[module.layer_idx] = _row(module, hidden, cos, sin, cache.layers[module.layer_idx].keys).cpu()

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def answer_attention(model: torch.nn.Module, ids: Sequence[int],
                     past: list[KVSegment] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``ids`` after ``past`` (placed back to back from 0); return the last position's next-token
    log-probs ``[V]`` and its attention ``[L, Hq, T]`` over every position (past + ids)."""
    dev = next(model.parameters()).device
    start = sum(s.length for s in past) if past else 0
    cache = to_cache(past, model.config) if past else None
    with answer_rows(model) as rows:
        out = model(input_ids=torch.tensor([list(ids)], device=dev),
                    position_ids=torch.arange(start, start + len(ids), device=dev).unsqueeze(0),
                    **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    attn = torch.stack([rows[i] for i in sorted(rows)])
    return torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu(), attn


def region_names(n: int) -> list[str]:
    return [f"slot {k}" for k in range(1, n + 1)] + list(REST)


def region_index(prompt: JudgePrompt) -> torch.Tensor:
    """Region number ``[T]`` of every prompt position: slot k -> k-1, then prefix, glue, suffix."""
    n = prompt.n
    rest = {name: n + i for i, name in enumerate(REST)}
    idx = []
    for kind, slot, ids in prompt.pieces():
        idx += [slot if kind == "candidate" else rest[kind]] * len(ids)
    return torch.tensor(idx)


def region_mass(attn: torch.Tensor, prompt: JudgePrompt) -> torch.Tensor:
    """Attention mass per region ``[L, Hq, R]`` (R = N slots + prefix, glue, suffix) of ``attn`` ``[L, Hq, T]``."""
    idx = region_index(prompt)
    if idx.numel() != attn.shape[-1]:
        raise ValueError(f"attention over {attn.shape[-1]} positions for a {idx.numel()}-token prompt")
    onehot = torch.nn.functional.one_hot(idx, prompt.n + len(REST)).to(attn.dtype)  # [T, R]
    return attn @ onehot


class _Recorder:
    """The judge's engine, keeping the pieces a method hands to ``score_pieces`` (its assembled cache)."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.assembled: list[KVSegment] | None = None

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def score_pieces(self, case: JudgeCase, segs: list[KVSegment], method: str | None = None) -> Outcome:
        self.assembled = list(segs)
        return self._engine.score_pieces(case, segs, method)


def method_attention(judge: Judge, case: JudgeCase, method: str) -> tuple[torch.Tensor, Outcome, bool]:
    """``(attention [L, Hq, T], outcome, from_dense)`` of ``method`` on ``case``: read on the cache the
    method answered from (dense's when it answered from a dense prefill)."""
    model = judge.runner.model
    if method == "dense":
        _, attn = answer_attention(model, case.prompt.ids())
        return attn, run_method(judge, case, "dense"), True
    rec = _Recorder(judge.engine)
    outcome = judge.method(method)(rec, case)
    if rec.assembled is None or not outcome.reused:
        _, attn = answer_attention(model, case.prompt.ids())
        return attn, outcome, True
    _, attn = answer_attention(model, case.prompt.suffix, past=rec.assembled)
    return attn, outcome, False


def _summary(per_call: list[dict], methods: list[str], n: int) -> dict:
    """Pooled mass per method (``layers`` ``[L, R]``, ``all_layers`` ``[R]``), slot shares and ratios to dense."""
    pooled: dict[str, dict] = {}
    for m in methods:
        mats = [torch.tensor(c["methods"][m]["layers"]) for c in per_call]
        layers = torch.stack(mats).mean(0)  # [L, R]
        allv = layers.mean(0)
        slots = allv[:n]
        per_layer = layers[:, :n] / layers[:, :n].sum(1, keepdim=True)  # [L, N] slot shares per layer
        pooled[m] = {"layers": [truncated(r) for r in layers.tolist()], "all_layers": truncated(allv.tolist()),
                     "layer_slot_share": [truncated(r) for r in per_layer.tolist()],
                     "slot_share": truncated((slots / slots.sum()).tolist()),
                     "candidate_mass": round(float(slots.sum()), 6), "rest_mass": round(float(allv[n:].sum()), 6),
                     "answered_from_dense": sum(c["methods"][m]["from_dense"] for c in per_call)}
    dense = pooled["dense"]
    for m in methods:
        if m == "dense":
            continue
        share, ref = pooled[m]["slot_share"], dense["slot_share"]
        pooled[m]["share_ratio_to_dense"] = truncated([s / r if r > 0 else float("nan") for s, r in zip(share, ref)])
        pooled[m]["mass_ratio_to_dense"] = truncated(
            [s / r if r > 0 else float("nan") for s, r in zip(pooled[m]["all_layers"][:n], dense["all_layers"][:n])])
        # share of the candidate attention that sits on another slot than under dense (total variation)
        pooled[m]["moved_share"] = round(0.5 * sum(abs(s - r) for s, r in zip(share, ref)), 6)
        pooled[m]["jcr"] = mean([c["methods"][m]["winner"] == c["methods"]["dense"]["winner"] for c in per_call])
    return pooled


def run_attention(judge: Judge, calls: list[Call], methods: Sequence[str], out: Path,
                  progress: Progress = None) -> dict:
    """Answer-position attention of dense and each reuse method on every call; writes
    ``attention.json``, ``attention_heatmap.png`` and ``attention_slots.png`` into ``out``."""
    methods = ["dense"] + validate_methods(methods, REUSE_METHODS)
    per_call = []
    for call in calls:
        case = case_of(judge, call)
        row = {"task_id": call.task_id, "seed": call.seed, "n": call.n, "perm": call.perm, "methods": {}}
        for m in methods:
            attn, outcome, from_dense = method_attention(judge, case, m)
            mass = region_mass(attn, case.prompt)  # [L, Hq, R]
            row["methods"][m] = {"layers": [truncated(r) for r in mass.mean(1).tolist()], "winner": outcome.winner,
                                 "from_dense": from_dense and m != "dense"}
        per_call.append(row)
        if progress:
            progress(f"attention {call.task_id} seed {call.seed}")
    groups: dict[int, list[dict]] = {}
    for c in per_call:
        groups.setdefault(c["n"], []).append(c)
    pooled = {str(n): _summary(cs, methods, n) for n, cs in sorted(groups.items())}
    main_n = max(groups, key=lambda k: len(groups[k]))
    result = {"kind": "attention", "methods": methods, "regions": {str(n): region_names(n) for n in groups},
              "main_n": main_n, "pooled": pooled, "calls": per_call,
              "figures": [plot_heatmap(pooled[str(main_n)], methods, main_n, out / "attention_heatmap.png"),
                          plot_slots(pooled[str(main_n)], methods, main_n, out / "attention_slots.png")]}
    return result


def plot_heatmap(pooled: dict, methods: list[str], n: int, path: Path) -> str:
    """Layers x slots heat map of each layer's candidate attention split over the slots (pooled share;
    the rest of the prompt is left out so that the slots' pattern is visible), one panel per method."""
    fig = figure(2.6 * len(methods) + 1.2, 4.6)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, len(methods), squeeze=False, sharey=True)[0]
    top = max(max(max(r) for r in pooled[m]["layer_slot_share"]) for m in methods)
    for ax, m in zip(axes, methods):
        grid = pooled[m]["layer_slot_share"]
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=top)
        ax.set_xticks(range(n))
        ax.set_xticklabels([str(k) for k in range(1, n + 1)], fontsize=8)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("candidate slot", fontsize=8)
        step = max(1, len(grid) // 8)
        ax.set_yticks(range(0, len(grid), step))
    axes[0].set_ylabel("layer", fontsize=8)
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="share of the candidate attention")
    fig.suptitle("Answer-position attention over candidate slots (mean over heads, calls)", fontsize=10)
    fig.savefig(path)
    return path.name


def plot_slots(pooled: dict, methods: list[str], n: int, path: Path) -> str:
    """Grouped bars: mass per slot (mean over layers and heads) per method."""
    fig = figure(6.4, 4.0)
    ax = fig.subplots()
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = pooled[m]["all_layers"][:n]
        ax.bar([k + (i - (len(methods) - 1) / 2) * w for k in range(n)], vals, width=w, label=m)
    ax.set_xticks(range(n))
    ax.set_xticklabels([f"slot {k}" for k in range(1, n + 1)])
    ax.set_ylabel("attention mass (mean over layers, heads)")
    ax.set_title("Answer-position attention per candidate slot", fontsize=10)
    ax.legend(fontsize=8)
    return save(fig, path)
