"""Collecting concurrent requests into batches (what batching buys: ``kvjudge bench generate``).

:class:`BatchQueue` is the agent actor's scheduler (no Ray here): callers on any thread
:meth:`~BatchQueue.submit` an item and get a ``Future``; one worker thread takes the first waiting
item, keeps collecting for ``window_s`` seconds or until ``max_batch`` items are in hand, runs
``run(batch) -> results`` once and resolves every caller's future (or fails them all with the
batch's exception). One batch runs at a time, so the model is driven from one thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_BATCH = 8  # requests an agent actor batches at most (the makespan bound's sim capacity uses it too)


class BatchQueue(Generic[T, R]):
    """Runs ``run(items) -> results`` (same length, same order) on batches of submitted items."""

    def __init__(self, run: Callable[[list[T]], list[R]], max_batch: int = MAX_BATCH, window_s: float = 0.01,
                 name: str = "batch-queue") -> None:
        if max_batch < 1 or window_s < 0:
            raise ValueError(f"max_batch must be >= 1 and window_s >= 0, not {max_batch} / {window_s}")
        self.run, self.max_batch, self.window_s = run, int(max_batch), float(window_s)
        self._queue: queue.SimpleQueue[tuple[T, Future] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.batches = self.items = 0
        self.busy_s = 0.0
        self.last_batch = 0
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()

    def submit(self, item: T) -> Future:
        """Queue ``item``; the future resolves to its result once its batch ran."""
        fut: Future = Future()
        if self._closed:
            raise RuntimeError("the batch queue is closed")
        self._queue.put((item, fut))
        return fut

    def close(self) -> None:
        """Stop the worker after the batches already queued."""
        self._closed = True
        self._queue.put(None)
        self._worker.join()

    def stats(self) -> dict:
        """``batches``, ``items``, ``mean_batch``, ``last_batch`` and ``busy_s`` (time spent in ``run``)."""
        with self._lock:
            mean = self.items / self.batches if self.batches else 0.0
            return {"batches": self.batches, "items": self.items, "mean_batch": mean,
                    "last_batch": self.last_batch, "busy_s": self.busy_s}

    def _collect(self) -> list[tuple[T, Future]] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:  # closing: run what we have, then stop
                self._queue.put(None)
                break
            batch.append(nxt)
        return batch

    def _loop(self) -> None:
        while (batch := self._collect()) is not None:
            items = [item for item, _ in batch]
            t0 = time.perf_counter()
            try:
                results = self.run(items)
                if len(results) != len(items):
                    raise RuntimeError(f"batch runner returned {len(results)} results for {len(items)} items")
            except BaseException as exc:  # every caller of the batch gets the error
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            finally:
                with self._lock:
                    self.batches += 1
                    self.items += len(items)
                    self.last_batch = len(items)
                    self.busy_s += time.perf_counter() - t0
            for (_, fut), res in zip(batch, results):
                fut.set_result(res)
