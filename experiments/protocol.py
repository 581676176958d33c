"""The DG-JKR evaluation protocol (paper sec. 4.1) behind ``kvjudge eval {humaneval,gsm8k,mmlu}``.

:func:`evaluate` is the protocol's steps, in order:

1. candidates are generated **once** per problem through a topology on Ray (default
   ``progressive_refinement``, N = 4 agents) and kept in ``OUT/candidates.jsonl``
   (``--candidates FILE`` skips this step) -- :mod:`.candidates`;
2. every candidate is graded once by its dataset's grader -- :mod:`.datasets`;
3. every (problem, shuffle seed, method) is judged on one in-process judge -- :mod:`.judging`;
4. the records are summarised -- :mod:`.summary` -- into ``summary.json``, ``report.md`` and plots.

Each judged triple is one line of ``OUT/results.jsonl``, flushed as soon as it exists, so
``--resume`` skips triples already there; the summary is rebuilt from all lines at the end.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch

from kvjudge.experiments.candidates import (
    CandidateSet,
    data_source,
    generate_candidates,
    generated_sets,
    generation_records,
    load_candidates,
    sampling_settings,
    with_agent_prompts,
    write_candidates,
)
from kvjudge.experiments.calibrate import calibrate_split
from kvjudge.experiments.config import PAPER_RANDOM_COVERAGE, EvalConfig
from kvjudge.experiments.datasets import describe_sample, grade_candidates, load_dataset, sandbox_for
from kvjudge.experiments.judging import judge_all, record_key, running_metrics, shown_candidates
from kvjudge.experiments.plots import write_plots
from kvjudge.experiments.report import write_report
from kvjudge.experiments.rescore import check_source, recorded_priors, rescore
from kvjudge.experiments.summary import summarize
from kvjudge.judges.judge import Judge
from kvjudge.judges.methods import make_method
from kvjudge.judges.prompt import JudgeInputError
from kvjudge.models import LoadedModel, load_model
from kvjudge.topologies import load_topology, resolve_topology
from kvjudge.runtime.manifest import check_manifest, file_digest, topology_digest
from kvjudge.runtime.results import ResultsLog
from kvjudge.runtime.telemetry import Reporter


class Progress(Protocol):
    """Progress of the judging step (the CLI draws it; ``None`` draws nothing)."""

    def start(self, total: int, label: str) -> None: ...
    def advance(self, desc: str) -> None: ...
    def close(self) -> None: ...


class _Silent:
    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0


def evaluate(cfg: EvalConfig, lm: LoadedModel | None = None, *, reporter: Reporter | None = None,
             progress: Progress | None = None, verbose: bool = True) -> dict:
    """Run the whole protocol; writes results.jsonl, candidates.jsonl, summary.json, report.md and plots.

    ``lm`` replaces loading ``cfg.model`` for judging; ``reporter`` shows candidate generation.
    """
    t_start, timings = time.perf_counter(), {}
    check_output(cfg)
    sandbox = sandbox_for(cfg.dataset, cfg.unsafe_exec)  # refuse unisolated code execution before any work
    # the sampling order (MMLU: stratified over subjects); with --candidates, --offset/--limit apply to its problems
    problems = load_dataset(cfg.dataset, path=cfg.data, limit=None if cfg.candidates else cfg.limit,
                            offset=0 if cfg.candidates else cfg.offset, sample_seed=cfg.sample_seed)
    if sandbox and verbose:  # after the data loaded: a bad row stays a one-line error
        print(f"generated code is graded in the sandbox (isolation: {sandbox})", file=sys.stderr)
    with _timed(timings, "generation_s"):
        problems, sets, source = collect_candidates(cfg, problems, reporter or _Silent(), verbose)
    with _timed(timings, "grading_s"):
        passes = grade_candidates(cfg.dataset, problems, {t: s.candidates for t, s in sets.items()},
                                  unsafe_exec=cfg.unsafe_exec)
    with _timed(timings, "model_load_s"):
        lm = lm or load_model(cfg.model, device=cfg.device)
        judge = Judge(lm, candidate_kv=cfg.candidate_kv, output=cfg.judge_output, max_new_tokens=cfg.judge_max_tokens,
                      debias=cfg.judge_debias, permutations=cfg.judge_permutations)
    judge.configure(cfg.method_options)  # --method-option
    problems, skipped = judgeable(judge, problems, sets)
    calibration = None
    if cfg.calibrate_on:  # priors from the first K problems, which are then left out of judging and scoring
        with _timed(timings, "calibration_s"):
            calibration = calibrate_split(judge, problems, sets, cfg.calibrate_on, cfg.methods, cfg.judge_debias)
        problems = problems[cfg.calibrate_on:]
    recorded = None if cfg.rescore_from is None else check_source(cfg.rescore_from, eval_manifest(cfg))
    judge.check_priors(cfg.methods, [len(sets[str(p["id"])].candidates) for p in problems],  # all missing, one line
                       {"random_gate": make_method("random_gate", arm=cfg.gate_arm)})  # as judge_all will run it
    task_ids = [str(p["id"]) for p in problems]
    log = ResultsLog(cfg.out / "results.jsonl", key=record_key)
    bar = progress or _Silent()
    try:
        if cfg.rescore_from is not None:  # the same forward passes under another prior: no judging
            rescored = rescore(judge, recorded, log, task_ids, cfg.seeds,
                               cfg.methods, passes, str(cfg.rescore_from), recorded_priors(Path(cfg.rescore_from)))
            if verbose:
                print(f"re-scored {rescored} calls of {cfg.rescore_from}", file=sys.stderr)
        todo = sum(1 for s in cfg.seeds for t in task_ids for m in cfg.methods if (t, s, m) not in log)
        bar.start(todo, f"eval {cfg.dataset}")
        with _timed(timings, "judging_s"):
            used = judge_all(judge, problems, sets, passes, cfg.seeds, cfg.methods, log,
                             lambda desc: bar.advance(f"{desc} · {running_metrics(log)}"), gate_arm=cfg.gate_arm,
                             compress=cfg.compress)
    finally:
        bar.close()
        log.close()
    lengths = {t: [len(lm.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in sets[t].candidates]
               for t in task_ids}
    summary = summarize(log, task_ids, cfg.seeds, cfg.methods, lengths, dataset=cfg.dataset,
                        candidates={t: sets[t].candidates for t in task_ids}, passes=passes)
    timings["total_s"] = time.perf_counter() - t_start
    config = run_config(cfg, lm, sets, task_ids, passes, source, used, skipped, timings)
    config["sandbox_isolation"] = sandbox
    config.update(judge_debias=cfg.judge_debias, judge_permutations=cfg.judge_permutations, calibration=calibration,
                  rescore_from=None if cfg.rescore_from is None else str(cfg.rescore_from))
    config.update(offset=cfg.offset, sample_seed=cfg.sample_seed, **sampling_settings(cfg),
                  sample=describe_sample(cfg.dataset, problems, cfg.limit, cfg.offset, cfg.sample_seed))
    summary = {"config": config, **summary}
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_plots(summary, cfg.out)
    write_report(summary, cfg.out)
    return summary


def check_output(cfg: EvalConfig) -> None:
    """Refuse to overwrite results without ``--resume``; make the output folder."""
    results_path = cfg.out / "results.jsonl"
    if results_path.exists() and not cfg.resume:
        raise ValueError(f"{results_path} exists: pass --resume to continue it, or choose another --out")
    if cfg.candidates is not None and not cfg.candidates.is_file():
        raise ValueError(f"--candidates: file not found: {cfg.candidates}")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise ValueError(f"--out {cfg.out} is not a folder")
    cfg.out.mkdir(parents=True, exist_ok=True)
    written = [cfg.out / "results.jsonl", cfg.out / "candidates.jsonl", cfg.out / "generation" / "results.jsonl"]
    check_manifest(cfg.out, eval_manifest(cfg), any(p.is_file() and p.stat().st_size for p in written))


def eval_manifest(cfg: EvalConfig) -> dict:
    """What the folder's records depend on (see :mod:`kvjudge.runtime.manifest`): a resume with any
    other value is refused; seeds, methods and ``--limit`` may grow."""
    try:
        topo = load_topology(resolve_topology(cfg.topology))
        name, topo_hash = topo.name, topology_digest(topo)
    except ValueError:  # with --candidates the topology only labels the regime
        name, topo_hash = cfg.topology, None
    generated = cfg.candidates is None
    return {"command": "eval", "dataset": cfg.dataset, "data": data_source(cfg), "topology": name,
            "model": cfg.model, "candidate_kv": cfg.candidate_kv,
            "judge_output": cfg.judge_output,
            "judge_max_tokens": cfg.judge_max_tokens if cfg.judge_output == "generate" else None,
            "compress": cfg.compress, "gate_arm": cfg.gate_arm, "judge_debias": cfg.judge_debias,
            "judge_permutations": cfg.judge_permutations, "calibrate_on": cfg.calibrate_on,
            "candidates": "generated" if generated else file_digest(cfg.candidates),
            "temperature": getattr(cfg, "temperature", None) if generated else None,
            "generation_seed": getattr(cfg, "generation_seed", None) if generated else None,
            "method_options": cfg.method_options or None,  # e.g. partial's K: its records and prior
            "topology_hash": topo_hash}  # last: a difference is named by the most specific field


def collect_candidates(cfg: EvalConfig, problems: list[dict], reporter: Reporter,
                       verbose: bool) -> tuple[list[dict], dict[str, CandidateSet], str]:
    """``(problems that have candidates, their sets, where the sets came from)``; writes candidates.jsonl.

    With ``--candidates`` the file is read; otherwise missing sets are generated. A resumed run keeps
    every set it has (judged verdicts refer to them) and generates only problems never tried: those a
    larger ``--limit`` adds. Problems whose generation failed are not retried (start a new ``--out``).
    """
    if not problems:
        raise ValueError(f"data set {cfg.dataset!r} holds no problems")
    cand_path = cfg.out / "candidates.jsonl"
    texts = {str(p["id"]): p["prompt"] for p in problems}
    if cfg.candidates is not None:
        sets = load_candidates(cfg.candidates)
        check_task_ids(cfg, sets, problems)
        problems = [p for p in problems if str(p["id"]) in sets]
        if not problems:
            raise ValueError(f"--candidates: no task_id of {cfg.candidates} is a {cfg.dataset} problem")
        problems = problems[cfg.offset:][: cfg.limit] if cfg.limit is not None else problems[cfg.offset:]
        if not problems:
            raise ValueError(f"--offset {cfg.offset}: skips every problem of --candidates")
        if cfg.candidate_kv == "agent":  # files written before prompts were kept: rebuild them from the topology
            with_agent_prompts({str(p["id"]): sets[str(p["id"])] for p in problems}, texts,
                               load_topology(resolve_topology(cfg.topology)))
        if cfg.candidates.resolve() != cand_path.resolve():
            write_candidates(cand_path, [sets[str(p["id"])] for p in problems])
        return problems, sets, str(cfg.candidates)
    gen_dir = cfg.out / "generation"
    have = load_candidates(cand_path) if cfg.resume and cand_path.is_file() else {}
    tried = {str(r.get("id")) for r in generation_records(gen_dir)} if cfg.resume else set()
    todo = [p for p in problems if str(p["id"]) not in have and str(p["id"]) not in tried]
    if todo:
        generate_candidates(cfg, todo, reporter)
    sets = {**generated_sets(gen_dir, texts), **have}
    if not any(str(p["id"]) in sets for p in problems):
        raise ValueError(f"generation produced no candidates (see {gen_dir / 'results.jsonl'})")
    failed = sum(str(p["id"]) not in sets for p in problems)
    if failed and verbose:
        print(f"{failed} problem(s) without candidates (generation failed) are left out", file=sys.stderr)
    problems = [p for p in problems if str(p["id"]) in sets]
    write_candidates(cand_path, [sets[str(p["id"])] for p in problems])
    return problems, sets, (f"generated with {cfg.topology}" if todo or not have else str(cand_path))


def check_task_ids(cfg: EvalConfig, sets: dict[str, CandidateSet], problems: list[dict]) -> None:
    """A one-line error naming the line of the first candidate set whose task id is not a problem of
    the data set (a typo such as ``humaneval/1`` would otherwise drop the set without a word)."""
    known = {str(p["id"]) for p in problems}
    for tid, cs in sets.items():
        if tid not in known:
            hint = f" (its ids look like {str(problems[0]['id'])!r})" if problems else ""
            raise ValueError(f"{cfg.candidates}:{cs.line}: task_id {tid!r} is not a {cfg.dataset} problem{hint}")


def judgeable(judge: Judge, problems: list[dict], sets: dict[str, CandidateSet]) -> tuple[list[dict], dict]:
    """The problems the judge can take (prompt fits, labels exist), and why the others were skipped."""
    skipped: dict[str, str] = {}
    usable = []
    for p in problems:
        cs = sets[str(p["id"])]
        shown, _ = shown_candidates(cs, range(len(cs.candidates)), judge.candidate_kv, judge.lm.model_id)
        try:
            judge.case(p["prompt"], shown)
            usable.append(p)
        except JudgeInputError as exc:
            skipped[str(p["id"])] = str(exc)
    if not usable:
        raise ValueError(f"no problem can be judged: {next(iter(skipped.values()))}")
    return usable, skipped


def run_config(cfg: EvalConfig, lm: LoadedModel, sets: dict[str, CandidateSet], task_ids: list[str],
               passes: dict[str, list[bool]], source: str, used: dict[int, float], skipped: dict,
               timings: dict[str, float]) -> dict:
    """The ``config`` block of ``summary.json``: what ran, on what, and how long each step took."""
    all_pass = [x for t in task_ids for x in passes[t]]
    gate = "random_gate" in cfg.methods
    return {
        "dataset": cfg.dataset, "topology": cfg.topology, "model": cfg.model, "model_id": lm.model_id,
        "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),  # latencies on a CPU depend on it
        "methods": list(cfg.methods), "seeds": list(cfg.seeds), "limit": cfg.limit,
        "candidate_kv": cfg.candidate_kv, "judge_output": cfg.judge_output,
        "judge_max_tokens": cfg.judge_max_tokens if cfg.judge_output == "generate" else None,
        "random_gate_arm": cfg.gate_arm if gate else None,
        "compress": cfg.compress,
        "method_options": cfg.method_options,
        "n_problems": len(task_ids), "n_candidates": sorted({len(sets[t].candidates) for t in task_ids}),
        "candidates": source, "data": cfg.data,
        "random_gate_coverage": {str(s): c for s, c in used.items()} or None,
        "random_gate_coverage_source": (("dg_jkr agreement rate per seed" if "dg_jkr" in cfg.methods
                                         else f"paper ({PAPER_RANDOM_COVERAGE})") if gate else None),
        "candidate_pass_rate": (sum(all_pass) / len(all_pass)) if all_pass else None,
        "skipped": skipped,
        "timings_s": timings,
    }
