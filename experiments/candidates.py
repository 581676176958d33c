"""Candidate sets: generated once per problem through a topology, kept in ``candidates.jsonl``.

A line is ``{"task_id", "candidates": [texts], "sources": [agent ids], "problem"?}``; a line that
carries its own ``problem`` text needs no dataset to be judged again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kvjudge.experiments.config import EvalConfig
from kvjudge.experiments.data import IdRegistry, iter_jsonl
from kvjudge.topologies import load_topology, resolve_topology
from kvjudge.runtime.manifest import file_digest
from kvjudge.runtime.results import read_records
from kvjudge.topologies.plan import ProblemPlan
from kvjudge.runtime.runner import RunError, run
from kvjudge.topologies.schema import JudgeSpec, Topology
from kvjudge.runtime.telemetry import Reporter


@dataclass
class CandidateSet:
    """One problem's candidates (original order), the agent that wrote each, and what each agent's KV
    was computed under: its prompt text (any model), and its prompt and answer token ids under
    ``model_id`` (a judge on that very model rebuilds the agent KV from them exactly)."""

    task_id: str
    candidates: list[str]
    sources: list[str]
    problem: str | None = None
    agent_prompts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    prompt_ids: list[list[int]] | None = None
    model_id: str | None = None
    line: int | None = field(default=None, compare=False)  # where a candidates file holds it (messages)

    def candidate(self, i: int, model_id: str | None = None) -> dict:
        """Candidate ``i`` for an ``agent``-mode judge on ``model_id`` (a :class:`Candidate` as a dict)."""
        if self.token_ids and self.prompt_ids and model_id and model_id == self.model_id:
            return {"text": self.candidates[i], "token_ids": self.token_ids[i], "prompt_ids": self.prompt_ids[i]}
        if self.agent_prompts:
            return {"text": self.candidates[i], "agent_prompt": self.agent_prompts[i]}
        raise ValueError(f"candidates of {self.task_id!r} have no \"agent_prompts\": the agent candidate-KV mode "
                         "needs each candidate's agent prompt (use --candidate-kv judge_prefix or isolated)")


def load_candidates(path: str | Path) -> dict[str, CandidateSet]:
    """Read ``{"task_id", "candidates": [texts], "sources": [agent ids]}`` lines (``sources`` optional).

    Each ``task_id`` once (a string, or an integer read as its digits; ``1`` and ``"1"`` are the same
    id, so both in one file is an error naming the lines); texts are valid Unicode (no lone surrogate);
    ``token_ids`` / ``prompt_ids`` are lists of non-negative integers (the judge checks them against
    its vocabulary and the candidate's text)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"--candidates: file not found: {path}")
    out: dict[str, CandidateSet] = {}
    ids = IdRegistry(path, "task_id")
    for n, rec in iter_jsonl(path):
        if not isinstance(rec, dict) or "task_id" not in rec:
            raise ValueError(f"{path}:{n}: each line needs a \"task_id\" and a list \"candidates\"")
        tid = ids.add(rec["task_id"], n)
        cands = rec.get("candidates")
        if not isinstance(cands, list) or not cands or not all(isinstance(c, str) for c in cands):
            raise ValueError(f"{path}:{n}: \"candidates\" must be a non-empty list of strings")
        sources = rec.get("sources") or [f"candidate-{i + 1}" for i in range(len(cands))]
        if not isinstance(sources, list) or len(sources) != len(cands):
            raise ValueError(f"{path}:{n}: {len(sources) if isinstance(sources, list) else 'no'} sources "
                             f"for {len(cands)} candidates")
        problem = rec.get("problem")
        if problem is not None and not isinstance(problem, str):
            raise ValueError(f"{path}:{n}: \"problem\" must be a string")
        extra = {}
        for key, kind in (("agent_prompts", str), ("token_ids", list), ("prompt_ids", list)):
            value = rec.get(key)
            if value is None:
                continue
            if not isinstance(value, list) or len(value) != len(cands) or not all(isinstance(v, kind) for v in value):
                raise ValueError(f"{path}:{n}: \"{key}\" must be a list with one entry per candidate")
            if kind is list and not all(_token_list(v) for v in value):
                raise ValueError(f"{path}:{n}: \"{key}\" must hold lists of token ids (integers >= 0)")
            extra[key] = value
        out[tid] = CandidateSet(tid, list(cands), [str(s) for s in sources], problem,
                                model_id=rec.get("model_id"), line=n, **extra)
    if not out:
        raise ValueError(f"--candidates: {path} holds no candidates")
    return out


def _token_list(value: list) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def write_candidates(path: Path, sets: Iterable[CandidateSet]) -> None:
    """Write ``sets`` atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for cs in sets:
            line = {"task_id": cs.task_id, "candidates": cs.candidates, "sources": cs.sources}
            for key in ("problem", "agent_prompts", "token_ids", "prompt_ids", "model_id"):
                if getattr(cs, key) is not None:
                    line[key] = getattr(cs, key)
            fh.write(json.dumps(line) + "\n")
    tmp.replace(path)


def with_agent_prompts(sets: dict[str, CandidateSet], problems: dict[str, str], topology: Topology) -> int:
    """Fill in the agent prompts of sets that lack them, rebuilt from ``topology``'s templates and the
    sets' own answers (the prompts are a pure function of the problem and the upstream answers, see
    :mod:`kvjudge.topologies.plan`); returns how many sets were filled. Only one-round topologies
    whose candidates are every agent's answer in topology order can be rebuilt this way."""
    agents = list(topology.agents)
    filled = 0
    for tid, cs in sets.items():
        if cs.agent_prompts is not None or tid not in problems:
            continue
        if topology.rounds != 1 or cs.sources != agents:
            raise ValueError(f"candidates of {tid!r} have no agent prompts and cannot be rebuilt from topology "
                             f"{topology.name!r} (needs one round and sources {agents}); use --candidate-kv "
                             "judge_prefix or isolated")
        plan, prompts = ProblemPlan(topology, problems[tid]), {}
        while not plan.done:
            for req in plan.ready():
                prompts[req["agent"]] = req["prompt"]
                plan.answer(req["agent"], cs.candidates[agents.index(req["agent"])])
        cs.agent_prompts = [prompts[a] for a in agents]
        filled += 1
    return filled


def with_temperature(topo: Topology, temperature: float | None, seed: int = 0) -> Topology:
    """``topo`` with every agent sampling at ``temperature`` (``None``: unchanged), agent ``i`` (topology
    order) seeded ``seed + 1000 * i`` so that each agent draws its own reproducible stream (the plan adds
    the round to it)."""
    if temperature is None:
        return topo
    return topo.with_overrides(agents={name: {"temperature": float(temperature), "seed": int(seed) + 1000 * i}
                                       for i, name in enumerate(topo.agents)})


def sampling_settings(cfg: EvalConfig) -> dict:
    """What ``summary.json`` records of how candidates were sampled: the temperature and generation
    seed asked for, and each agent's resulting ``{"temperature", "seed"}``."""
    if cfg.candidates is not None:  # the candidates were made elsewhere: nothing known of their sampling
        return {"temperature": None, "generation_seed": None, "agent_sampling": None}
    topo = with_temperature(load_topology(resolve_topology(cfg.topology)), cfg.temperature, cfg.generation_seed)
    agents = {a: {"temperature": topo.agent_spec(a).temperature, "seed": topo.agent_spec(a).seed} for a in topo.agents}
    return {"temperature": cfg.temperature, "generation_seed": cfg.generation_seed if cfg.temperature is not None
            else None, "agent_sampling": agents}


def generate_candidates(cfg: EvalConfig, problems: list[dict], reporter: Reporter) -> None:
    """Run ``problems`` through the topology on Ray (every agent at ``cfg.temperature`` when set, see
    :func:`with_temperature`), appending to ``OUT/generation/results.jsonl`` (resumable);
    :func:`generated_sets` reads what it produced."""
    topo = with_temperature(load_topology(resolve_topology(cfg.topology)), cfg.temperature, cfg.generation_seed)
    # The pipeline's own judge is not what we measure: dense keeps generation cheap, and "agent" KV mode
    # asks the agents for no extra prefill (what the eval needs of them is their prompt and answer ids).
    topo = topo.with_overrides(judge=JudgeSpec(method="dense", candidate_kv="agent"))
    try:
        run(topo, problems, cfg.out / "generation", model=cfg.model, resume=cfg.resume, reporter=reporter,
            source=data_source(cfg))
    except RunError as exc:
        raise ValueError(f"generation: {exc}") from exc


def data_source(cfg: EvalConfig) -> str:
    """Where the eval's problems come from, for the folder's manifest: the dataset's package, or a
    ``--data`` file by its hash."""
    if not cfg.data:
        return f"{cfg.dataset} package"
    path = Path(cfg.data).expanduser()
    if not path.is_file():
        raise ValueError(f"--data: file not found: {path}")
    return f"{cfg.dataset} file:{file_digest(path)}"


def generation_records(gen_dir: Path) -> list[dict]:
    """Every record of the generation run in ``gen_dir`` (torn lines skipped)."""
    return read_records(gen_dir / "results.jsonl")


def generated_sets(gen_dir: Path, problems: dict[str, str] | None = None) -> dict[str, CandidateSet]:
    """Candidate sets of the problems a generation run in ``gen_dir`` finished ("ok" records);
    ``problems`` (id -> text) fills each set's ``problem``."""
    sets: dict[str, CandidateSet] = {}
    for rec in generation_records(gen_dir):
        if rec.get("status") != "ok":
            continue
        cands = rec["candidates"]
        tid = str(rec["id"])
        has = lambda key: all(c.get(key) is not None for c in cands)  # noqa: E731
        models = {c.get("model_id") for c in cands}
        ids_ok = has("token_ids") and has("prompt_ids") and len(models) == 1
        sets[tid] = CandidateSet(
            tid, [c["text"] for c in cands],
            [str(c.get("agent", f"candidate-{i + 1}")) for i, c in enumerate(cands)],
            (problems or {}).get(tid),
            agent_prompts=[c["agent_prompt"] for c in cands] if has("agent_prompt") else None,
            token_ids=[c["token_ids"] for c in cands] if ids_ok else None,
            prompt_ids=[c["prompt_ids"] for c in cands] if ids_ok else None,
            model_id=next(iter(models)) if ids_ok else None,
        )
    return sets
