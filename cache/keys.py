"""Store keys of encoded segments, torch-free (simulated agents and judges import only this).

:func:`segment_key` hashes the model id and the token ids as little-endian int64, the bytes
``torch.tensor(ids, dtype=torch.int64).numpy().tobytes()`` gives on every platform we run on, so the
key of a segment does not depend on which process (with or without torch) computed it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def segment_key(model_id: str, context_ids: Sequence[int], segment_ids: Sequence[int]) -> str:
    """Content hash of (model, context tokens, segment tokens): the id of an encoded segment.

    The tokenizer is part of ``model_id`` (token ids only mean something under one tokenizer).
    """
    h = hashlib.sha256(model_id.encode())
    for part in (context_ids, segment_ids):
        h.update(len(part).to_bytes(8, "little"))
        h.update(struct.pack(f"<{len(part)}q", *(int(t) for t in part)))
    return h.hexdigest()[:32]
