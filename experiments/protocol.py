"""The DG-JKR evaluation protocol (paper sec. 4.1) behind ``kvjudge eval {humaneval,gsm8k,mmlu}``.

1. Candidates are generated **once** per problem through a topology on Ray (default
   ``progressive_refinement``, N = 4 agents) and saved to ``OUT/candidates.jsonl``
   (``--candidates FILE`` skips this step).
2. Every candidate is graded once (HumanEval: sandboxed unit tests, 2 threads; GSM8K: final
   number; MMLU: letter).
3. For each shuffle seed the candidates of each problem are permuted with
   ``random.Random(f"{seed}:{task_id}")`` and Dense Prefill plus every requested method judge
   the **same** permutation on one in-process :class:`~kvjudge.judges.judge.Judge` (candidate
   KV is encoded once and only re-indexed afterwards). Winners are mapped back to the original
   candidate index before they are compared with Dense Prefill's.
4. ``random_gate`` is coverage-matched: its coverage on a seed is DG-JKR's agreement rate on
   that seed (DG-JKR runs first), or the paper's 0.83 when DG-JKR is not requested.

Each judged (problem, seed, method) triple is one line of ``OUT/results.jsonl``, flushed as
soon as it exists, so ``--resume`` skips triples already there. ``OUT/summary.json``,
``OUT/report.md`` and the plots are rebuilt from all lines at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kvjudge.experiments import metrics as M
from kvjudge.experiments.data import iter_jsonl

__all__ = [
    "DEFAULT_METHODS", "DEFAULT_SEEDS", "PAPER_RANDOM_COVERAGE", "EvalConfig", "CandidateSet", "ResultsLog",
    "parse_methods", "parse_seeds", "permutation", "to_original", "gate_seed", "load_candidates",
    "write_candidates", "grade_candidates", "judge_all", "summarize", "evaluate", "add_eval_command", "cmd_eval",
]

DEFAULT_METHODS: tuple[str, ...] = ("dense", "naive", "kvcomm", "pal_kv", "random_gate", "dg_jkr")
DEFAULT_SEEDS: tuple[int, ...] = (42, 123, 456)
PAPER_RANDOM_COVERAGE = 0.83
GATES = {"dg_jkr": "agreed", "random_gate": "accepted"}  # gated method -> decision key of "reuse accepted"


# ---------------------------------------------------------------------------------------------- config

@dataclass
class EvalConfig:
    """Everything one ``kvjudge eval`` run needs (paths may be str or Path)."""

    dataset: str
    out: Path
    topology: str = "progressive_refinement"
    model: str = "smollm2-135m"
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    limit: int | None = None
    candidates: Path | None = None
    data: str | None = None
    resume: bool = False
    device: str | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.candidates = Path(self.candidates) if self.candidates else None
        self.methods = tuple(parse_methods(self.methods))
        self.seeds = tuple(parse_seeds(self.seeds))
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")


def parse_methods(spec: str | Iterable[str]) -> list[str]:
    """``"naive,dg_jkr"`` (or a list) -> known method names, dense first, duplicates dropped."""
    from kvjudge.judges.methods import known_methods

    names = [m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec) if str(m).strip()]
    if not names:
        raise ValueError("--methods is empty: name at least one judge method")
    known = known_methods()
    bad = [m for m in names if m not in known]
    if bad:
        raise ValueError(f"unknown judge method {bad[0]!r} in --methods; known methods: {', '.join(known)}")
    out = ["dense"]
    for m in names:
        if m not in out:
            out.append(m)
    return out


def parse_seeds(spec: str | Iterable[int]) -> list[int]:
    """``"42,123,456"`` (or a list) -> distinct integer seeds, in order."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    seeds: list[int] = []
    for p in parts:
        text = str(p).strip()
        if not text:
            continue
        try:
            s = int(text)
        except ValueError:
            raise ValueError(f"--seeds: {text!r} is not an integer (expected e.g. 42,123,456)") from None
        if s in seeds:
            raise ValueError(f"--seeds: seed {s} given twice")
        seeds.append(s)
    if not seeds:
        raise ValueError("--seeds is empty: give at least one integer seed, e.g. 42,123,456")
    return seeds


# ---------------------------------------------------------------------------------------------- shuffles

def permutation(seed: int, task_id: str, n: int) -> list[int]:
    """The shuffle of ``n`` candidates for (``seed``, ``task_id``): ``perm[slot] = original index``
    (slot 0-based, display order)."""
    perm = list(range(n))
    random.Random(f"{seed}:{task_id}").shuffle(perm)
    return perm


def to_original(perm: Sequence[int], winner_slot: int) -> int:
    """Map a 1-based display slot (``Verdict.winner``) back to the original 0-based candidate index."""
    if not 1 <= winner_slot <= len(perm):
        raise ValueError(f"winner slot {winner_slot} outside 1..{len(perm)}")
    return int(perm[winner_slot - 1])


def gate_seed(seed: int, task_id: str) -> int:
    """The random gate's seed for one (shuffle seed, problem): independent of run order, so a
    resumed run draws exactly what an uninterrupted one would."""
    # a 64-bit hash: crc32 seeds of near-identical strings gave visibly correlated first draws
    # (60 of 60 below 0.87 on one run)
    return int.from_bytes(hashlib.sha256(f"random_gate:{seed}:{task_id}".encode()).digest()[:8], "little")


# ---------------------------------------------------------------------------------------------- candidates

@dataclass
class CandidateSet:
    """One problem's candidates (original order) and the agent that wrote each."""

    task_id: str
    candidates: list[str]
    sources: list[str]


def load_candidates(path: str | Path) -> dict[str, CandidateSet]:
    """Read ``{"task_id", "candidates": [texts], "sources": [agent ids]}`` lines (``sources`` optional)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"--candidates: file not found: {path}")
    out: dict[str, CandidateSet] = {}
    for n, rec in iter_jsonl(path):
        if not isinstance(rec, dict) or "task_id" not in rec:
            raise ValueError(f"{path}:{n}: each line needs a \"task_id\" and a list \"candidates\"")
        cands = rec.get("candidates")
        if not isinstance(cands, list) or not cands or not all(isinstance(c, str) for c in cands):
            raise ValueError(f"{path}:{n}: \"candidates\" must be a non-empty list of strings")
        sources = rec.get("sources") or [f"candidate-{i + 1}" for i in range(len(cands))]
        if not isinstance(sources, list) or len(sources) != len(cands):
            raise ValueError(f"{path}:{n}: {len(sources) if isinstance(sources, list) else 'no'} sources "
                             f"for {len(cands)} candidates")
        tid = str(rec["task_id"])
        out[tid] = CandidateSet(tid, list(cands), [str(s) for s in sources])
    if not out:
        raise ValueError(f"--candidates: {path} holds no candidates")
    return out


def write_candidates(path: Path, sets: Iterable[CandidateSet]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for cs in sets:
            fh.write(json.dumps({"task_id": cs.task_id, "candidates": cs.candidates, "sources": cs.sources}) + "\n")
    tmp.replace(path)


def generate_candidates(cfg: EvalConfig, problems: list[dict]) -> None:
    """Run ``problems`` through the topology on Ray, appending to ``OUT/generation/results.jsonl``
    (resumable); :func:`generated_sets` reads what it produced."""
    from kvjudge.app.commands import choose_reporter
    from kvjudge.app.runtime import PlainReporter, RunError, run
    from kvjudge.topologies import load_topology, resolve_topology
    from kvjudge.topologies.schema import JudgeSpec

    topo = load_topology(resolve_topology(cfg.topology))
    # The pipeline's own judge is not what we measure: dense keeps generation cheap.
    topo = topo.model_copy(update={"judge": JudgeSpec(method="dense")})
    try:
        # the live dashboard on a terminal, plain lines on stderr otherwise
        reporter = choose_reporter(False) if sys.stdout.isatty() else PlainReporter(stream=sys.stderr)
        run(topo, problems, cfg.out / "generation", model=cfg.model, resume=cfg.resume, reporter=reporter)
    except RunError as exc:
        raise ValueError(f"generation: {exc}") from exc


def _generation_records(gen_dir: Path) -> list[dict]:
    from kvjudge.app.runtime import ResultsFile

    return ResultsFile(gen_dir / "results.jsonl").records()


def generated_sets(gen_dir: Path) -> dict[str, CandidateSet]:
    """Candidate sets of the problems a generation run in ``gen_dir`` finished ("ok" records)."""
    sets: dict[str, CandidateSet] = {}
    for rec in _generation_records(gen_dir):
        if rec.get("status") != "ok":
            continue
        cands = rec["candidates"]
        sets[str(rec["id"])] = CandidateSet(str(rec["id"]), [c["text"] for c in cands],
                                            [str(c.get("agent", f"candidate-{i + 1}")) for i, c in enumerate(cands)])
    return sets


# ---------------------------------------------------------------------------------------------- grading

def grade_candidates(dataset: str, problems: Sequence[dict], sets: dict[str, CandidateSet],
                     workers: int = 2) -> dict[str, list[bool]]:
    """Pass/fail of every candidate, once: ``{task_id: [passed per original candidate]}``."""
    from kvjudge.experiments.data import check_gsm8k, check_mmlu

    key = dataset.lower()
    out: dict[str, list[bool]] = {}
    if key == "humaneval":
        from kvjudge.experiments.sandbox import check_humaneval

        jobs = [(p, i, text) for p in problems for i, text in enumerate(sets[str(p["id"])].candidates)]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(pool.map(lambda job: check_humaneval(job[0], job[2]).passed, jobs))
        for p in problems:
            out[str(p["id"])] = [False] * len(sets[str(p["id"])].candidates)
        for (p, i, _), ok in zip(jobs, results):
            out[str(p["id"])][i] = bool(ok)
        return out
    check: Callable[[str, str], bool] = check_gsm8k if key == "gsm8k" else check_mmlu
    for p in problems:
        out[str(p["id"])] = [bool(check(text, p["answer"])) for text in sets[str(p["id"])].candidates]
    return out


# ---------------------------------------------------------------------------------------------- results

class ResultsLog:
    """``OUT/results.jsonl``: one flushed line per (task_id, seed, method); a torn line is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records: dict[tuple[str, int, str], dict] = {}
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):  # a line torn by a crash: drop it so appends start clean
                text = text[: text.rfind("\n") + 1]
                with self.path.open("r+", encoding="utf-8") as fh:
                    fh.truncate(len(text.encode("utf-8")))
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                    self.records[(str(rec["task_id"]), int(rec["seed"]), str(rec["method"]))] = rec
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue

    def __contains__(self, key: tuple[str, int, str]) -> bool:
        return key in self.records

    def get(self, key: tuple[str, int, str]) -> dict | None:
        return self.records.get(key)

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.records[(str(record["task_id"]), int(record["seed"]), str(record["method"]))] = record


class _Progress:
    """A rich progress bar on stderr, or plain lines when stderr is not a terminal."""

    def __init__(self, total: int, label: str = "judging", enabled: bool = True) -> None:
        self.total, self.done, self.label, self.enabled = total, 0, label, enabled
        self._bar = None
        self._last_pct = -1
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(label, total=total)

    def advance(self, desc: str, log: "ResultsLog | None" = None) -> None:
        self.done += 1
        if not self.enabled:
            return
        if log is not None:
            desc = f"{desc} · {running_metrics(log)}"
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=f"{self.label} {desc}")
            return
        pct = int(100 * self.done / max(1, self.total))
        if pct // 10 != self._last_pct // 10 or self.done == self.total:
            self._last_pct = pct
            print(f"{self.label}: {self.done}/{self.total} ({pct}%) {desc}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _record(task_id: str, seed: int, perm: list[int], verdict, passes: list[bool], dense: dict | None,
            extra: dict | None = None) -> dict:
    orig = to_original(perm, verdict.winner)
    rec = {
        "task_id": task_id,
        "seed": seed,
        "method": verdict.method,
        "permutation": list(perm),
        "winner_slot": int(verdict.winner),
        "winner_original": orig,
        "passed": bool(passes[orig]),
        "consistent": True if dense is None else orig == dense["winner_original"],
        "reused": bool(verdict.reused),
        "latency_ms": float(verdict.latency_ms),
        "decision": verdict.decision,
        "scores": [float(s) for s in verdict.scores],
        "prefilled_tokens": int(verdict.prefilled_tokens),
        "encoded_tokens": int(verdict.encoded_tokens),
    }
    if extra:
        rec.update(extra)
    return rec


def running_metrics(log: ResultsLog) -> str:
    """Pass@1 of dense and JCR of each reuse method over the records so far (for the progress line)."""
    by_method: dict[str, list[dict]] = {}
    for rec in log.records.values():
        by_method.setdefault(rec["method"], []).append(rec)
    parts = []
    if by_method.get("dense"):
        parts.append(f"pass@1 {M.pass_at_1([r['passed'] for r in by_method['dense']]):.2f}")
    for name, recs in sorted(by_method.items()):
        if name != "dense":
            parts.append(f"JCR {name} {M.rate([r['consistent'] for r in recs]):.2f}")
    return "  ".join(parts)


def dg_coverage(log: ResultsLog, seed: int, task_ids: Sequence[str]) -> float | None:
    """DG-JKR's agreement rate on ``seed`` over ``task_ids`` (``None`` without DG-JKR records)."""
    flags = [bool((r.get("decision") or {}).get("agreed")) for t in task_ids
             if (r := log.get((t, seed, "dg_jkr"))) is not None]
    return (sum(flags) / len(flags)) if flags else None


def judge_all(judge, problems: Sequence[dict], sets: dict[str, CandidateSet], passes: dict[str, list[bool]],
              seeds: Sequence[int], methods: Sequence[str], log: ResultsLog,
              progress: _Progress | None = None) -> dict[int, float]:
    """Judge every (problem, seed, method) not already in ``log``; returns random_gate's coverage per seed.

    Per seed: dense, then DG-JKR, then the other methods, problem by problem on the same
    permutation; then the coverage-matched random gate over all problems.
    """
    methods = list(methods)
    first = ["dense"] + (["dg_jkr"] if "dg_jkr" in methods else [])
    rest = first + [m for m in methods if m not in first and m != "random_gate"]
    task_ids = [str(p["id"]) for p in problems]
    used: dict[int, float] = {}
    warmed = False
    for seed in seeds:
        for p in problems:
            tid = str(p["id"])
            cs = sets[tid]
            perm = permutation(seed, tid, len(cs.candidates))
            shown = [cs.candidates[i] for i in perm]
            sources = [cs.sources[i] for i in perm]
            todo = [m for m in rest if (tid, seed, m) not in log]
            if not todo:
                continue
            judge.prefetch(p["prompt"], shown)  # the store would hold these: not part of any latency
            if not warmed:  # first-call overheads (kernels, allocator) out of the timed runs
                judge.judge(p["prompt"], shown, method="dense", sources=sources)
                warmed = True
            for m in todo:
                v = judge.judge(p["prompt"], shown, method=m, sources=sources)
                log.append(_record(tid, seed, perm, v, passes[tid], log.get((tid, seed, "dense"))))
                if progress:
                    progress.advance(f"seed {seed} {tid} {m}", log)
        if "random_gate" in methods:
            cov = dg_coverage(log, seed, task_ids) if "dg_jkr" in methods else None
            cov = PAPER_RANDOM_COVERAGE if cov is None else cov
            used[seed] = cov
            for p in problems:
                tid = str(p["id"])
                if (tid, seed, "random_gate") in log:
                    continue
                cs = sets[tid]
                perm = permutation(seed, tid, len(cs.candidates))
                shown = [cs.candidates[i] for i in perm]
                sources = [cs.sources[i] for i in perm]
                judge.prefetch(p["prompt"], shown)
                if not warmed:  # a resumed run that only judges the gate
                    judge.judge(p["prompt"], shown, method="dense", sources=sources)
                    warmed = True
                gs = gate_seed(seed, tid)
                judge.method("random_gate", coverage=cov, seed=gs)
                v = judge.judge(p["prompt"], shown, method="random_gate", sources=sources)
                log.append(_record(tid, seed, perm, v, passes[tid], log.get((tid, seed, "dense")),
                                   {"coverage_target": cov, "gate_seed": gs}))
                if progress:
                    progress.advance(f"seed {seed} {tid} random_gate", log)
    return used


# ---------------------------------------------------------------------------------------------- metrics

def _ci(values: Sequence[float]) -> list[float]:
    return list(M.bootstrap_ci([float(v) for v in values]))


def summarize(log: ResultsLog, task_ids: Sequence[str], seeds: Sequence[int], methods: Sequence[str],
              lengths: dict[str, list[int]] | None = None) -> dict:
    """``{"methods", "significance", "partition"}`` from the records of ``log`` (fractions in [0, 1])."""
    keys = [(t, s) for s in seeds for t in task_ids if (t, s, "dense") in log]
    if not keys:
        raise ValueError("no judged (problem, seed) pairs to summarise")
    dense = {k: log.get((*k, "dense")) for k in keys}
    dense_lat = M.mean_latency([dense[k]["latency_ms"] for k in keys])
    out: dict[str, dict] = {}
    for m in methods:
        ks = [k for k in keys if (*k, m) in log]
        if not ks:
            continue
        recs = [log.get((*k, m)) for k in ks]
        won = [r["winner_original"] for r in recs]
        dwon = [dense[k]["winner_original"] for k in ks]
        passed = [bool(r["passed"]) for r in recs]
        dpassed = [bool(dense[k]["passed"]) for k in ks]
        cons = [a == b for a, b in zip(won, dwon)]
        fcons = [a == b for a, b in zip(passed, dpassed)]
        reused = [bool(r["reused"]) for r in recs]
        lat = [float(r["latency_ms"]) for r in recs]
        gate_key = GATES.get(m)
        accepted = [bool((r.get("decision") or {}).get(gate_key)) for r in recs] if gate_key else None
        row: dict = {
            "n": len(recs),
            "pass_at_1": M.pass_at_1(passed), "pass_at_1_ci": _ci(passed),
            "jcr": M.jcr(won, dwon), "jcr_ci": _ci(cons),
            "jcr_f": M.jcr_f(passed, dpassed), "jcr_f_ci": _ci(fcons),
            "reuse_rate": M.reuse_rate(reused), "reuse_rate_ci": _ci(reused),
            "coverage": M.coverage(accepted) if accepted else None,
            "coverage_ci": _ci(accepted) if accepted else None,
            "latency_ms": M.mean_latency(lat), "latency_ms_ci": _ci(lat),
        }
        row["latency_ratio"] = row["latency_ms"] / dense_lat if dense_lat > 0 else None
        if accepted:
            row["precision"] = M.precision_on_agreement(accepted, cons)
            row["precision_f"] = M.precision_on_agreement(accepted, fcons)
        per_seed: dict[str, dict] = {}
        for s in seeds:
            idx = [i for i, k in enumerate(ks) if k[1] == s]
            if not idx:
                continue
            ps = {"n": len(idx),
                  "jcr": M.rate([cons[i] for i in idx]),
                  "jcr_f": M.rate([fcons[i] for i in idx]),
                  "pass_at_1": M.rate([passed[i] for i in idx]),
                  "reuse_rate": M.rate([reused[i] for i in idx]),
                  "latency_ms": M.mean_latency([lat[i] for i in idx])}
            if accepted:
                ps["coverage"] = M.rate([accepted[i] for i in idx])
            if m == "random_gate":
                ps["coverage_target"] = recs[idx[0]].get("coverage_target")
            per_seed[str(s)] = ps
        row["per_seed"] = per_seed
        for metric in ("jcr", "pass_at_1", "jcr_f") + (("coverage",) if accepted else ()):
            row[f"{metric}_mean_std"] = list(M.mean_std_over_seeds({s: v[metric] for s, v in per_seed.items()}))
        out[m] = row

    significance: dict[str, dict] = {}
    for a, b in (("dg_jkr", "random_gate"), ("dg_jkr", "naive"), ("dg_jkr", "kvcomm")):
        if a in out and b in out:
            ks = [k for k in keys if (*k, a) in log and (*k, b) in log]
            ca = [bool(log.get((*k, a))["consistent"]) for k in ks]
            cb = [bool(log.get((*k, b))["consistent"]) for k in ks]
            test = M.paired_test(ca, cb)
            significance[f"{a}_vs_{b}"] = {**test, "jcr_a": M.rate(ca), "jcr_b": M.rate(cb),
                                           "gap": M.rate(ca) - M.rate(cb), "significant": test["p_value"] < 0.05}

    partition = None
    if "dg_jkr" in out and lengths:
        agree, disagree = [], []
        for k in keys:
            r = log.get((*k, "dg_jkr"))
            if r is None or k[0] not in lengths:
                continue
            (agree if (r.get("decision") or {}).get("agreed") else disagree).append(lengths[k[0]])
        if agree or disagree:
            partition = {"unit": "(problem, seed) record", **M.partition_analysis(agree, disagree)}
    return {"methods": out, "significance": significance, "partition": partition}


# ---------------------------------------------------------------------------------------------- the run

def _load_problems(cfg: EvalConfig) -> list[dict]:
    from kvjudge.experiments.data import load_dataset

    problems = load_dataset(cfg.dataset, path=cfg.data, limit=None if cfg.candidates else cfg.limit)
    if not problems:
        raise ValueError(f"data set {cfg.dataset!r} holds no problems")
    return problems


def evaluate(cfg: EvalConfig, lm=None, progress: bool = True) -> dict:
    """Run the whole protocol; writes results.jsonl, candidates.jsonl, summary.json, report.md and plots.

    ``lm`` (a :class:`~kvjudge.models.LoadedModel`) replaces loading ``cfg.model`` for judging.
    """
    t_start = time.perf_counter()
    out = cfg.out
    results_path = out / "results.jsonl"
    if results_path.exists() and not cfg.resume:
        raise ValueError(f"{results_path} exists: pass --resume to continue it, or choose another --out")
    if cfg.candidates is not None and not cfg.candidates.is_file():
        raise ValueError(f"--candidates: file not found: {cfg.candidates}")
    out.mkdir(parents=True, exist_ok=True)
    problems = _load_problems(cfg)
    timings: dict[str, float] = {}

    cand_path = out / "candidates.jsonl"
    t0 = time.perf_counter()
    if cfg.candidates is not None:
        sets = load_candidates(cfg.candidates)
        problems = [p for p in problems if str(p["id"]) in sets]
        if not problems:
            raise ValueError(f"--candidates: no task_id of {cfg.candidates} is a {cfg.dataset} problem")
        if cfg.limit is not None:
            problems = problems[: cfg.limit]
        if cfg.candidates.resolve() != cand_path.resolve():
            write_candidates(cand_path, [sets[str(p["id"])] for p in problems])
        source = str(cfg.candidates)
    else:
        # A resumed run keeps every candidate set it has (judged verdicts refer to them) and generates
        # only problems never tried: those a larger --limit adds. Problems whose generation failed
        # are not retried (start a new --out for that).
        gen_dir = out / "generation"
        have = load_candidates(cand_path) if cfg.resume and cand_path.is_file() else {}
        tried = {str(r.get("id")) for r in _generation_records(gen_dir)} if cfg.resume else set()
        todo = [p for p in problems if str(p["id"]) not in have and str(p["id"]) not in tried]
        if todo:
            generate_candidates(cfg, todo)
            timings["generation_s"] = time.perf_counter() - t0
        sets = {**generated_sets(gen_dir), **have}
        if not any(str(p["id"]) in sets for p in problems):
            raise ValueError(f"generation produced no candidates (see {gen_dir / 'results.jsonl'})")
        failed = sum(str(p["id"]) not in sets for p in problems)
        if failed and progress:
            print(f"{failed} problem(s) without candidates (generation failed) are left out", file=sys.stderr)
        problems = [p for p in problems if str(p["id"]) in sets]
        write_candidates(cand_path, [sets[str(p["id"])] for p in problems])
        source = f"generated with {cfg.topology}" if todo or not have else str(cand_path)

    t0 = time.perf_counter()
    passes = grade_candidates(cfg.dataset, problems, sets)
    timings["grading_s"] = time.perf_counter() - t0

    import torch

    from kvjudge.models import load_model
    from kvjudge.judges.judge import Judge
    from kvjudge.judges.prompt import JudgeInputError

    t0 = time.perf_counter()
    lm = lm or load_model(cfg.model, device=cfg.device)
    judge = Judge(lm)
    timings["model_load_s"] = time.perf_counter() - t0
    skipped: dict[str, str] = {}
    usable = []
    for p in problems:
        try:
            judge.case(p["prompt"], sets[str(p["id"])].candidates)
            usable.append(p)
        except JudgeInputError as exc:
            skipped[str(p["id"])] = str(exc)
    if not usable:
        raise ValueError(f"no problem can be judged: {next(iter(skipped.values()))}")
    problems = usable
    task_ids = [str(p["id"]) for p in problems]
    lengths = {t: [len(lm.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in sets[t].candidates]
               for t in task_ids}

    log = ResultsLog(results_path)
    todo = sum(1 for s in cfg.seeds for t in task_ids for m in cfg.methods if (t, s, m) not in log)
    bar = _Progress(todo, f"eval {cfg.dataset}", enabled=progress)
    t0 = time.perf_counter()
    try:
        used = judge_all(judge, problems, sets, passes, cfg.seeds, cfg.methods, log, bar)
    finally:
        bar.close()
    timings["judging_s"] = time.perf_counter() - t0

    summary = summarize(log, task_ids, cfg.seeds, cfg.methods, lengths)
    all_pass = [x for t in task_ids for x in passes[t]]
    summary["config"] = {
        "dataset": cfg.dataset, "topology": cfg.topology, "model": cfg.model, "model_id": lm.model_id,
        "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),  # latencies on a CPU depend on it
        "methods": list(cfg.methods), "seeds": list(cfg.seeds), "limit": cfg.limit,
        "n_problems": len(task_ids), "n_candidates": sorted({len(sets[t].candidates) for t in task_ids}),
        "candidates": source, "data": cfg.data,
        "random_gate_coverage": {str(s): c for s, c in used.items()} or None,
        "random_gate_coverage_source": ("dg_jkr agreement rate per seed" if "dg_jkr" in cfg.methods
                                        else f"paper ({PAPER_RANDOM_COVERAGE})") if "random_gate" in cfg.methods
        else None,
        "candidate_pass_rate": (sum(all_pass) / len(all_pass)) if all_pass else None,
        "skipped": skipped,
        "timings_s": {**timings, "total_s": time.perf_counter() - t_start},
    }
    summary = {"config": summary.pop("config"), **summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    from kvjudge.experiments.plots import write_plots
    from kvjudge.experiments.report import write_report

    write_plots(summary, out)
    write_report(summary, out)
    return summary


# ---------------------------------------------------------------------------------------------- CLI

def add_eval_command(sub: argparse._SubParsersAction, add_model: Callable) -> None:
    """Register ``kvjudge eval`` on the CLI's sub-parsers."""
    e = sub.add_parser("eval", help="DG-JKR evaluation protocol: generate once, judge under shuffles, report")
    e.add_argument("dataset", choices=["humaneval", "gsm8k", "mmlu"], help="benchmark")
    add_model(e, default="smollm2-135m")
    e.add_argument("--topology", default="progressive_refinement",
                   help="topology generating the candidates (file or shipped name; default progressive_refinement); "
                        "with --candidates it only labels the regime in the report")
    e.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated judge methods, dense always included (default {','.join(DEFAULT_METHODS)})")
    e.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="shuffle seeds (default 42,123,456)")
    e.add_argument("--limit", type=int, default=None, help="first N problems only")
    e.add_argument("--candidates", default=None, help="candidates.jsonl from an earlier run: skips generation")
    e.add_argument("--data", default=None, help="read the data set from this JSONL(.gz) instead of its package")
    e.add_argument("--out", default=None, help="output folder (default runs/eval-<dataset>)")
    e.add_argument("--resume", action="store_true", help="keep OUT/results.jsonl and judge only what is missing")
    e.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.candidates and not Path(args.candidates).expanduser().is_file():
        raise ValueError(f"--candidates: file not found: {args.candidates}")
    if not args.candidates:
        from kvjudge.topologies import resolve_topology

        resolve_topology(args.topology)  # a bad --topology fails before anything loads
    cfg = EvalConfig(
        dataset=args.dataset, out=Path(args.out or Path("runs") / f"eval-{args.dataset}"), topology=args.topology,
        model=args.model, methods=args.methods, seeds=args.seeds, limit=args.limit,
        candidates=Path(args.candidates).expanduser() if args.candidates else None, data=args.data,
        resume=args.resume, device=getattr(args, "device", None),
    )
    try:
        summary = evaluate(cfg)
    except KeyboardInterrupt:
        print(f"interrupted: judged triples are in {cfg.out / 'results.jsonl'} (continue with --resume)",
              file=sys.stderr)
        return 130
    from kvjudge.experiments.report import console_table

    print(console_table(summary))
    print(f"-> {cfg.out / 'summary.json'}, {cfg.out / 'report.md'}, {cfg.out / 'results.jsonl'}")
    return 0

