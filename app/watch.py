"""``kvjudge dashboard``: attach to a run on a Ray cluster and draw its snapshots until it ends.

:func:`connect_run` connects to the cluster (a TCP probe first, one-line errors) and finds the run's
``kvjudge-metrics`` actor; :func:`fetcher` polls it; :func:`watch` draws each snapshot with
:func:`kvjudge.app.dashboard.render` (or one :func:`~kvjudge.app.dashboard.plain_line` per poll
off a terminal) and says why it stopped.
"""

from __future__ import annotations

import time
from typing import Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from kvjudge.app.dashboard import plain_line, render
from kvjudge.runtime.cluster import ClusterError, probe
from kvjudge.runtime.telemetry import METRICS_NAMESPACE, Snapshot, find_metrics_actor


class RunGone(Exception):
    """The metrics actor went away (its run ended) while we watched."""


def connect_run(address: str):
    """Ray connected to ``address`` (reused when already connected), and the run's metrics actor."""
    if not ray.is_initialized():
        try:
            probe(address)
        except ClusterError as exc:
            raise ValueError(str(exc)) from None
        try:
            ray.init(address=address, namespace=METRICS_NAMESPACE, log_to_driver=False, logging_level="ERROR")
        except Exception as exc:
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise ValueError(f"cannot connect to the Ray cluster at {address!r}: {reason}") from None
    actor = find_metrics_actor()
    if actor is None:
        raise ValueError("no kvjudge run is publishing on this cluster")
    return actor


def fetcher(actor, timeout: float) -> Callable[[], Snapshot | None]:
    """A function that returns the run's latest snapshot (the last one seen while the actor is slow)."""
    last: list[Snapshot | None] = [None]

    def fetch() -> Snapshot | None:
        try:
            data = ray.get(actor.latest.remote(), timeout=timeout)
        except GetTimeoutError:
            return last[0]
        except RayActorError as exc:
            raise RunGone(str(exc)) from None
        last[0] = Snapshot.from_dict(data) if data else None
        return last[0]

    return fetch


def watch(fetch: Callable[[], Snapshot | None], console: Console, interval: float, live: bool) -> str:
    """Poll ``fetch`` every ``interval`` s and draw until the run finishes; returns why it stopped."""
    if not live:
        while True:
            try:
                s = fetch()
            except RunGone:
                return "the run ended (its metrics actor is gone)"
            print(plain_line(s, now=time.time()) if s else "waiting for the run's first snapshot", flush=True)
            if s is not None and s.finished:
                return "the run finished"
            time.sleep(interval)

    state: dict = {"snap": None}

    def frame():
        s = state["snap"]
        if s is None:
            return Panel(Text("waiting for the run's first snapshot", style="dim"), title="kvjudge")
        now = s.updated_at if s.finished else time.time()
        return render(s, console.width, now=now, max_agents=max(4, console.height - 22))

    with Live(console=console, get_renderable=frame, refresh_per_second=4, transient=False) as lv:
        while True:
            try:
                state["snap"] = fetch()
            except RunGone:
                return "the run ended (its metrics actor is gone)"
            lv.refresh()
            if state["snap"] is not None and state["snap"].finished:
                return "the run finished"
            time.sleep(interval)
