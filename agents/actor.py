"""The agent actor: a Ray shell around :class:`~kvjudge.agents.generate.Generator`.

One actor holds one model copy. The orchestrator starts one actor per distinct model per run and
routes every agent of the topology that uses that model to it, so agents that share a model share
one copy on a node instead of loading it once each; an agent's identity (its prompt, sampling
settings, results) lives in the request, not in the actor.

The actor knows nothing of the judge: it generates, and on request encodes given token ids after
given context ids and puts the segment into the KV store under a given key.
"""

from __future__ import annotations

import os

import ray
import torch

from kvjudge.agents.generate import Generator
from kvjudge.cache.store import call, to_host
from kvjudge.cache.store_actor import get_store
from kvjudge.models import load_model


class _AgentActorImpl:
    def __init__(self, model: str, store_name: str | None, namespace: str | None, num_threads: int = 1) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.error: str | None = None
        self.store = None
        try:
            self.gen = Generator(load_model(model))
        except Exception as exc:  # reported by ready(); the actor stays up to say why
            self.error = " ".join(str(exc).split()) or type(exc).__name__
            return
        if store_name:
            self.store = get_store(store_name, namespace)

    def ready(self) -> dict:
        """``{"model_id", "node", "pid"}`` or ``{"error": one line}`` when the model did not load."""
        if self.error:
            return {"error": self.error, "node": ray.util.get_node_ip_address()}
        return {"model_id": self.gen.lm.model_id, "node": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def generate(self, request: dict) -> dict:
        """Run one agent turn: ``request`` holds ``agent``, ``prompt`` and sampling settings."""
        g = self.gen.generate(
            request["prompt"],
            max_new_tokens=int(request.get("max_new_tokens", 128)),
            temperature=float(request.get("temperature", 0.0)),
            seed=int(request.get("seed", 0)),
        )
        return {
            "agent": request["agent"],
            "text": g.text,
            "tokens": len(g.token_ids),
            "prompt_tokens": g.prompt_tokens,
            "seconds": g.seconds,
            "tokens_per_s": g.tokens_per_s,
            "model_id": self.gen.lm.model_id,
            "store_key": None,
        }

    def encode(self, context_ids: list[int], ids: list[int], key: str, meta: dict | None = None) -> bool:
        """Encode ``ids`` after ``context_ids`` and put the segment into the store under ``key``."""
        if self.store is None:
            return False
        seg = self.gen.encode(list(context_ids), list(ids))
        return bool(call(self.store, "put", key, to_host(seg), {**(meta or {}), "model_id": self.gen.lm.model_id}))


AgentActor = ray.remote(max_restarts=1, max_task_retries=1)(_AgentActorImpl)
