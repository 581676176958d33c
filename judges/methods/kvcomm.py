"""KVCOMM-style anchor correction for the judge (after Ye et al., NeurIPS 2025).

Each candidate's KV is the naive one (encoded alone after the judge prefix, re-indexed to its slot).
For every candidate followed by a glue piece, and for every candidate in slots 2..N, the method asks
the candidate's anchor pool whether it can estimate the deviation. Slot 1's own tokens are never
corrected: their encoding context *is* their real context, so with one candidate the method is
exactly naive (== dense); only the glue after slot 1 is.

* if any candidate needs a new anchor (too few anchors, or the entropy test of
  :mod:`kvjudge.cache.anchors` says no anchor is clearly close), it runs one dense prefill, answers
  from it (``reused = False``) and stores, for every such candidate, the measured deltas
  ``real - naive`` of its tokens and of the glue piece after it;
* otherwise it adds the anchor-weighted deltas to keys and values (layer 0 untouched) and prefills
  only the suffix (``reused = True``).

Pools are kept per source agent (``pool_by="source"``, KVCOMM's per-agent anchors) and live across
calls, so anchors measured on one problem correct the next. The exact approximation is documented
in :mod:`kvjudge.cache.anchors`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvjudge.cache.anchors import Anchor, AnchorConfig, AnchorPool, apply, to_frame0
from kvjudge.cache.encoder import segment_key
from kvjudge.judges.base import JudgeCase, Outcome
from kvjudge.judges.engine import JudgeEngine


@dataclass
class KVCOMM(AnchorConfig):
    pool_by: str = "source"
    pools: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.pool_by not in ("source", "slot", "shared"):
            raise TypeError(f"pool_by must be source, slot or shared, not {self.pool_by!r}")
        checks = {
            "tau": self.tau > 0, "window": self.window >= 1, "max_anchors": self.max_anchors >= 1,
            "top_p": 0 < self.top_p <= 1, "gamma": self.gamma >= 0, "min_anchors": self.min_anchors >= 1,
            "probe_tokens": self.probe_tokens >= 1,
        }
        bad = [f"{k}={getattr(self, k)!r}" for k, ok in checks.items() if not ok]
        if bad:
            raise TypeError(f"out of range: {', '.join(bad)} (need tau>0, window>=1, max_anchors>=1, "
                            "0<top_p<=1, gamma>=0, min_anchors>=1, probe_tokens>=1)")

    def pool(self, case: JudgeCase, slot: int) -> AnchorPool:
        key = {"source": lambda: case.sources[slot], "slot": lambda: slot, "shared": lambda: None}[self.pool_by]()
        if key not in self.pools:
            self.pools[key] = AnchorPool(**vars(self.anchor_config()))
        return self.pools[key]

    def __call__(self, engine: JudgeEngine, case: JudgeCase) -> Outcome:
        inv = engine.runner.inv_freq
        pieces = engine.pieces(case)
        segs = [seg for _, _, seg in pieces]
        # (index in pieces, slot, frame-0 base KV, frame-0 glue KV or None)
        items = []
        for i, (kind, slot, seg) in enumerate(pieces):
            glue = segs[i + 1] if i + 1 < len(segs) else None
            if kind != "candidate" or (slot == 0 and glue is None):
                continue
            items.append((i, slot, to_frame0(seg, inv), to_frame0(glue, inv) if glue is not None else None))
        missing = [it for it in items if self.pool(case, it[1]).needs_anchor(it[2][1])]
        if missing:
            outcome, real = engine.dense(case, keep_cache=True)
            for i, slot, (bk, bv), glue in missing:
                self.pool(case, slot).add(self._measure(case, real, segs, i, slot, bk, bv, glue, inv))
            return Outcome(outcome.scores, reused=False, decision={"new_anchors": len(missing)})
        for i, slot, (bk, bv), glue in items:
            corr = self.pool(case, slot).correction(bk, bv, *(glue or (None, None)))
            if corr is None:
                continue
            if slot > 0:
                segs[i] = apply(segs[i], corr.dk, corr.dv, inv)
            if corr.glue_dk is not None:
                segs[i + 1] = apply(segs[i + 1], corr.glue_dk, corr.glue_dv, inv)
        outcome = engine.score_pieces(case, segs)
        outcome.decision = {"new_anchors": 0}
        return outcome

    @staticmethod
    def _measure(case, real, segs, i, slot, bk, bv, glue, inv) -> Anchor:
        seg = segs[i]
        dt = seg.keys.dtype  # anchors are stored in the model's dtype (bf16 on GPU), used in fp32
        rk, rv = to_frame0(real.slice(seg.start, seg.start + seg.length), inv)
        key = segment_key("anchor", case.prompt.ids(), (slot,))
        anchor = Anchor(key, slot, bk.to(dt), bv.to(dt), (rk - bk).to(dt), (rv - bv).to(dt))
        if glue is not None:
            g = segs[i + 1]
            gk, gv = to_frame0(real.slice(g.start, g.start + g.length), inv)
            anchor.glue_k, anchor.glue_v = glue[0].to(dt), glue[1].to(dt)
            anchor.glue_dk, anchor.glue_dv = (gk - glue[0]).to(dt), (gv - glue[1]).to(dt)
        return anchor
