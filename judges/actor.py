"""The judge actor: a Ray shell around a :class:`~kvjudge.judges.base.JudgeLike` (the real
:class:`~kvjudge.judges.judge.Judge`, or :class:`~kvjudge.judges.sim.SimJudge` for ``sim:...`` specs).

It looks candidate segments up in the shared KV store before encoding them, so answers whose KV the
agents already stored under the key the judge asks for (:meth:`candidate_kv_request`: after the
judge prefix, after the agent's own prompt, or alone, per candidate-KV mode) are only re-indexed.
:func:`judge_options` places it on the GPU node: ``num_gpus=1`` when the cluster has GPUs, and the
custom resource named in the topology (e.g. ``ray start --resources '{"judge": 1}'``) when one is declared.
Only :func:`make_judge` loads torch and transformers, for a real model: a simulated judge starts in
well under a second.
"""

from __future__ import annotations

import ray

from kvjudge.cache.store_actor import STORE_WAIT_S, get_segment, get_store
from kvjudge.judges.base import JudgeLike
from kvjudge.judges.candidate import DEFAULT_MAX_NEW_TOKENS, as_candidates
from kvjudge.judges.sim import SimJudge
from kvjudge.models.sim import is_sim_spec


def make_judge(model: str, method: str, options: dict | None = None, num_threads: int = 1, **kwargs) -> JudgeLike:
    """The judge for a model spec: simulated for ``sim:...`` (torch-free), else the real model loaded,
    with torch on ``num_threads`` CPU threads. ``kwargs``: the judge's modes and ``fetch``."""
    if is_sim_spec(model):
        return SimJudge(model, method=method, method_options=options, **kwargs)
    import torch  # the real-model path only: a simulated judge never loads torch / transformers

    from kvjudge.judges.judge import Judge
    from kvjudge.models import load_model

    torch.set_num_threads(max(1, num_threads))
    return Judge(load_model(model), method=method, method_options=options, **kwargs)


class _JudgeActorImpl:
    def __init__(self, model: str, method: str, options: dict, store_name: str | None, namespace: str | None,
                 num_threads: int = 1, candidate_kv: str = "judge_prefix", output: str = "label",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, debias: str = "none", permutations: int = 1) -> None:
        self.error: str | None = None
        try:  # ready() reports a failure here in one line, as it does a model that does not load
            self.store = get_store(store_name, namespace, wait_s=STORE_WAIT_S) if store_name else None
            # segments come straight from the node that made them; anything lost is a miss (re-encoded)
            fetch = (lambda key: get_segment(self.store, key)) if self.store is not None else None
            self.judge: JudgeLike = make_judge(model, method, options, num_threads, candidate_kv=candidate_kv,
                                               output=output, max_new_tokens=max_new_tokens, fetch=fetch,
                                               debias=debias, permutations=permutations)
        except Exception as exc:
            self.error = " ".join(str(exc).split()) or type(exc).__name__

    def ready(self) -> dict:
        if self.error:
            return {"error": self.error, "node": ray.util.get_node_ip_address()}
        return {
            "model_id": self.judge.model_id,
            "node": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": self.judge.device,
            "gpus": len(ray.get_gpu_ids()),  # the GPUs Ray gave this actor (its CUDA_VISIBLE_DEVICES)
        }

    def check_candidates(self, problem: str, n: int) -> str | None:
        """Why this judge cannot take ``n`` candidates (e.g. more than its single-token labels), or ``None``."""
        return self.judge.check_candidates(problem, n)

    def candidate_kv_request(self, problem: str, answer: str | dict, mode: str | None = None) -> dict:
        """What KV this judge looks up for ``answer`` (a text, or a :class:`Candidate` as a dict) in
        candidate-KV ``mode`` (see :meth:`Judge.candidate_kv_request`)."""
        return self.judge.candidate_kv_request(problem, as_candidates([answer])[0], mode=mode)

    def judge_candidates(self, problem: str, candidates: list[str | dict], sources: list[str],
                         method: str | None = None, **modes) -> dict:
        """One verdict as a dict; ``candidates`` are texts or :class:`Candidate` dicts; ``modes``:
        ``candidate_kv``, ``output``, ``max_new_tokens`` overrides for this call."""
        before = self.judge.fetched
        verdict = self.judge.judge(problem, as_candidates(candidates), method=method, sources=sources, **modes)
        verdict = verdict.to_dict()
        verdict["store_fetched"] = self.judge.fetched - before
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
