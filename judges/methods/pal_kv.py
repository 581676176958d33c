"""PAL-KV: position-aware pooled anchors, the third reuse baseline of Liang et al. (2026, Table 1).

No paper defines it in public; the public fork of that paper's code (Guangzhou66/CCR-Judge, read via
our research notes) runs KVCOMM for the judge with anchors *pooled across all candidate agents*,
with a variant that pools only anchors measured at the same display slot. We implement that
variant: one anchor pool per display slot, shared by every agent, so a candidate is corrected with
deviations measured at the very position it now occupies (position-aware), whoever wrote them.
Everything else is :class:`~kvjudge.judges.methods.kvcomm.KVCOMM`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvjudge.judges.methods.kvcomm import KVCOMM


@dataclass
class PALKV(KVCOMM):
    pool_by: str = "slot"
