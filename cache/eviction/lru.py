"""Least recently used: evict the key whose last insert or read is the oldest."""

from __future__ import annotations

from collections import OrderedDict

from kvjudge.cache.eviction.base import EvictionPolicy


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[str, int] = OrderedDict()  # oldest first

    def insert(self, key: str, nbytes: int) -> None:
        self._order[key] = int(nbytes)
        self._order.move_to_end(key)

    def touch(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victim(self) -> str:
        if not self._order:
            raise KeyError("no key to evict: the policy tracks nothing")
        return next(iter(self._order))

    def __len__(self) -> int:
        return len(self._order)
