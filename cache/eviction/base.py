"""The interface every eviction policy implements (bookkeeping only: the store owns the data)."""

from __future__ import annotations

from abc import ABC, abstractmethod


class EvictionPolicy(ABC):
    """Tracks which keys a store holds and names the next one to drop.

    The store calls ``insert`` when a key is stored, ``touch`` when it is read, ``remove`` when it
    is deleted or evicted, and ``victim`` when it needs room. A policy never drops a key itself.
    """

    name: str = ""

    @abstractmethod
    def insert(self, key: str, nbytes: int) -> None:
        """Start tracking ``key`` (``nbytes`` large); re-inserting a key replaces its record."""

    @abstractmethod
    def touch(self, key: str) -> None:
        """Record a use of ``key`` (no-op for keys not tracked)."""

    @abstractmethod
    def remove(self, key: str) -> None:
        """Stop tracking ``key`` (no-op for keys not tracked)."""

    @abstractmethod
    def victim(self) -> str:
        """The key to evict next; ``KeyError`` when nothing is tracked."""

    @abstractmethod
    def __len__(self) -> int: ...
