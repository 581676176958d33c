"""A byte-budgeted, in-process store of KV segments keyed by content hash (pure Python, no Ray).

Keys are strings, normally :func:`kvjudge.cache.encoder.segment_key`. Values are
:class:`~kvjudge.cache.segments.KVSegment` objects (or anything with an ``nbytes`` attribute).
``bytes_used <= budget_bytes`` holds after every call: a put evicts (by the chosen policy) until
the new item fits, and an item larger than the whole budget is refused.

:mod:`kvjudge.cache.store_actor` runs this very class as a Ray actor, and :func:`call` invokes a
method on either a local :class:`KVStore` or the actor's handle, so callers need not care which.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from kvjudge.cache.eviction import make_policy

if TYPE_CHECKING:  # typing only: the store (and the simulated agents using it) stays torch-free
    from kvjudge.cache.segments import KVSegment


def to_host(segment: KVSegment) -> KVSegment:
    """``segment`` with contiguous CPU tensors (the same object when they already are).

    Call this before putting a segment into a store that lives in another process: only contiguous
    CPU tensors travel through Ray's object store (zero-copy with ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS``).
    A segment of host arrays without torch's ``is_contiguous`` (the simulated model's numpy KV) is
    returned as it is.
    """
    k, v = segment.keys, segment.values
    if not hasattr(k, "is_contiguous"):
        return segment
    if k.device.type == "cpu" and v.device.type == "cpu" and k.is_contiguous() and v.is_contiguous():
        return segment
    from kvjudge.cache.segments import KVSegment  # a torch segment is here, so torch is loaded already

    return KVSegment(k.cpu().contiguous(), v.cpu().contiguous(), segment.start, segment.token_ids)


class KVStore:
    """Segments keyed by str under a byte budget, evicting by ``eviction`` (see ``EVICTION_POLICIES``).

    Counters in :meth:`stats`: ``puts`` counts accepted puts (replacements included), ``rejected``
    puts refused for being larger than the budget, ``evictions`` entries dropped to make room (not
    replacements or deletes), ``hits``/``misses`` lookups by :meth:`get`/:meth:`get_many`.
    """

    def __init__(self, budget_bytes: int, eviction: str = "lru") -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, not {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.eviction = eviction
        self._policy = make_policy(eviction)
        self._items: dict[str, tuple[Any, int, dict]] = {}  # key -> (segment, nbytes, meta)
        self._bytes = 0
        self._lock = threading.RLock()
        self.hits = self.misses = self.evictions = self.puts = self.rejected = 0
        self._read_by_node: Counter = Counter()  # bytes handed out by get, by where they live
        self.started_at = time.time()  # a restarted store actor shows a new value (the runner counts restarts)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def put(self, key: str, segment: Any, meta: dict | None = None) -> bool:
        """Store ``segment`` under ``key`` (replacing any entry there); ``False`` if it can never fit.

        A refused put leaves the store unchanged (an existing entry under ``key`` stays).
        """
        size = int(segment.nbytes)
        with self._lock:
            if size > self.budget_bytes:
                self.rejected += 1
                return False
            self._drop(key)
            while self._bytes + size > self.budget_bytes:
                self._drop(self._policy.victim())
                self.evictions += 1
            self._items[key] = (segment, size, dict(meta or {}))
            self._bytes += size
            self._policy.insert(key, size)
            self.puts += 1
            return True

    def get(self, key: str) -> Any | None:
        """The segment under ``key`` (marking it used), or ``None``."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            self._read_by_node[str(getattr(item[0], "node", None) or "here")] += item[1]
            self._policy.touch(key)
            return item[0]

    def get_many(self, keys: list[str]) -> list[Any | None]:
        """:meth:`get` for each key, in order."""
        with self._lock:
            return [self.get(k) for k in keys]

    def contains(self, key: str) -> bool:
        """Whether ``key`` is stored (neither a hit nor a use)."""
        return key in self._items

    def meta(self, key: str) -> dict | None:
        """A copy of the metadata stored with ``key``, or ``None``."""
        with self._lock:
            item = self._items.get(key)
            return dict(item[2]) if item is not None else None

    def delete(self, key: str) -> bool:
        """Drop ``key``; whether it was there."""
        with self._lock:
            return self._drop(key)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def stats(self) -> dict:
        """Counters, plus ``bytes_by_node``: where the stored bytes live (values with a ``node``), and
        ``bytes_read_by_node``: the bytes :meth:`get` handed out so far, by where they live (for a
        :class:`~kvjudge.cache.store_actor.SegmentRef`, what readers pull from that node)."""
        with self._lock:
            by_node: Counter = Counter()
            saved = 0
            for value, size, meta in self._items.values():
                by_node[str(getattr(value, "node", None) or "here")] += size
                saved += max(0, int(meta.get("uncompressed_bytes", size)) - size)
            return {
                "entries": len(self._items),
                "bytes": self._bytes,
                "budget_bytes": self.budget_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "puts": self.puts,
                "rejected": self.rejected,
                "bytes_by_node": dict(by_node),
                "bytes_saved": saved,  # by token compression of the entries held now
                "bytes_read_by_node": dict(self._read_by_node),
                "started_at": self.started_at,
            }

    def _drop(self, key: str) -> bool:
        item = self._items.pop(key, None)
        if item is None:
            return False
        self._bytes -= item[1]
        self._policy.remove(key)
        return True


def call(handle: Any, method: str, *args: Any) -> Any:
    """``handle.method(*args)``, waiting on the result when ``handle`` is a Ray actor handle."""
    fn = getattr(handle, method)
    remote = getattr(fn, "remote", None)
    if remote is None:
        return fn(*args)
    import ray  # only reached with a Ray handle, so this module itself stays Ray-free

    return ray.get(remote(*args))
