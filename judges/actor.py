"""The judge actor: a Ray shell around :class:`~kvjudge.judges.judge.Judge`.

It looks candidate segments up in the shared KV store before encoding them, so answers that the
agents already encoded after the judge prefix are only re-indexed. :func:`judge_options` places it
on the GPU node: ``num_gpus=1`` when the cluster has GPUs, and the custom resource named in the
topology (e.g. ``ray start --resources '{"judge": 1}'``) when one is declared.
"""

from __future__ import annotations

import ray
import torch

from kvjudge.cache.store import call
from kvjudge.cache.store_actor import get_store
from kvjudge.judges.judge import Judge
from kvjudge.models import load_model


class _JudgeActorImpl:
    def __init__(self, model: str, method: str, options: dict, store_name: str | None, namespace: str | None,
                 num_threads: int = 1) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.error: str | None = None
        try:
            self.judge = Judge(load_model(model), method=method, method_options=options)
        except Exception as exc:
            self.error = " ".join(str(exc).split()) or type(exc).__name__
            return
        self.store = None
        if store_name:
            self.store = get_store(store_name, namespace)
            self.judge.runner.fetch = lambda key: call(self.store, "get", key)

    def ready(self) -> dict:
        if self.error:
            return {"error": self.error, "node": ray.util.get_node_ip_address()}
        return {
            "model_id": self.judge.lm.model_id,
            "node": ray.util.get_node_ip_address(),
            "device": str(self.judge.lm.device),
            "gpus": torch.cuda.device_count(),
        }

    def candidate_kv_request(self, problem: str, answer: str) -> dict:
        """What an agent should encode so this judge can reuse ``answer``'s KV (see :meth:`Judge.candidate_kv_request`)."""
        return self.judge.candidate_kv_request(problem, answer)

    def judge_candidates(self, problem: str, candidates: list[str], sources: list[str], method: str | None = None) -> dict:
        before = self.judge.runner.fetched
        verdict = self.judge.judge(problem, candidates, method=method, sources=sources).to_dict()
        verdict["store_fetched"] = self.judge.runner.fetched - before
        return verdict


JudgeActor = ray.remote(max_restarts=1, max_task_retries=1)(_JudgeActorImpl)


def judge_options(judge_resource: str | None, num_gpus: float | str = "auto") -> dict:
    """Ray actor options that put the judge on the GPU node (and on the ``judge`` resource if declared)."""
    opts: dict = {}
    if num_gpus == "auto":
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    if num_gpus:
        opts["num_gpus"] = float(num_gpus)
    if judge_resource:
        if ray.cluster_resources().get(judge_resource, 0) <= 0:
            raise ValueError(
                f"the topology asks for the custom resource {judge_resource!r} for the judge, but no node has it "
                f"(start one with: ray start --resources '{{\"{judge_resource}\": 1}}')"
            )
        opts["resources"] = {judge_resource: 1}
    return opts
