"""Partial recompute: naive reuse, with a few tokens of every reused piece recomputed in the judge's
real context (in the same forward as the suffix, :meth:`~kvjudge.cache.encoder.KVRunner.forward_partial`).

Two ways to choose the tokens, usable together (the union is recomputed):

* ``recompute_first: K`` (EPIC, Hu et al., ICML 2025): the first K tokens of every candidate block and
  glue piece. A piece cached away from the judge's context turns its first tokens into attention sinks;
  recomputing them restores the sink where the judge's prefix already has one.
* ``blend: R`` (CacheBlend, Yao et al., EuroSys 2025): the share R of the reused tokens (candidate blocks
  and glue pieces, everything after the exact prefix) whose layer-1 keys deviate most from their reused keys. The layer-1 keys of the real context come from a probe that
  runs the whole prompt through layer 0 only (:func:`kvjudge.cache.probe.fresh_keys`, ~1/L of dense,
  counted in ``decision["probe_tokens"]``). One departure from CacheBlend, said here: the chosen tokens
  are recomputed in every layer (CacheBlend keeps the probe's layer-0/1 KV for all tokens and recomputes
  the chosen ones from layer 2); the end points stay exact either way.

``K = 0`` and ``R = 0`` are naive reuse; K or R covering every token (after the exact prefix) is dense.
Token-compressed candidate KV is refused in one line (there is no full block to recompute in place).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvjudge.cache.probe import fresh_keys
from kvjudge.cache.segments import KVSegment
from kvjudge.judges.base import JudgeCase, Outcome
from kvjudge.judges.debias import prior_name
from kvjudge.judges.engine import JudgeEngine
from kvjudge.judges.prompt import JudgeInputError

PROBE_LAYER = 1  # the first layer whose keys depend on the context (CacheBlend's check layer)


@dataclass
class Partial:
    recompute_first: int = 16  # EPIC's default scale (k <= 32); 0 with blend 0 is naive
    blend: float = 0.0

    def __post_init__(self) -> None:
        if int(self.recompute_first) != self.recompute_first or self.recompute_first < 0:
            raise JudgeInputError(f"partial: recompute_first must be an integer >= 0, got {self.recompute_first}")
        if not 0.0 <= float(self.blend) <= 1.0:
            raise JudgeInputError(f"partial: blend must be a share in [0, 1], got {self.blend}")
        self.recompute_first, self.blend = int(self.recompute_first), float(self.blend)

    def redo(self, engine: JudgeEngine, case: JudgeCase) -> tuple[list[torch.Tensor], int]:
        """Per placed piece, the bool ``[len]`` mask of tokens to recompute, and the probe's token count."""
        placed = engine.pieces(case)
        if any(not isinstance(seg, KVSegment) for _, _, seg in placed):
            raise JudgeInputError("partial takes uncompressed candidate KV only (drop --compress)")
        masks = []
        for kind, _, seg in placed:
            m = torch.zeros(seg.length, dtype=torch.bool)
            if kind != "prefix":  # the prefix is encoded in its real context already
                m[: self.recompute_first] = True
            masks.append(m)
        probe = 0
        if self.blend > 0:
            cands = [i for i, (kind, _, _) in enumerate(placed) if kind != "prefix"]
            total = sum(placed[i][2].length for i in cands)
            take = min(total, math.ceil(self.blend * total))
            if take:
                ids = case.prompt.ids()[: sum(seg.length for _, _, seg in placed)]
                real = fresh_keys(engine.runner.model, ids, PROBE_LAYER)  # [H_kv, T, D]
                probe = len(ids)
                devs = []
                for i in cands:
                    seg = placed[i][2]
                    fresh = real[:, seg.start: seg.start + seg.length]
                    devs.append((fresh - seg.keys[PROBE_LAYER].float().to(fresh.device)).pow(2).sum(dim=(0, 2)).cpu())
                top = torch.topk(torch.cat(devs), take).indices
                chosen = torch.zeros(total, dtype=torch.bool)
                chosen[top] = True
                for i, part in zip(cands, torch.split(chosen, [placed[i][2].length for i in cands])):
                    masks[i] |= part
        return masks, probe

    def __call__(self, engine: JudgeEngine, case: JudgeCase) -> Outcome:
        masks, probe = self.redo(engine, case)
        out = engine.score_partial(case, masks, prior_name(self))
        recomputed = int(sum(int(m.sum()) for m in masks))
        reusable = int(sum(m.numel() for m in masks[1:]))
        out.decision = {"recomputed_tokens": recomputed, "reusable_tokens": reusable, "probe_tokens": probe}
        return out
