"""The agent actor: a Ray shell around :class:`~kvjudge.agents.generate.Generator`.

One actor holds one model copy. The orchestrator starts one actor per distinct model per run
(``replicas`` of them if asked) and routes every agent of the topology that uses that model to it,
so agents that share a model share one copy on a node instead of loading it once each; an agent's
identity (its prompt, sampling settings, results) lives in the request, not in the actor.
"""

from __future__ import annotations

import os

import ray

from kvjudge.cache.store import call, to_host


class _AgentActorImpl:
    def __init__(self, model: str, store_name: str | None, namespace: str | None, num_threads: int = 1) -> None:
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.error: str | None = None
        self.store = None
        try:
            from kvjudge.agents.generate import Generator
            from kvjudge.agents.models import load_model

            self.gen = Generator(load_model(model))
        except Exception as exc:  # reported by ready(); the actor stays up to say why
            self.error = " ".join(str(exc).split()) or type(exc).__name__
            return
        if store_name:
            from kvjudge.cache.store_actor import get_store

            self.store = get_store(store_name, namespace)

    def ready(self) -> dict:
        """``{"model_id", "node", "pid"}`` or ``{"error": one line}`` when the model did not load."""
        if self.error:
            return {"error": self.error, "node": ray.util.get_node_ip_address()}
        return {"model_id": self.gen.lm.model_id, "node": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def generate(self, request: dict) -> dict:
        """Run one agent turn; publish the answer's judge-context KV to the store when asked."""
        g = self.gen.generate(
            request["prompt"],
            max_new_tokens=int(request.get("max_new_tokens", 128)),
            temperature=float(request.get("temperature", 0.0)),
            seed=int(request.get("seed", 0)),
        )
        out = {
            "agent": request["agent"],
            "text": g.text,
            "tokens": len(g.token_ids),
            "prompt_tokens": g.prompt_tokens,
            "seconds": g.seconds,
            "tokens_per_s": g.tokens_per_s,
            "model_id": self.gen.lm.model_id,
            "store_key": None,
        }
        if self.store is not None and request.get("publish") and request.get("problem"):
            key, seg = self.gen.encode_for_judge(request["problem"], g.text)
            meta = {"agent": request["agent"], "kind": "judge-candidate", "model_id": self.gen.lm.model_id}
            if call(self.store, "put", key, to_host(seg), meta):
                out["store_key"] = key
        return out


AgentActor = ray.remote(max_restarts=1, max_task_retries=1)(_AgentActorImpl)
