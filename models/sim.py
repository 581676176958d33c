"""The simulated model ``sim:...``: fixed time per generated token, deterministic text, synthetic KV.

For scale tests: scheduling can be measured on any machine because a simulated agent sleeps
(no CPU) instead of computing. The spec is ``sim:`` followed by comma-separated ``name=value``
options; ``tokens_per_s`` is required::

    sim:tokens_per_s=20,batch_speedup=4,kv_layers=2,kv_heads=2,head_dim=8,answer_tokens=16

* ``tokens_per_s`` (> 0): decode speed of one request alone.
* ``batch_speedup`` (>= 1, default 1): a batch of ``B`` requests whose longest answer has ``n``
  tokens costs ``n / tokens_per_s * max(1, B / batch_speedup)`` seconds. ``1`` means batching
  buys nothing (a batch of B costs B requests); ``batch_speedup = B`` means a batch of B costs
  what one request does (perfect batching up to B, linear beyond).
* ``kv_layers``, ``kv_heads``, ``head_dim`` (>= 1; defaults 2, 2, 8): the shape
  ``[L, H, T, D]`` of the synthetic KV.
* ``answer_tokens`` (>= 1, default 16): answer length (capped by the request's ``max_new_tokens``).
* ``prefill_tokens_per_s`` (>= 0, default 0 = free): cost of encoding ids after a context.
* ``judge_s`` (>= 0, default 0): seconds one simulated judge call sleeps.

Tokens are UTF-8 bytes (ids 0..255), so ``encode(decode(ids)) == ids`` for every answer. An answer
is lowercase words drawn from SHA-256 of (prompt ids, seed): the same prompt and seed always give
the same text. No torch model, no weights, no torch: KV is numpy (:class:`SimSegment`, with a
:class:`~kvjudge.cache.segments.KVSegment`'s fields), so simulated agents and judges start in a
fraction of a second. Ground floor (no ``cache`` import).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields

import numpy as np

from kvjudge.models.base import ModelLoadError

PREFIX = "sim"
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class SimSpec:
    """The options of a ``sim:...`` spec (see the module docstring)."""

    tokens_per_s: float
    batch_speedup: float = 1.0
    kv_layers: int = 2
    kv_heads: int = 2
    head_dim: int = 8
    answer_tokens: int = 16
    prefill_tokens_per_s: float = 0.0
    judge_s: float = 0.0

    @property
    def model_id(self) -> str:
        """Keys KV: equal for every spec with the same tokenizer and KV shape (timings left out)."""
        return f"sim-kv{self.kv_layers}x{self.kv_heads}x{self.head_dim}"

    def batch_seconds(self, longest: int, batch: int) -> float:
        """Seconds a batch of ``batch`` requests costs when its longest answer has ``longest`` tokens."""
        if longest <= 0 or batch <= 0:
            return 0.0
        return longest / self.tokens_per_s * max(1.0, batch / self.batch_speedup)

    def prefill_seconds(self, tokens: int) -> float:
        return tokens / self.prefill_tokens_per_s if self.prefill_tokens_per_s > 0 else 0.0


_MINIMA = {"tokens_per_s": 0.0, "batch_speedup": 1.0, "kv_layers": 1, "kv_heads": 1, "head_dim": 1,
           "answer_tokens": 1, "prefill_tokens_per_s": 0.0, "judge_s": 0.0}
_STRICT = {"tokens_per_s"}  # must be > the minimum, the others >=


def is_sim_spec(spec: str) -> bool:
    """Whether ``spec`` names the simulated model (``sim`` or ``sim:...``)."""
    return spec == PREFIX or spec.startswith(PREFIX + ":")


def parse_sim_spec(spec: str) -> SimSpec:
    """The :class:`SimSpec` of ``spec``; :class:`ModelLoadError` (one line) for a bad one."""
    if not is_sim_spec(spec):
        raise ModelLoadError(f"{spec!r} is not a simulated model spec (sim:tokens_per_s=N,...)")
    body = spec[len(PREFIX) + 1:]
    types = {f.name: f.type for f in fields(SimSpec)}
    known = ", ".join(types)
    values: dict[str, float | int] = {}
    for part in (p.strip() for p in body.split(",")):
        if not part:
            continue
        name, eq, raw = part.partition("=")
        name, raw = name.strip(), raw.strip()
        if not eq or name not in types:
            raise ModelLoadError(f"sim model option {part!r} is not one of {known} (name=value)")
        if name in values:
            raise ModelLoadError(f"sim model option {name!r} given twice")
        cast = int if types[name] in (int, "int") else float
        try:
            value = cast(raw)
        except ValueError:
            raise ModelLoadError(f"sim model option {name}={raw!r} is not {'an integer' if cast is int else 'a number'}") from None
        low = _MINIMA[name]
        if value != value or value in (float("inf"),) or value < low or (name in _STRICT and value <= low):
            raise ModelLoadError(f"sim model option {name}={raw} must be {'>' if name in _STRICT else '>='} {low:g}")
        values[name] = value
    if "tokens_per_s" not in values:
        raise ModelLoadError(f"sim model spec {spec!r} needs tokens_per_s, e.g. sim:tokens_per_s=20")
    return SimSpec(**values)


def tokenize(text: str) -> list[int]:
    """Simulated token ids: the UTF-8 bytes of ``text``."""
    return list(text.encode("utf-8"))


def detokenize(ids: list[int]) -> str:
    return bytes(int(t) & 0xFF for t in ids).decode("utf-8", errors="replace")


def answer_ids(prompt_ids: list[int], seed: int, n: int) -> list[int]:
    """``n`` deterministic answer token ids (lowercase words, single spaces, no space at either end)."""
    h = hashlib.sha256(b"sim-answer")
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(bytes(int(t) & 0xFF for t in prompt_ids))
    stream, block = b"", h.digest()
    while len(stream) < n:
        stream += block
        block = hashlib.sha256(block).digest()
    out: list[str] = []
    for i in range(n):
        byte = stream[i]
        can_space = 0 < i < n - 1 and out[-1] != " "
        out.append(" " if can_space and byte % 6 == 0 else _LETTERS[byte % len(_LETTERS)])
    return tokenize("".join(out))


@dataclass
class SimSegment:
    """Synthetic keys / values ``[L, H, T, D]`` (numpy fp32, contiguous) of ``token_ids`` at positions
    ``start..start+T-1``: what the store and the simulated judge need of a segment, without torch."""

    keys: np.ndarray
    values: np.ndarray
    start: int
    token_ids: tuple[int, ...] = field(default=())

    @property
    def length(self) -> int:
        return int(self.keys.shape[2])

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes)


def synthetic_kv(spec: SimSpec, ids: list[int], start: int) -> SimSegment:
    """Cheap KV of ``ids`` at positions ``start..``: keys depend on token and position, values on the
    token only (``[L, H, T, D]`` each)."""
    L, H, D, T = spec.kv_layers, spec.kv_heads, spec.head_dim, len(ids)
    tok = (np.asarray(ids, dtype=np.float32) / np.float32(256.0)).reshape(1, 1, T, 1)
    pos = (np.arange(start, start + T, dtype=np.float32) / np.float32(1024.0)).reshape(1, 1, T, 1)
    values = np.ascontiguousarray(np.broadcast_to(tok, (L, H, T, D)))
    keys = np.ascontiguousarray(np.broadcast_to(tok + pos, (L, H, T, D)))
    return SimSegment(keys, values, int(start), tuple(int(t) for t in ids))
