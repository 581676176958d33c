"""Connecting to Ray and checking that a cluster can place what a run asks for (one-line errors, fast).

Ray itself retries an unreachable address for minutes and waits forever on a resource no node
has; :func:`connect` probes the address with a plain TCP connection first, and :func:`check_feasible`
compares each actor's request with what the nodes offer before anything is started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import warnings
from collections.abc import Callable, Iterator

import ray

NAMESPACE = "kvjudge"
ZERO_COPY = "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"
PROBE_TIMEOUT_S = 5.0
API_SERVER_ENV = "KVJUDGE_RAY_API_SERVER"  # "1": an embedded Ray starts its API server and monitors as usual


class ClusterError(ValueError):
    """The cluster cannot be reached or cannot place a request; one line."""


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`ClusterError` within ``timeout`` s when nothing listens at ``address``."""
    if address.startswith("ray://"):
        hostport: str | None = address[len("ray://"):]
    else:
        try:
            from ray._private.services import canonicalize_bootstrap_address  # private: used for 'auto'

            hostport = canonicalize_bootstrap_address(address)
        except ConnectionError as exc:  # "auto" and no cluster started on this machine
            raise ClusterError(f"cannot connect to the Ray cluster at {address!r}: {' '.join(str(exc).split())}") \
                from None
        except Exception:  # a Ray without this helper: let ray.init judge
            return
    if not hostport or ":" not in hostport:
        return
    host, port = hostport.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ClusterError(f"cannot connect to the Ray cluster at {address!r} ({hostport}): {reason}") from None


def connect(address: str | None, num_cpus: int | None = None, torch_tensors: bool = True) -> bool:
    """Ray up: ``address`` (probed first), or an embedded local Ray; whether this call started it.

    ``torch_tensors=False`` (a run of simulated models only) keeps zero-copy torch serialization off in
    the job's workers: with it on, Ray internals import torch in every worker as it connects
    (``ray._private.serialization``), seconds per actor that a torch-free actor does not need."""
    if ray.is_initialized():
        return False
    # KV segments are never written in place after they are made: let Ray pass them zero-copy
    value = os.environ.setdefault(ZERO_COPY, "1") if torch_tensors else "0"
    warnings.filterwarnings("ignore", message=".*(Zero-copy tensor|NumPy array is not writable).*")
    common = dict(namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
    if address:
        probe(address)
        try:  # a cluster's workers learn the setting from the job's runtime env
            ray.init(address=address, runtime_env={"env_vars": {ZERO_COPY: value}}, **common)
        except Exception as exc:
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise ClusterError(f"cannot connect to the Ray cluster at {address!r}: {reason}") from None
    else:
        # an embedded Ray's workers inherit the environment its raylet starts with: no job runtime env,
        # whose workers Ray cannot take from the pool it prestarts (that costs ~2 s of actor start-up)
        before = os.environ.get(ZERO_COPY)
        os.environ[ZERO_COPY] = value
        try:
            with _lean_head():
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                         **common)
        finally:
            if before is None:
                os.environ.pop(ZERO_COPY, None)
            else:
                os.environ[ZERO_COPY] = before
    return True


@contextlib.contextmanager
def _lean_head() -> Iterator[None]:
    """An embedded Ray started inside this block starts no API server, autoscaler monitor or log monitor.

    **Ray private API** (``ray._private.node.Node``'s ``start_api_server``, ``start_monitor`` and
    ``start_log_monitor``, replaced by no-ops for the ``ray.init`` call only; tested with Ray 2.60 and
    the newest release the range allows: ``tests/test_runtime.py``, in ``.ci/internals-tests.txt``).
    ``ray.init`` starts all three even with ``include_dashboard=False`` and ``log_to_driver=False``: it
    waits until the API server (Ray's ``dashboard.py``, which then serves Ray's state and job APIs and
    usage stats) has registered, the log monitor's Python start competes for the CPU with the agents
    the raylet waits for, and at ``ray.shutdown`` the monitor ignores SIGTERM until Ray kills it a second
    later: together ~2 s of every embedded run on a quiet 2-core machine. A one-node embedded Ray
    autoscales nothing, its driver takes no worker logs (``log_to_driver=False``; they are still written
    under the session's log folder), and kvjudge uses none of those APIs (its own dashboard reads the
    run's metrics actor). A cluster started with ``ray start`` keeps its own. ``KVJUDGE_RAY_API_SERVER=1``
    (or a Ray without these methods) starts them as usual, e.g. for ``ray list actors`` against an
    embedded run."""
    try:
        from ray._private.node import Node
    except ImportError:
        Node = None  # type: ignore[assignment,misc]
    names = ("start_api_server", "start_monitor", "start_log_monitor")
    originals = {n: getattr(Node, n, None) for n in names}
    if None in originals.values() or os.environ.get(API_SERVER_ENV, "") not in ("", "0"):
        yield
        return
    for n in names:
        setattr(Node, n, lambda self, **_: None)
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(Node, n, fn)


@contextlib.contextmanager
def held_sigterm(handler: Callable | None) -> Iterator[None]:
    """Ray's start-up inside this block cannot be killed half-way by SIGTERM: a SIGTERM that arrives is
    held, and ``handler`` (the CLI's: SIGTERM taken like Ctrl-C, exit 143) takes it once the block has
    ended, with every Ray process known to whoever shuts Ray down; ``handler`` is the SIGTERM handler
    again afterwards. Without it a SIGTERM in the first seconds of a run ended it with exit 15 and no
    message, or with a native stack dump and exit 134.

    **Ray private API** (tested as :func:`_lean_head`): ``ray.init`` installs Python SIGTERM handlers
    of its own through ``ray._private.utils.set_sigterm_handler`` (the driver's: ``sys.exit(15)``; the
    embedded head node's: kill its processes, ``sys.exit(1)``), replaced by a no-op inside the block;
    and the driver's C++ core worker installs a failure-signal handler that takes SIGTERM too (stack
    dump, abort), which ``ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER`` turns off for this driver
    only (workers keep theirs: they inherit the environment, not this attribute). Outside the main
    thread, or when ``handler`` is not a Python callable, nothing changes."""
    if not callable(handler) or threading.current_thread() is not threading.main_thread():
        yield
        return
    import ray._private.utils as ray_utils
    from ray._private import ray_constants

    pending: list[int] = []
    saved = (ray_utils.set_sigterm_handler, getattr(ray_constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER", None))
    signal.signal(signal.SIGTERM, lambda signum, frame: pending.append(signum))
    ray_utils.set_sigterm_handler = lambda _handler: None
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = saved[0]
        if saved[1] is None:
            del ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
        else:
            ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = saved[1]
        signal.signal(signal.SIGTERM, handler)
    if pending:
        handler(signal.SIGTERM, None)


def node_resources() -> list[dict[str, float]]:
    """The total resources of every live node."""
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def check_feasible(what: str, request: dict[str, float]) -> None:
    """Raise :class:`ClusterError` naming the resource when no single node can hold ``request``."""
    need = {k: float(v) for k, v in request.items() if v}
    nodes = node_resources()
    if any(all(n.get(k, 0.0) >= v for k, v in need.items()) for n in nodes):
        return
    short = next((k for k, v in need.items() if max((n.get(k, 0.0) for n in nodes), default=0.0) < v),
                 next(iter(need), "?"))
    have = max((n.get(short, 0.0) for n in nodes), default=0.0)
    raise ClusterError(f"{what} needs {short}={need.get(short, 0):g} on one node, but the largest node has "
                       f"{short}={have:g} ({len(nodes)} node(s); cluster total: "
                       f"{ {k: v for k, v in ray.cluster_resources().items() if '/' not in k and 'node:' not in k} })")
