"""The KV store as a named Ray actor, so agents and the judge in other processes share one cache.

Who owns the store
------------------
A non-detached Ray actor is owned by the process whose ``.remote()`` created it and dies with
that owner. If an agent actor were the first to call ``options(get_if_exists=True)`` it would
create and own the store, and killing that agent would take every cached segment with it.
:func:`get_or_create_store` therefore picks the lifetime from the caller (``lifetime="auto"``):

* called from the **driver**: ``lifetime=None`` -- the store is owned by the driver, outlives
  every agent actor, and is cleaned up when the driver exits. A non-detached actor is also
  garbage-collected once no handle to it is left, so the driver-side handle is pinned in a
  module-level registry until :func:`kill_store` (or driver exit). Create it here first (the
  orchestrator does), and later calls from actors simply look it up by name;
* called from a **worker** (an actor or task) that finds no store: ``lifetime="detached"`` -- the
  store belongs to no worker, so it still outlives its creator; it then also outlives the driver
  of a long-running cluster and must be ended with :func:`kill_store` (a local
  ``ray.init()`` cluster is torn down on ``ray.shutdown()`` anyway).

Where the bytes live
--------------------
:func:`put_segment` does not send a segment to the store actor: the producer puts it (``ray.put``) into
the object store of its own node and hands the actor only a :class:`SegmentRef` (the ref, its size
and node). Ray >= 2.56 has no ``ray.put(..., _owner=...)``, so the actor adopts the object instead:
it asks the producing actor (through the ``__ray_call__`` every Ray actor has) to return the object
it put, and keeps the result: a copy on the producer's own node, owned by the store actor, so the
segment outlives the producer (an agent that dies does not take its segments along). The actor never
resolves either ref. Two exceptions keep the producer as owner: a producer that is not an actor (a
task, the driver), and segments under ``ADOPT_MIN_BYTES`` (Ray inlines such small returns into the
caller's memory, which would put their bytes in the store actor).

The actor keeps the directory (key -> ref, bytes, meta, eviction state) and enforces the byte budget
by dropping refs; :func:`get_segment` gets the ref from the actor and pulls the bytes straight from
the producing node. No segment byte passes through the actor's heap. A store that died and restarted
(``max_restarts=-1``) starts empty: every failed put or get is a miss, never an error, so losing
cached KV costs only the time to re-encode it.

How tensors travel
------------------
Arguments and results pass through Ray's object store with Ray's pickle-5 serializer. Only CPU
tensors belong there: move a CUDA segment with :func:`kvjudge.cache.store.to_host` before ``put``.
By default torch serializes a CPU tensor's storage in-band (one copy on put, one on get); with
``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1`` in the environment (set before ``ray.init``), Ray reduces
CPU tensors to numpy byte arrays carried as pickle-5 out-of-band buffers, so a reader maps them
from shared memory without a copy (such tensors are read-only: clone before editing in place).
The byte budget counts each segment's ``SegmentRef.nbytes``, wherever its bytes live.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from kvjudge.cache.store import KVStore, call, to_host

if TYPE_CHECKING:  # typing only: simulated agents put and get segments without torch
    from kvjudge.cache.segments import KVSegment

DEFAULT_STORE_NAME = "kvjudge-store"

# Driver-created (non-detached) stores, pinned so that dropping every user handle does not
# garbage-collect the actor: keyed by (namespace, name).
_PINNED: dict[tuple[str | None, str], Any] = {}


GET_TIMEOUT_S = 30.0
ADOPT_MIN_BYTES = 100 * 1024  # Ray's default max_direct_call_object_size: smaller returns are inlined


@dataclass
class SegmentRef:
    """What the store actor holds for a segment: a ref (in a list, so Ray does not resolve it in
    transit), the segment's size and the node whose object store has the bytes; ``holder`` is the
    producing actor until the store adopted the object (then ``None``)."""

    refs: list
    nbytes: int
    node: str
    holder: Any = None


def _identity(actor: Any, segment: Any) -> Any:
    return segment


class _StoreActorImpl(KVStore):
    """:class:`KVStore` whose :meth:`put` adopts a :class:`SegmentRef`'s object (see the module doc)."""

    def put(self, key: str, segment: Any, meta: dict | None = None) -> bool:
        if isinstance(segment, SegmentRef) and segment.holder is not None:
            owned = segment.holder.__ray_call__.remote(_identity, segment.refs[0])
            segment = SegmentRef([owned], segment.nbytes, segment.node)
        return super().put(key, segment, meta)


# num_cpus=0: the store is I/O bound and must not take a CPU slot from agents on small machines.
# max_restarts=-1: a store that dies comes back (empty); callers treat what it lost as misses.
KVStoreActor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(_StoreActorImpl)


def put_segment(store: Any, key: str, segment: KVSegment, meta: dict | None = None) -> bool:
    """Put ``segment`` into the object store of this node, adopted by ``store``, and register it under
    ``key`` (``store`` may also be an in-process :class:`KVStore`, which simply keeps it); ``False`` (a miss later, never an error) when the store refuses it or is unreachable."""
    seg = to_host(segment)
    if not isinstance(store, ray.actor.ActorHandle):  # an in-process KVStore: no Ray involved
        return bool(store.put(key, seg, meta))
    try:
        ctx = ray.get_runtime_context()
        ref = ray.put(seg)
        holder = ctx.current_actor if ctx.get_actor_id() and seg.nbytes >= ADOPT_MIN_BYTES else None
        entry = SegmentRef([ref], int(seg.nbytes), ctx.get_node_id(), holder)
        return bool(ray.get(store.put.remote(key, entry, meta), timeout=GET_TIMEOUT_S))
    except Exception:  # a dead or restarting store: the KV is simply not shared this time
        return False


def get_segment(store: Any, key: str) -> KVSegment | None:
    """The segment under ``key`` pulled from the node that holds it, or ``None`` (missing, evicted,
    or lost with a store restart)."""
    if not isinstance(store, ray.actor.ActorHandle):
        return store.get(key)
    try:
        entry = ray.get(store.get.remote(key), timeout=GET_TIMEOUT_S)
        if isinstance(entry, SegmentRef):
            return ray.get(entry.refs[0], timeout=GET_TIMEOUT_S)
        return entry
    except Exception:  # a restarted store, an object lost with its owner: re-encode instead
        return None


def _in_driver() -> bool:
    try:
        from ray._private import worker as _worker

        return _worker.global_worker.mode == _worker.SCRIPT_MODE
    except (ImportError, AttributeError):  # private API moved: a driver is no actor
        return ray.get_runtime_context().get_actor_id() is None


def get_or_create_store(
    name: str = DEFAULT_STORE_NAME,
    budget_bytes: int = 2 << 30,
    eviction: str = "lru",
    namespace: str | None = None,
    lifetime: str | None = "auto",
) -> "ray.actor.ActorHandle":
    """The store actor called ``name``, created with ``budget_bytes``/``eviction`` if none exists.

    ``lifetime="auto"`` (see the module doc) makes the store owned by the driver when the driver
    calls this, and detached when a worker does, so the store never dies with an agent actor.
    Pass ``None`` or ``"detached"`` to force one. An existing store keeps its own budget/policy.
    ``namespace=None`` uses the caller's namespace (that of the job, for its actors and tasks).
    """
    if lifetime == "auto":
        lifetime = None if _in_driver() else "detached"
    if lifetime not in (None, "detached"):
        raise ValueError(f"lifetime must be 'auto', None or 'detached', not {lifetime!r}")
    handle = KVStoreActor.options(
        name=name, namespace=namespace, get_if_exists=True, lifetime=lifetime
    ).remote(budget_bytes, eviction)
    if lifetime is None:
        _PINNED.setdefault((namespace, name), handle)
    return handle


STORE_WAIT_S = 10.0  # how long an actor looks for the store (registered by its creator, or restarting)


def get_store(name: str = DEFAULT_STORE_NAME, namespace: str | None = None,
              wait_s: float = 0.0) -> "ray.actor.ActorHandle":
    """The existing store actor ``name``, never creating one; looked up again for up to ``wait_s``
    seconds (an actor started right after the store's creation may look before Ray has its name), then
    a one-line ``ValueError``."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return ray.get_actor(name, namespace=namespace)
        except ValueError:
            if time.monotonic() >= deadline:
                raise ValueError(f"no KV store actor {name!r} in namespace {namespace!r} "
                                 f"(looked for {wait_s:g} s)") from None
            time.sleep(0.2)


def kill_store(name: str = DEFAULT_STORE_NAME, namespace: str | None = None) -> bool:
    """End the store actor ``name`` if it exists (needed for a detached one); whether it did."""
    _PINNED.pop((namespace, name), None)
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    ray.kill(handle, no_restart=True)
    return True


__all__ = [
    "ADOPT_MIN_BYTES",
    "DEFAULT_STORE_NAME",
    "KVStoreActor",
    "SegmentRef",
    "get_segment",
    "put_segment",
    "call",
    "get_or_create_store",
    "get_store",
    "kill_store",
    "to_host",
]
