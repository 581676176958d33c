"""The judge actor: a Ray shell around :class:`~kvjudge.judges.judge.Judge`.

It looks candidate segments up in the shared KV store before encoding them, so answers whose KV the
agents already stored under the key the judge asks for (:meth:`candidate_kv_request`: after the
judge prefix, after the agent's own prompt, or alone, per candidate-KV mode) are only re-indexed.
:func:`judge_options` places it on the GPU node: ``num_gpus=1`` when the cluster has GPUs, and the
custom resource named in the topology (e.g. ``ray start --resources '{"judge": 1}'``) when one is declared.
"""

from __future__ import annotations

import ray
import torch

from kvjudge.cache.store_actor import get_segment, get_store
from kvjudge.judges.candidate import DEFAULT_MAX_NEW_TOKENS, as_candidates
from kvjudge.judges.judge import Judge
from kvjudge.judges.prompt import JudgeInputError
from kvjudge.judges.sim import SimJudge
from kvjudge.models import load_model
from kvjudge.models.sim import is_sim_spec


class _JudgeActorImpl:
    def __init__(self, model: str, method: str, options: dict, store_name: str | None, namespace: str | None,
                 num_threads: int = 1, candidate_kv: str = "judge_prefix", output: str = "label",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.error: str | None = None
        modes = dict(candidate_kv=candidate_kv, output=output, max_new_tokens=max_new_tokens)
        try:
            if is_sim_spec(model):
                self.judge: Judge | SimJudge = SimJudge(model, method=method, method_options=options, **modes)
            else:
                self.judge = Judge(load_model(model), method=method, method_options=options, **modes)
        except Exception as exc:
            self.error = " ".join(str(exc).split()) or type(exc).__name__
            return
        self.store = None
        if store_name:
            self.store = get_store(store_name, namespace)
            # segments come straight from the node that made them; anything lost is a miss (re-encoded)
            self.judge.runner.fetch = lambda key: get_segment(self.store, key)

    def ready(self) -> dict:
        if self.error:
            return {"error": self.error, "node": ray.util.get_node_ip_address()}
        lm = getattr(self.judge, "lm", None)
        return {
            "model_id": lm.model_id if lm is not None else self.judge.model_id,
            "node": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": str(lm.device) if lm is not None else "sim",
            "gpus": torch.cuda.device_count(),
        }

    def check_candidates(self, problem: str, n: int) -> str | None:
        """Why this judge cannot take ``n`` candidates (e.g. more than its single-token labels), or ``None``."""
        case = getattr(self.judge, "case", None)
        if case is None:  # the sim judge takes any number
            return None
        try:
            # the label limit does not depend on where candidate KV comes from: probe in the plainest mode
            case(problem, [f"candidate {i + 1}" for i in range(n)], candidate_kv="judge_prefix")
        except JudgeInputError as exc:
            return str(exc)
        return None

    def candidate_kv_request(self, problem: str, answer: str | dict, mode: str | None = None) -> dict:
        """What KV this judge looks up for ``answer`` (a text, or a :class:`Candidate` as a dict) in
        candidate-KV ``mode`` (see :meth:`Judge.candidate_kv_request`)."""
        return self.judge.candidate_kv_request(problem, as_candidates([answer])[0], mode=mode)

    def judge_candidates(self, problem: str, candidates: list[str | dict], sources: list[str],
                         method: str | None = None, **modes) -> dict:
        """One verdict as a dict; ``candidates`` are texts or :class:`Candidate` dicts; ``modes``:
        ``candidate_kv``, ``output``, ``max_new_tokens`` overrides for this call."""
        before = self.judge.runner.fetched
        verdict = self.judge.judge(problem, as_candidates(candidates), method=method, sources=sources, **modes)
        verdict = verdict.to_dict()
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
