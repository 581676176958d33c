"""PAL-KV: KVCOMM with anchors pooled across candidate agents, the third reuse baseline of Liang et al.
(2026, Table 1).

No paper defines it in public; the public fork of that paper's code (``Guangzhou66/CCR-Judge``) runs
it as KVCOMM for the judge with ``KVCOMM_GROUP_JUDGE_ANCHORS=1`` and
``KVCOMM_GROUP_JUDGE_ANCHORS_BY_POSITION=0`` (``KVCOMM/llm/gpt_chat.py``,
``_collect_anchors_for_placeholder``): a candidate is *corrected* with the anchors of every agent,
while the *reuse decision* stays per agent (``predict_as_anchor`` reads the agent's own anchors), so
its reuse rate equals KVCOMM's. That is ``pool_by="all"`` here; ``pool_by="slot"`` is the fork's
by-position variant (only anchors last measured at the candidate's display slot, any agent).
Everything else is :class:`~kvjudge.judges.methods.kvcomm.KVCOMM`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvjudge.judges.methods.kvcomm import KVCOMM


@dataclass
class PALKV(KVCOMM):
    pool_by: str = "all"
