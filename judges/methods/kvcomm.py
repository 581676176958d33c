"""KVCOMM-style anchor correction for the judge (after Ye et al., NeurIPS 2025), as the reference runs it.

Each candidate's KV is the cached one re-indexed to its slot (:meth:`JudgeEngine.pieces`). Every
candidate whose KV deviates from its real context -- slots 2..N, and slot 1 too when the case says its
KV was not encoded after the judge prefix (``case.exact_first`` False) -- gets its own tokens
corrected; every candidate followed by a glue piece gets that glue corrected. With one candidate in
``judge_prefix`` mode nothing deviates and the method is exactly naive (== dense).

Anchors and reuse decisions are keyed by (source agent, content): the content key hashes the judge
prefix (which holds the problem, as the reference's ``message`` does), the context the candidate's KV
was encoded after (``case.context(slot)``) and the candidate's token ids, so it is the same under
every shuffle.

* the reuse decision is made once per key, the first time the content is judged: the entropy test
  of :meth:`AnchorPool.needs_anchor` against that agent's pool; its answer is kept for good;
* a call in which some flagged content ("becomes an anchor") has no anchor yet (never measured, or
  evicted since) runs one dense prefill, **answers from it** (``reused = False``,
  ``decision["measured"] = True``) and (re)measures every flagged candidate of the prompt: the deltas
  ``real - cached`` of its tokens and of the glue after it, stored in its agent's pool (an existing
  anchor is updated in place);
* otherwise it adds the anchor-weighted deltas (layer 0 untouched) and prefills only the suffix
  (``reused = True``, ``decision["measured"] = False``).

``pool_by`` picks the anchors a correction draws from (the decision always uses the agent's own pool):
``source`` (KVCOMM: the candidate's agent), ``all`` (every agent's anchors: PAL-KV, the judge fork's
``KVCOMM_GROUP_JUDGE_ANCHORS=1``) or ``slot`` (every agent's anchors last measured at the candidate's
display slot: the fork's ``..._BY_POSITION=1``). Pools live across calls, so anchors measured on one
problem correct the next. The arithmetic and its mapping to the reference are in :mod:`kvjudge.cache.anchors`.

A token-compressed candidate (store compression) is corrected like any other, on the entries it kept,
each at its own position: its decision, its correction and an anchor measured on it use only the
(layer, head, token) entries it holds (point 8 of :mod:`kvjudge.cache.anchors`); the glue after it is
corrected whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from kvjudge.cache.anchors import Anchor, AnchorConfig, AnchorPool, apply, correction, frame0, to_frame0
from kvjudge.cache.encoder import segment_key
from kvjudge.cache.segments import AnySegment, KVSegment
from kvjudge.judges.base import JudgeCase, Outcome
from kvjudge.judges.debias import prior_name
from kvjudge.judges.engine import JudgeEngine

POOL_BY = ("source", "all", "slot")


@dataclass
class _Item:
    """One candidate to correct: where it sits, whose it is, its frame-0 cached KV ``[L, H, n, D]`` (and,
    compressed, the mask ``[L, H, n]`` of the entries it kept)."""

    index: int  # in the pieces list
    slot: int
    agent: str
    key: str
    base_k: torch.Tensor
    base_v: torch.Tensor
    own: bool  # its own tokens deviate (else only the glue after it is corrected)
    glue: KVSegment | None
    mask: torch.Tensor | None = None  # kept entries of a compressed candidate (None: all)


@dataclass
class KVCOMM(AnchorConfig):
    pool_by: str = "source"
    pools: dict = field(default_factory=dict, init=False, repr=False)  # agent -> AnchorPool
    decisions: dict = field(default_factory=dict, init=False, repr=False)  # (agent, key) -> becomes an anchor

    def __post_init__(self) -> None:
        if self.pool_by not in POOL_BY:
            raise TypeError(f"pool_by must be one of {', '.join(POOL_BY)}, not {self.pool_by!r}")
        checks = {
            "tau": self.tau > 0, "window": self.window >= 1, "max_anchors": self.max_anchors >= 1,
            "top_p": 0 < self.top_p <= 1, "gamma": self.gamma >= 0, "min_anchors": self.min_anchors >= 1,
        }
        bad = [f"{k}={getattr(self, k)!r}" for k, ok in checks.items() if not ok]
        if bad:
            raise TypeError(f"out of range: {', '.join(bad)} (need tau>0, window>=1, max_anchors>=1, "
                            "0<top_p<=1, gamma>=0, min_anchors>=1)")

    def pool(self, agent: str) -> AnchorPool:
        """The anchor pool of one source agent (created empty on first use)."""
        if agent not in self.pools:
            self.pools[agent] = AnchorPool(**vars(self.anchor_config()))
        return self.pools[agent]

    def anchors_for(self, item: _Item) -> list[Anchor]:
        """The anchors a correction of ``item`` draws from, per ``pool_by``."""
        if self.pool_by == "source":
            return list(self.pool(item.agent).anchors)
        every = [a for agent in sorted(self.pools) for a in self.pools[agent].anchors]
        return every if self.pool_by == "all" else [a for a in every if a.slot == item.slot]

    def items(self, engine: JudgeEngine, case: JudgeCase) -> tuple[list[AnySegment], list[_Item]]:
        """The placed pieces and the candidates among them that need a correction."""
        inv = engine.runner.inv_freq
        pieces = engine.pieces(case)
        segs = [seg for _, _, seg in pieces]
        exact_first = getattr(case, "exact_first", True)
        prefix = tuple(case.prompt.prefix)
        out = []
        for i, (kind, slot, seg) in enumerate(pieces):
            if kind != "candidate":
                continue
            glue = segs[i + 1] if i + 1 < len(pieces) and pieces[i + 1][0] == "glue" else None
            own = slot > 0 or not exact_first
            if not own and glue is None:
                continue
            agent = case.sources[slot]
            # the content's identity: its tokens, what its KV was encoded after, the problem (prefix)
            key = segment_key(f"anchor:{agent}", prefix + tuple(case.context(slot)), case.prompt.candidates[slot])
            bk, bv, mask = frame0(seg, inv)
            out.append(_Item(i, slot, agent, key, bk, bv, own, glue, mask))
        return segs, out

    def __call__(self, engine: JudgeEngine, case: JudgeCase) -> Outcome:
        inv = engine.runner.inv_freq
        segs, items = self.items(engine, case)
        for it in items:  # the reuse decision: once per (agent, content), kept for good
            if (it.agent, it.key) not in self.decisions:
                self.decisions[(it.agent, it.key)] = self.pool(it.agent).needs_anchor(it.base_v, it.mask)
        flagged = [it for it in items if self.decisions[(it.agent, it.key)]]
        missing = [it for it in flagged if self.pool(it.agent).get(it.key) is None]
        if missing:
            outcome, real = engine.dense(case, keep_cache=True)
            for it in flagged:
                self.pool(it.agent).add(self._measure(it, segs[it.index], real, inv))
            decision = {"measured": True, "new_anchors": len(missing), "updated_anchors": len(flagged) - len(missing)}
            return replace(outcome, reused=False, decision=decision)  # a copy: dense's memo stays as it is
        for it in items:
            corr = correction(self.anchors_for(it), it.base_k, it.base_v,
                              it.glue.length if it.glue is not None else None, self.tau, it.mask)
            if corr is None:
                continue
            if it.own:
                segs[it.index] = apply(segs[it.index], corr.dk, corr.dv, inv)
            if corr.glue_dk is not None:
                segs[it.index + 1] = apply(segs[it.index + 1], corr.glue_dk, corr.glue_dv, inv)
        outcome = engine.score_pieces(case, segs, prior_name(self))  # its slot prior (pal_kv too)
        return replace(outcome, decision={"measured": False, "new_anchors": 0, "updated_anchors": 0})

    @staticmethod
    def _measure(it: _Item, seg: AnySegment, real: KVSegment, inv: torch.Tensor) -> Anchor:
        """The deltas ``real - cached`` of the candidate (its kept entries only, when compressed: zero
        elsewhere, ``Anchor.mask`` says which) and of its glue, frame 0, in the model's dtype."""
        dt = seg.keys.dtype  # anchors are stored in the model's dtype (bf16 on GPU), used in fp32
        rk, rv = to_frame0(real.slice(seg.start, seg.start + seg.length), inv)
        dk, dv = rk - it.base_k, rv - it.base_v
        if it.mask is not None:
            dk, dv = dk * it.mask.unsqueeze(-1), dv * it.mask.unsqueeze(-1)
        anchor = Anchor(it.key, it.slot, it.base_k.to(dt), it.base_v.to(dt), dk.to(dt), dv.to(dt), mask=it.mask)
        if it.glue is not None:
            g = it.glue
            gk, gv = to_frame0(real.slice(g.start, g.start + g.length), inv)
            bk, bv = to_frame0(g, inv)
            anchor.glue_dk, anchor.glue_dv = (gk - bk).to(dt), (gv - bv).to(dt)
        return anchor
