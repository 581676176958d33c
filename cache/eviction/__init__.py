"""Eviction policies for the KV store, one per module, looked up by name."""

from __future__ import annotations

from kvjudge.cache.eviction.base import EvictionPolicy
from kvjudge.cache.eviction.lru import LRUPolicy

EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {
    LRUPolicy.name: LRUPolicy,
}


def make_policy(name: str) -> EvictionPolicy:
    """A fresh policy by registry name; ``ValueError`` naming the known policies otherwise."""
    try:
        cls = EVICTION_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(sorted(EVICTION_POLICIES))}") from None
    return cls()


__all__ = ["EVICTION_POLICIES", "EvictionPolicy", "LRUPolicy", "make_policy"]
