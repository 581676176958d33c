"""The agent actor: a Ray shell around a :class:`~kvjudge.agents.base.GeneratorLike` (the real
:class:`~kvjudge.agents.generate.Generator`, or :class:`~kvjudge.agents.sim.SimGenerator` for
``sim:...`` model specs).

One actor holds one model copy; an agent's identity (its prompt, sampling settings, results) lives
in the request, not in the actor. The actor is threaded (``max_concurrency``): concurrent
``generate`` calls are collected by a :class:`~kvjudge.agents.batching.BatchQueue` (a ``window_s``
window, up to ``max_batch`` requests) and generated together by one worker thread, while
``ready``, ``encode`` and ``stats`` answer on other threads meanwhile.

The actor knows nothing of the judge: it generates, publishes a turn's own KV on request
(``publish_agent_kv``: under ``segment_key(model_id, prompt_ids, answer_ids)``, the key the judge's
``agent`` candidate-KV mode looks up), and encodes given token ids after given context ids into the
store under a given key.

This module imports no torch or transformers: only :func:`make_generator` loads them, for a real
model, so a simulated agent actor is ready in well under a second.
"""

from __future__ import annotations

import os
import threading

import ray

from kvjudge.agents.base import GenRequest, Generation, GeneratorLike
from kvjudge.agents.batching import MAX_BATCH, BatchQueue
from kvjudge.agents.sim import SimGenerator
from kvjudge.cache.keys import segment_key
from kvjudge.cache.store_actor import STORE_WAIT_S, get_store, put_segment
from kvjudge.models.sim import is_sim_spec, parse_sim_spec

WINDOW_S = 0.01
MAX_CONCURRENCY = 64  # threads: queued generate calls plus ready / encode / stats


def make_generator(model: str, num_threads: int = 1) -> GeneratorLike:
    """The generator for a model spec: simulated for ``sim:...`` (torch-free), else the real model
    loaded, with torch on ``num_threads`` CPU threads."""
    if is_sim_spec(model):
        return SimGenerator(parse_sim_spec(model))
    import torch  # the real-model path only: a simulated agent never loads torch / transformers

    from kvjudge.agents.generate import Generator
    from kvjudge.models import load_model

    torch.set_num_threads(max(1, num_threads))
    return Generator(load_model(model))


class _AgentActorImpl:
    def __init__(self, model: str, store_name: str | None, namespace: str | None, num_threads: int = 1,
                 compress: dict | None = None,
                 max_batch: int = MAX_BATCH, window_s: float = WINDOW_S) -> None:
        self.error: str | None = None
        self.store = None
        try:
            self.gen: GeneratorLike = make_generator(model, num_threads)
        except Exception as exc:  # reported by ready(); the actor stays up to say why
            self.error = " ".join(str(exc).split()) or type(exc).__name__
            return
        self.batcher: BatchQueue[GenRequest, Generation] = BatchQueue(self.gen.generate_batch, max_batch, window_s)
        self.tokens = 0
        self._count_lock = threading.Lock()
        if store_name:
            try:
                self.store = get_store(store_name, namespace, wait_s=STORE_WAIT_S)
            except ValueError as exc:  # reported by ready(), in one line
                self.error = str(exc)
        self.compress = compress if compress and compress.get("method", "none") != "none" else None

    def ready(self) -> dict:
        """``{"model_id", "node", "node_id", "pid", "max_batch"}`` (``node``: IP address, ``node_id``: Ray's
        id, distinct for several nodes on one host) or ``{"error": one line}`` when the model did not load."""
        if self.error:
            return {"error": self.error, "node": ray.util.get_node_ip_address()}
        return {"model_id": self.gen.model_id, "node": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "max_batch": self.batcher.max_batch}

    def generate(self, request: dict) -> dict:
        """Run one agent turn: ``request`` holds ``agent``, ``prompt``, sampling settings
        (``max_new_tokens``, ``temperature``, ``seed``) and optionally ``publish_agent_kv``.

        Blocks until the batch it joined ran. The result carries ``token_ids`` / ``prompt_ids``
        (lists of ints), ``batch_size`` (requests generated together) and ``tokens_per_s`` (this
        request's tokens over the batch's wall time); ``store_key`` is the key of the published
        agent KV, ``None`` when not asked for, without a store, for an empty answer or when the
        store refused it.
        """
        publish = bool(request.get("publish_agent_kv", False))
        self._check_length(request["prompt"], int(request.get("max_new_tokens", 128)))
        g: Generation = self.batcher.submit(GenRequest(
            request["prompt"],
            max_new_tokens=int(request.get("max_new_tokens", 128)),
            temperature=float(request.get("temperature", 0.0)),
            seed=int(request.get("seed", 0)),
            keep_kv=publish and self.store is not None,
        )).result()
        with self._count_lock:
            self.tokens += len(g.token_ids)
        key = None
        if publish and self.store is not None and g.agent_kv is not None:
            key = segment_key(self.gen.model_id, g.prompt_ids, g.token_ids)
            meta = {"model_id": self.gen.model_id, "agent": request["agent"], "kind": "agent"}
            if not self._put(key, g.agent_kv, meta, None):  # a lost put is a miss later, not an error
                key = None
        return {
            "agent": request["agent"],
            "text": g.text,
            "tokens": len(g.token_ids),
            "token_ids": [int(t) for t in g.token_ids],
            "prompt_ids": [int(t) for t in (g.prompt_ids or [])],
            "prompt_tokens": g.prompt_tokens,
            "seconds": g.seconds,
            "tokens_per_s": g.tokens_per_s,
            "batch_size": g.batch_size,
            "model_id": self.gen.model_id,
            "store_key": key,
        }

    def _check_length(self, prompt: str, max_new_tokens: int) -> None:
        """A prompt the model cannot hold fails this request with the reason (never a hang)."""
        limit = self.gen.max_positions
        if not limit:
            return
        n = len(self.gen.prompt_ids(prompt))
        if n >= limit:
            raise ValueError(f"prompt has {n} tokens, more than the model's {limit} positions")

    def encode(self, context_ids: list[int], ids: list[int], key: str, meta: dict | None = None) -> bool:
        """Encode ``ids`` after ``context_ids`` and put the segment into the store under ``key``."""
        if self.store is None:
            return False
        seg = self.gen.encode(list(context_ids), list(ids))
        return self._put(key, seg, {**(meta or {}), "model_id": self.gen.model_id}, list(context_ids))

    def _put(self, key: str, seg, meta: dict, context_ids: list[int] | None) -> bool:
        """Put ``seg`` into the store, token-compressed first when the store asks for it (``store.compress``):
        the kept tokens keep their own positions, and the store's budget counts only the kept bytes."""
        if self.compress:
            full = seg.nbytes
            seg = self.gen.compress(seg, self.compress["method"], float(self.compress["ratio"]), context_ids)
            meta = {**meta, "uncompressed_bytes": int(full), "compress": self.compress["method"]}
        return put_segment(self.store, key, seg, meta)

    def stats(self) -> dict:
        """Batching counters (``batches``, ``items``, ``mean_batch``, ``last_batch``, ``busy_s``) and
        ``tokens`` generated, ``tokens_per_s`` over busy time (for the dashboard)."""
        if self.error:
            return {"error": self.error}
        s = self.batcher.stats()
        return {**s, "tokens": self.tokens, "tokens_per_s": self.tokens / s["busy_s"] if s["busy_s"] else 0.0}


AgentActor = ray.remote(max_restarts=1, max_task_retries=1, max_concurrency=MAX_CONCURRENCY)(_AgentActorImpl)
