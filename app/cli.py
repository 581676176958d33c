"""The ``kvjudge`` command line: every subcommand is registered here. Every user error is one line on
stderr and exit code 2 (``KVJUDGE_DEBUG=1`` shows the traceback).

Imports: the parser is built from the standard library and torch-free tables only, and each command
imports its stack (torch, transformers, Ray) inside its handler, so ``kvjudge --help`` and
``kvjudge validate`` start in well under a second. That is the one place in the package where
imports inside functions are the rule, for that reason.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path

from kvjudge.cache.compress.catalog import COMPRESSION_METHODS
from kvjudge.judges.candidate import CANDIDATE_KV_MODES, DEFAULT_MAX_NEW_TOKENS, OUTPUT_MODES
from kvjudge.judges.catalog import DEFAULT_METHODS, METHOD_ORDER
from kvjudge.judges.debias import DEBIAS_MODES

MAX_TEXT_BYTES = 1 << 20  # what ``@path`` may read


class UserError(ValueError):
    """An error caused by the user's input; printed as one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken the way Ctrl-C is (what was written stays, actors are shut down), exit 143."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def stop_code(exc: KeyboardInterrupt) -> tuple[int, str]:
    """Exit code and word for an interrupt: 143 ``terminated`` (SIGTERM), 130 ``interrupted`` (Ctrl-C)."""
    return (143, "terminated") if isinstance(exc, Terminated) else (130, "interrupted")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage dump) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def read_text(value: str) -> str:
    """``@path`` reads the text from a regular file of at most 1 MiB; anything else is the text itself."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:]).expanduser()
    try:
        if not path.is_file():
            raise UserError(f"cannot read {str(path)!r}: not a regular file")
        if path.stat().st_size > MAX_TEXT_BYTES:
            raise UserError(f"cannot read {str(path)!r}: larger than {MAX_TEXT_BYTES >> 20} MiB")
        with path.open("rb") as fh:
            data = fh.read(MAX_TEXT_BYTES + 1)
        if len(data) > MAX_TEXT_BYTES:
            raise UserError(f"cannot read {str(path)!r}: larger than {MAX_TEXT_BYTES >> 20} MiB")
        return data.decode("utf-8")  # strict: a bad byte is refused, never replaced
    except OSError as exc:
        raise UserError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"cannot read {str(path)!r}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at byte "
                        f"offset {exc.start})") from None


def checked_text(flag: str, value: str) -> str:
    """``value`` when it is valid Unicode text; a one-line error naming ``flag`` when it holds a lone
    surrogate (what Python makes of undecodable command-line bytes, or a JSON ``"\\ud800"``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"{flag}: not valid text (a lone surrogate or undecodable byte at character {exc.start})") \
            from None
    return value


def judge_max_tokens(value: int | None, default: int = DEFAULT_MAX_NEW_TOKENS) -> int:
    """``--judge-max-tokens`` in 1..4096 (the topology schema's bound); ``default`` when not given."""
    from kvjudge.topologies.schema import MAX_JUDGE_TOKENS

    if value is None:
        return default
    if not 1 <= value <= MAX_JUDGE_TOKENS:
        raise UserError(f"--judge-max-tokens must be in 1..{MAX_JUDGE_TOKENS}, got {value}")
    return value


def checked_device(value: str | None) -> str | None:
    """``--device`` checked against what this torch has (imports torch: call it in a handler)."""
    if value is None:
        return None
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {value!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise UserError(f"--device {value}: this machine has no CUDA device (torch sees none); use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise UserError(f"--device {value}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device {value}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise UserError(f"--device {value}: only cpu, cuda and mps devices are supported")
    return value


def default_out(name: str, prefix: str = "") -> Path:
    """``runs/<prefix><name>`` inside the working directory, the name reduced to safe characters."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"
    return Path("runs") / f"{prefix}{safe[:100]}"


def positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"--{flag} must be >= 1, got {value}")


# ---------------------------------------------------------------------------- the parser
def _add_model(p: argparse.ArgumentParser, default: str = "tiny-llama") -> None:
    p.add_argument("--model", default=os.environ.get("KVJUDGE_MODEL", default),
                   help=f"built-in alias (tiny-llama, tiny-qwen2, smollm2-135m) or a local checkpoint folder "
                        f"(default {default})")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def parse_compress(value: str | None) -> dict | None:
    """``METHOD:RATIO`` (kept fraction of tokens in (0, 1]) -> ``{"method", "ratio"}``; ``none`` -> None."""
    if value is None or value == "none":
        return None
    method, _, ratio = value.partition(":")
    if method not in COMPRESSION_METHODS:
        raise UserError(f"--compress: unknown method {method!r}; known: {', '.join(COMPRESSION_METHODS)}")
    try:
        kept = float(ratio)
    except ValueError:
        raise UserError(f"--compress {value!r}: write METHOD:RATIO with RATIO the kept fraction, e.g. laprox:0.25") \
            from None
    if not 0.0 < kept <= 1.0:
        raise UserError(f"--compress: the kept ratio must be in (0, 1], got {ratio}")
    return {"method": method, "ratio": kept}


def _names(flag: str, value: str, known: tuple[str, ...], kind: str) -> list[str]:
    """A comma-separated ``--flag`` list of names, each one of ``known`` (else a one-line error)."""
    names = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in names if m not in known]
    if bad:
        raise UserError(f"--{flag}: unknown {kind} {bad[0]!r}; known: {', '.join(known)}")
    return names


def _floats(flag: str, value: str) -> list[float]:
    """A comma-separated ``--flag`` list of distinct numbers, at least one (else a one-line error)."""
    try:
        numbers = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{flag}: {value!r} is not a comma-separated list of numbers") from None
    if not numbers:
        raise UserError(f"--{flag}: give at least one number")
    twice = next((x for i, x in enumerate(numbers) if x in numbers[:i]), None)
    if twice is not None:
        raise UserError(f"--{flag}: {twice:g} is given twice")
    return numbers


def add_sampling(p: argparse.ArgumentParser, what: str = "problems") -> None:
    """``--offset`` and ``--sample-seed``: which problems a ``--limit`` takes (``datasets.sample_problems``)."""
    p.add_argument("--offset", type=int, default=0,
                   help=f"skip the first K {what} of the sampling order (disjoint calibration/test splits)")
    p.add_argument("--sample-seed", type=int, default=None,
                   help="MMLU: seed of the sample stratified over its 57 subjects (default 0); GSM8K, HumanEval, "
                        "files: shuffle with this seed (default: their own order)")


def nonnegative(flag: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise UserError(f"--{flag} must be >= 0, got {value}")


def _add_judge_modes(p: argparse.ArgumentParser, default_kv: str | None) -> None:
    p.add_argument("--candidate-kv", choices=CANDIDATE_KV_MODES, default=default_kv,
                   help="where candidate KV comes from: agent (as the agent computed it while writing), isolated "
                        "(encoded alone from position 0) or judge_prefix (encoded after the judge's prefix)"
                        + (f" (default {default_kv})" if default_kv else " (default: the topology's)"))
    p.add_argument("--judge-output", choices=OUTPUT_MODES, default=None,
                   help="label: read the label's log-probability; generate: decode an answer and parse the number")
    p.add_argument("--judge-max-tokens", type=int, default=None,
                   help=f"tokens a generated judge answer may take ({DEFAULT_MAX_NEW_TOKENS})")
    _add_debias(p, permutations=True)


def _add_debias(p: argparse.ArgumentParser, permutations: bool = False) -> None:
    """``--judge-debias`` (and ``--judge-permutations``): position-debiased judging (kvjudge.judges.debias)."""
    p.add_argument("--judge-debias", choices=DEBIAS_MODES, default=None,
                   help="none; pride or content_free: label scores minus each method's slot prior saved by "
                        "kvjudge calibrate (generate output: pride is the vote over every rotation)")
    if permutations:
        p.add_argument("--judge-permutations", type=int, default=None,
                       help="K > 1: judge K cyclic rotations of the candidates, the highest summed score wins (1)")


def build_parser() -> Parser:
    methods = ", ".join(METHOD_ORDER)
    root = Parser(prog="kvjudge", description="Multi-agent LLM pipelines with a KV-reusing judge.")
    sub = root.add_subparsers(dest="command", required=True, parser_class=Parser)

    j = sub.add_parser("judge", help="pick the best candidate with one judge method")
    _add_model(j)
    j.add_argument("--method", default="dense", help=f"one of: {methods}")
    j.add_argument("--problem", required=True, help="problem text, or @file")
    j.add_argument("--candidate", action="append", default=[], help="a candidate text or @file (repeat)")
    j.add_argument("--agent-prompt", action="append", default=[],
                   help="with --candidate-kv agent: the prompt the agent answered (one for all, or one per "
                        "candidate, in order; @file allowed)")
    _add_judge_modes(j, "judge_prefix")
    j.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    _add_method_options(j, gate=True)
    j.set_defaults(func=cmd_judge)

    _run_parsers(sub)
    _analysis_parsers(sub)
    _calibrate_parser(sub)
    _bench_parsers(sub)
    _gate_parsers(sub)
    _env_parser(sub)
    return root


def _run_parsers(sub: argparse._SubParsersAction) -> None:
    """``validate``, ``run`` and ``eval``."""
    v = sub.add_parser("validate", help="check a topology YAML file")
    v.add_argument("file", help="a topology file or a shipped name (progressive_refinement, debate, heterogeneous)")
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("run", help="run a topology over problems on Ray")
    r.add_argument("file", help="a topology file or a shipped name")
    r.add_argument("--model", default=None, help="override the topology's default model (agents and judge)")
    r.add_argument("--problems", default="humaneval", help="humaneval | gsm8k | mmlu | FILE.jsonl with {id, prompt}")
    r.add_argument("--limit", type=int, default=None, help="N problems only (MMLU: stratified over subjects)")
    add_sampling(r)
    r.add_argument("--address", default=None, help="Ray address (auto, ray://host:10001); default: embedded local Ray")
    r.add_argument("--out", default=None, help="output folder (default runs/<topology name>)")
    r.add_argument("--resume", action="store_true", help="continue OUT/results.jsonl, skipping finished problems")
    r.add_argument("--concurrency", type=int, default=None,
                   help="problems in flight (default: enough to keep every agent replica busy)")
    r.add_argument("--replicas", default=None, help="agent actors per model: N or auto (default: the topology's)")
    r.add_argument("--no-dashboard", action="store_true", help="plain progress lines instead of the live dashboard")
    _add_judge_modes(r, None)
    r.add_argument("--compress", default=None, help="token-compress stored candidate KV: METHOD:RATIO (kept fraction), e.g. laprox:0.25")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("eval", help="DG-JKR evaluation protocol: generate once, judge under shuffles, report")
    e.add_argument("dataset", choices=["humaneval", "gsm8k", "mmlu"], help="benchmark")
    _add_model(e, default="smollm2-135m")
    e.add_argument("--topology", default="progressive_refinement",
                   help="topology generating the candidates (file or shipped name; default progressive_refinement); "
                        "with --candidates it only labels the regime in the report")
    e.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated judge methods, dense always included (default {','.join(DEFAULT_METHODS)})")
    e.add_argument("--seeds", default="42,123,456", help="shuffle seeds (default 42,123,456)")
    e.add_argument("--limit", type=int, default=None, help="N problems only (MMLU: stratified over subjects)")
    add_sampling(e)
    e.add_argument("--temperature", type=float, default=None,
                   help="every agent samples at this temperature (e.g. --topology debate --temperature 0.7); "
                        "default: the topology's own")
    e.add_argument("--generation-seed", type=int, default=0,
                   help="with --temperature: agent i samples with seed S + 1000 i (default 0)")
    e.add_argument("--candidates", default=None, help="candidates.jsonl from an earlier run: skips generation")
    e.add_argument("--data", default=None, help="read the data set from this JSONL(.gz) instead of its package")
    e.add_argument("--out", default=None, help="output folder (default runs/eval-<dataset>)")
    e.add_argument("--resume", action="store_true", help="keep OUT/results.jsonl and judge only what is missing")
    _add_judge_modes(e, "agent")
    e.add_argument("--gate-arm", default="naive", help="the random gate's reuse arm: naive, kvcomm or pal_kv")
    e.add_argument("--compress", default=None, help="token-compress stored candidate KV: METHOD:RATIO (kept fraction), e.g. laprox:0.25")
    e.add_argument("--calibrate-on", type=int, default=0, metavar="K",
                   help="with --judge-debias: estimate the slot priors on the first K problems of the order and "
                        "judge and score only the rest (summary.json lists them under config.calibration)")
    e.add_argument("--unsafe-exec", action="store_true",
                   help="grade generated code even when no sandbox isolation is available (not recommended)")
    _add_method_options(e, gate=True)
    e.set_defaults(func=cmd_eval)



def _analysis_parsers(sub: argparse._SubParsersAction) -> None:
    """``diagnose`` and ``dashboard``."""
    g = sub.add_parser("diagnose", help="why a reusing judge flips: attention, progressive, hybrid, risk")
    g.add_argument("kind", choices=["attention", "progressive", "hybrid", "risk", "all"])
    _add_model(g, default="smollm2-135m")
    g.add_argument("--candidates", required=True, help="a candidates.jsonl (lines with their own problem need no dataset)")
    g.add_argument("--methods", default="naive,kvcomm", help="reuse methods to compare with dense (default naive,kvcomm)")
    g.add_argument("--candidate-kv", choices=CANDIDATE_KV_MODES, default="agent",
                   help="where candidate KV comes from (default agent, as the seed paper)")
    g.add_argument("--topology", default="progressive_refinement",
                   help="rebuilds agent prompts for files that lack them (default progressive_refinement)")
    g.add_argument("--seeds", default="42,123,456", help="shuffle seeds")
    g.add_argument("--limit", type=int, default=None, help="N candidate sets (in the dataset's sampling order)")
    add_sampling(g, "candidate sets")
    g.add_argument("--dataset", default=None, help="the dataset task ids refer to (default: from the task id)")
    g.add_argument("--out", default=None, help="output folder (default runs/diagnose)")
    _add_debias(g)
    g.set_defaults(func=cmd_diagnose)

    d = sub.add_parser("dashboard", help="attach to the live dashboard of a run on a Ray cluster")
    d.add_argument("--address", default="auto", help="Ray address of the cluster (auto, HOST:6379, ray://HOST:10001)")
    d.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")
    d.set_defaults(func=cmd_dashboard)



def _bench_parsers(sub: argparse._SubParsersAction) -> None:
    """``bench judge``, ``bench run``, ``bench compress``, ``bench gates`` and ``bench generate``."""
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True, parser_class=Parser)
    bj = bsub.add_parser("judge", help="time every judge method on the same cached candidates")
    _add_model(bj)
    bj.add_argument("--candidates", type=int, default=4)
    bj.add_argument("--candidate-tokens", type=int, default=256)
    bj.add_argument("--repeats", type=int, default=5)
    bj.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="comma-separated methods (default all but those needing a gate file)")
    bj.add_argument("--candidate-kv", choices=CANDIDATE_KV_MODES, default="judge_prefix",
                    help="where candidate KV comes from (default judge_prefix)")
    bj.add_argument("--json", action="store_true")
    _add_debias(bj, permutations=True)
    _add_method_options(bj)
    bj.set_defaults(func=cmd_bench_judge)

    br = bsub.add_parser("run", help="makespan of a topology run against its lower bound (sim or a real model)")
    br.add_argument("topology", help="a topology file or a shipped name")
    br.add_argument("--model", default="sim:tokens_per_s=50",
                    help="sim:tokens_per_s=N[,batch_speedup=B,...] (default sim:tokens_per_s=50) or a real model")
    br.add_argument("--problems", default="32", help="N synthetic problems, a dataset name or a JSONL file (default 32)")
    br.add_argument("--limit", type=int, default=None, help="first N problems of a dataset or file")
    br.add_argument("--concurrency", type=int, default=None, help="problems in flight (default: keep replicas busy)")
    br.add_argument("--replicas", default=None, help="agent actors per model: N or auto")
    br.add_argument("--address", default=None, help="Ray address (default: embedded local Ray)")
    br.add_argument("--json", action="store_true")
    br.set_defaults(func=cmd_bench_run)

    bc = bsub.add_parser("compress", help="judge consistency vs kept ratio of token-compressed candidate KV")
    _add_model(bc, default="smollm2-135m")
    bc.add_argument("--candidates", required=True, help="a candidates.jsonl (lines with their own problem need no dataset)")
    bc.add_argument("--dataset", default=None, help="the dataset task ids refer to (default: from the task id)")
    bc.add_argument("--methods", default="laprox,streaming,snapkv,knorm,random", help="compression methods")
    bc.add_argument("--ratios", default="1.0,0.5,0.25,0.1,0.05", help="kept ratios")
    bc.add_argument("--judge-methods", default="naive,dg_jkr", help="judge methods to measure")
    bc.add_argument("--candidate-kv", choices=CANDIDATE_KV_MODES, default="agent",
                    help="where candidate KV comes from (default agent)")
    bc.add_argument("--seeds", default="42", help="shuffle seeds")
    bc.add_argument("--limit", type=int, default=None, help="first N candidate sets")
    bc.add_argument("--out", default=None, help="folder for compress.json and the plot (default runs/bench-compress)")
    bc.add_argument("--json", action="store_true")
    _add_debias(bc)
    bc.set_defaults(func=cmd_bench_compress)
    _bench_gates_parser(bsub)

    bgen = bsub.add_parser("generate", help="greedy generation throughput per batch size of a real model")
    _add_model(bgen, default="smollm2-135m")
    bgen.add_argument("--batch-sizes", default="1,4", help="comma-separated batch sizes; speed-ups are over the "
                                                           "first (default 1,4)")
    bgen.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per request, no early stop (default 64)")
    bgen.add_argument("--repeats", type=int, default=1, help="timed runs per batch size, the best counts (default 1)")
    bgen.add_argument("--json", action="store_true")
    bgen.set_defaults(func=cmd_bench_generate)


# ---------------------------------------------------------------------------- the commands
def cmd_judge(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvjudge.app.render import verdict_table
    from kvjudge.judges.judge import Judge
    from kvjudge.judges.methods import make_method
    from kvjudge.judges.prompt import JudgeInputError
    from kvjudge.models import load_model

    options = method_options_of(args)
    for name, opts in {args.method: {}, **options}.items():
        make_method(name, **opts)  # unknown method or options: fail before loading a model
    max_tokens = judge_max_tokens(args.judge_max_tokens)
    device = checked_device(args.device)
    problem = checked_text("--problem", read_text(args.problem))
    texts = [checked_text(f"--candidate {i}", read_text(c)) for i, c in enumerate(args.candidate, start=1)]
    if not texts:
        raise JudgeInputError("no candidates to judge: give at least one --candidate")
    prompts = [checked_text(f"--agent-prompt {i}", read_text(p)) for i, p in enumerate(args.agent_prompt, start=1)]
    candidates = _with_agent_prompts(texts, prompts, args.candidate_kv)
    judge = Judge(load_model(args.model, device=device), method=args.method, candidate_kv=args.candidate_kv,
                  output=args.judge_output or "label", max_new_tokens=max_tokens,
                  debias=args.judge_debias or "none", permutations=args.judge_permutations or 1)
    for name, opts in options.items():
        judge.method(name, **opts)
    verdict = judge.judge(problem, candidates)
    if args.json:
        print(json.dumps(verdict.to_dict()))
    else:
        Console().print(verdict_table(verdict, texts))
    return 0


def _with_agent_prompts(texts: list[str], prompts: list[str], mode: str) -> list:
    """The candidates of ``kvjudge judge``: texts, with their agents' prompts in ``agent`` mode."""
    if mode != "agent":
        if prompts:
            raise UserError("--agent-prompt only applies with --candidate-kv agent")
        return texts
    if not prompts:
        raise UserError("--candidate-kv agent needs the agents' prompts: give --agent-prompt TEXT (one for all, "
                        "or one per candidate)")
    if len(prompts) not in (1, len(texts)):
        raise UserError(f"{len(prompts)} --agent-prompt for {len(texts)} candidates: give one, or one per candidate")
    prompts = prompts * len(texts) if len(prompts) == 1 else prompts
    return [{"text": t, "agent_prompt": p} for t, p in zip(texts, prompts)]


def cmd_validate(args: argparse.Namespace) -> int:
    from kvjudge.topologies import build_graph, generations, load_topology, resolve_topology

    topo = load_topology(resolve_topology(args.file))
    graph = build_graph(topo)
    order = " -> ".join("{" + ", ".join(g) + "}" for g in generations(graph))
    print(f"{topo.name}: ok — {len(topo.agents)} agents, {graph.number_of_edges()} edges, rounds {topo.rounds}, "
          f"judge {topo.judge.method}; generations {order}")
    return 0


def _replicas(value: str | None) -> int | str | None:
    """``--replicas`` N in 1..256 (the topology schema's bound) or ``auto``; what the cluster can hold is
    checked when the run starts (:meth:`~kvjudge.runtime.runner.Orchestrator.start`)."""
    from kvjudge.topologies.schema import MAX_REPLICAS

    if value is None or value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"--replicas must be a number or auto, got {value!r}") from None
    if not 1 <= n <= MAX_REPLICAS:
        raise UserError(f"--replicas must be in 1..{MAX_REPLICAS} or auto, got {n}")
    return n


def cmd_run(args: argparse.Namespace) -> int:
    from kvjudge.app.reporters import choose_reporter
    from kvjudge.experiments.datasets import load_problems
    from kvjudge.topologies import load_topology, resolve_topology
    from kvjudge.runtime.runner import run

    positive("limit", args.limit)
    positive("concurrency", args.concurrency)
    replicas = _replicas(args.replicas)
    topo = load_topology(resolve_topology(args.file))
    if args.judge_max_tokens is not None:
        judge_max_tokens(args.judge_max_tokens)
    modes = {k: v for k, v in (("candidate_kv", args.candidate_kv), ("output", args.judge_output),
                               ("max_tokens", args.judge_max_tokens), ("debias", args.judge_debias),
                               ("permutations", args.judge_permutations)) if v is not None}
    positive("judge-permutations", args.judge_permutations)
    if modes:
        topo = topo.with_overrides(judge=modes)
    if args.compress is not None:
        from kvjudge.topologies.schema import CompressSpec

        spec = parse_compress(args.compress)
        topo = topo.with_overrides(store={"compress": CompressSpec(**spec) if spec else None})
    nonnegative("offset", args.offset)
    problems = load_problems(args.problems, args.limit, args.offset, args.sample_seed)
    out = Path(args.out) if args.out else default_out(topo.name)
    try:
        counts = run(topo, problems, out, model=args.model, address=args.address, resume=args.resume,
                     reporter=choose_reporter(args.no_dashboard), concurrency=args.concurrency, replicas=replicas,
                     source=problems_source(args.problems))
    except KeyboardInterrupt as exc:
        code, word = stop_code(exc)
        print(f"{word}: finished problems are in {out / 'results.jsonl'} (continue with --resume)",
              file=sys.stderr)
        return code
    retried = f" ({counts['retried']} retried)" if counts.get("retried") else ""
    print(f"{counts['done']} done, {counts['failed']} failed{retried}, {counts['skipped']} skipped -> "
          f"{counts['results']} ({counts['ok_total']} ok, {counts['failed_total']} failed: the latest record of "
          "each problem)")
    return 1 if counts["failed"] and not counts["done"] else 0


def problems_source(spec: str) -> str:
    """What ``--problems`` names, for the run's manifest: a dataset's name, or ``file:`` + the file's hash."""
    from kvjudge.experiments.datasets import get_dataset, is_dataset
    from kvjudge.runtime.manifest import file_digest

    if is_dataset(spec):
        return get_dataset(spec).name
    return "file:" + file_digest(Path(spec).expanduser())


def cmd_eval(args: argparse.Namespace) -> int:
    from kvjudge.app.reporters import EvalProgress, PlainReporter, choose_reporter
    from kvjudge.experiments.config import EvalConfig
    from kvjudge.experiments.protocol import evaluate
    from kvjudge.experiments.report import console_table
    from kvjudge.topologies import resolve_topology

    if args.candidates and not Path(args.candidates).expanduser().is_file():
        raise UserError(f"--candidates: file not found: {args.candidates}")
    if not args.candidates:
        resolve_topology(args.topology)  # a bad --topology fails before anything loads
    cfg = EvalConfig(
        dataset=args.dataset, out=Path(args.out) if args.out else default_out(args.dataset, "eval-"),
        topology=args.topology, model=args.model, methods=args.methods, seeds=args.seeds, limit=args.limit,
        candidates=Path(args.candidates).expanduser() if args.candidates else None, data=args.data,
        resume=args.resume, device=checked_device(args.device), candidate_kv=args.candidate_kv,
        judge_output=args.judge_output or "label", judge_max_tokens=judge_max_tokens(args.judge_max_tokens),
        gate_arm=args.gate_arm, unsafe_exec=args.unsafe_exec, compress=parse_compress(args.compress),
        offset=args.offset, sample_seed=args.sample_seed, temperature=args.temperature,
        generation_seed=args.generation_seed, judge_debias=args.judge_debias or "none",
        judge_permutations=args.judge_permutations or 1, calibrate_on=args.calibrate_on,
    )
    cfg.method_options = method_options_of(args) or None
    # generation: the live dashboard on a terminal, plain lines on stderr otherwise
    reporter = choose_reporter(False) if sys.stdout.isatty() else PlainReporter(stream=sys.stderr)
    try:
        summary = evaluate(cfg, reporter=reporter, progress=EvalProgress())
    except KeyboardInterrupt as exc:
        code, word = stop_code(exc)
        print(f"{word}: judged triples are in {cfg.out / 'results.jsonl'} (continue with --resume)",
              file=sys.stderr)
        return code
    print(console_table(summary))
    print(f"-> {cfg.out / 'summary.json'}, {cfg.out / 'report.md'}, {cfg.out / 'results.jsonl'}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvjudge.app.dashboard import connect_run, fetcher, watch

    if not args.interval > 0:
        raise UserError(f"--interval must be > 0, got {args.interval}")
    actor = connect_run(args.address)
    try:
        why = watch(fetcher(actor, timeout=max(5.0, 5 * args.interval)), Console(), args.interval,
                    live=sys.stdout.isatty())
    except KeyboardInterrupt:
        print("detached from the dashboard (the run goes on)", file=sys.stderr)
        return 0
    print(why, file=sys.stderr)
    return 0


def _env_parser(sub: argparse._SubParsersAction) -> None:
    """``env``: versions, tested set, device, sandbox and model cache, for a bug report."""
    e = sub.add_parser("env", help="versions (and the tested set), device, sandbox, model cache: for bug reports")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_env)


def cmd_env(args: argparse.Namespace) -> int:
    from kvjudge.app.envinfo import collect, render

    info = collect()
    print(json.dumps(info, indent=1) if args.json else render(info))
    return 0


def _calibrate_parser(sub: argparse._SubParsersAction) -> None:
    """``calibrate``: the judge's slot priors for ``--judge-debias``."""
    c = sub.add_parser("calibrate", help="estimate and save the judge's slot priors per method (for --judge-debias)")
    c.add_argument("dataset", nargs="?", choices=["humaneval", "gsm8k", "mmlu"], default=None,
                   help="generate candidates for this benchmark as eval does (or: the data set a --candidates "
                        "file's task ids refer to)")
    _add_model(c, default="smollm2-135m")
    c.add_argument("--candidates", default=None, help="a candidates.jsonl to estimate on (skips generation)")
    c.add_argument("--data", default=None, help="read the data set from this JSONL(.gz) instead of its package")
    c.add_argument("--limit", type=int, default=None, help="N candidate sets (in the sampling order)")
    add_sampling(c, "candidate sets")
    c.add_argument("--methods", default="dense",
                   help="comma-separated judge methods; a gate stands for the methods it runs (default dense)")
    c.add_argument("--candidate-kv", choices=CANDIDATE_KV_MODES, default="agent",
                   help="where candidate KV comes from (default agent)")
    c.add_argument("--judge-output", choices=OUTPUT_MODES, default="label", help="label (priors are for label output)")
    c.add_argument("--judge-debias", choices=DEBIAS_MODES[1:], default="pride",
                   help="pride: every set under all N cyclic rotations (default); content_free: every candidate "
                        "replaced by a content-free text")
    c.add_argument("--topology", default="progressive_refinement",
                   help="generates the candidates, or rebuilds agent prompts a file lacks (default progressive_refinement)")
    c.add_argument("--out", default=None, help="where generated candidates go (default runs/calibrate-<dataset>)")
    c.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from kvjudge.experiments.calibrate import estimate, generated_file, items_from_file, render, save
    from kvjudge.judges.judge import Judge
    from kvjudge.models import load_model

    positive("limit", args.limit)
    nonnegative("offset", args.offset)
    methods = _names("methods", args.methods, METHOD_ORDER, "judge method")
    if args.candidates is None and args.dataset is None:
        raise UserError("give --candidates FILE, or a data set (humaneval, gsm8k, mmlu) to generate candidates for")
    if args.judge_output != "label":
        raise UserError("slot priors are for label output; in generate output pride is the permutation vote and "
                        "needs no prior")
    path, limit, offset = args.candidates, args.limit, args.offset
    if path is None:  # generate the sets as eval does; they are then taken whole
        out = Path(args.out) if args.out else default_out(args.dataset, "calibrate-")
        path = generated_file(args.dataset, args.model, out, args.limit, args.offset, args.data, args.topology,
                              args.candidate_kv, args.sample_seed, checked_device(args.device))
        limit, offset = None, 0
    elif not Path(path).expanduser().is_file():
        raise UserError(f"--candidates: file not found: {path}")
    judge = Judge(load_model(args.model, device=checked_device(args.device)), candidate_kv=args.candidate_kv)
    items = items_from_file(Path(path).expanduser(), judge, limit, offset, args.dataset, args.topology,
                            args.sample_seed)
    tables = estimate(judge, items, methods, args.judge_debias,
                      progress=lambda line: print(f"calibrate: {line}", file=sys.stderr))
    print(render(tables, save(tables)))
    return 0


def cmd_bench_judge(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvjudge.app.render import bench_table
    from kvjudge.experiments.bench.judge import bench_judge

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for flag in ("candidates", "candidate_tokens", "repeats"):
        positive(flag.replace("_", "-"), getattr(args, flag))
    result = bench_judge(args.model, args.candidates, args.candidate_tokens, args.repeats, methods,
                         checked_device(args.device),
                         progress=not args.json, candidate_kv=args.candidate_kv,
                         method_options=method_options_of(args), debias=args.judge_debias or "none",
                         permutations=args.judge_permutations or 1)
    if args.json:
        print(json.dumps(result))
    else:
        Console().print(bench_table(result))
    return 0


def cmd_bench_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kvjudge.experiments.bench.run import bench_run, bench_table

    positive("limit", args.limit)
    positive("concurrency", args.concurrency)
    result = bench_run(args.topology, args.model, args.problems, concurrency=args.concurrency,
                       replicas=_replicas(args.replicas), address=args.address, limit=args.limit)
    if args.json:
        print(json.dumps(result))
        return 0
    view = bench_table(result)
    table = Table(title=view["title"])
    for col in view["columns"]:
        table.add_column(col)
    for row in view["rows"]:
        table.add_row(*row)
    Console().print(table)
    return 0


def _model_on(model: str, device: str | None):
    """``model`` as a name (loaded where the command likes), or loaded on the checked ``--device``."""
    if device is None:
        return model
    from kvjudge.models import load_model

    return load_model(model, device=checked_device(device))


def cmd_diagnose(args: argparse.Namespace) -> int:
    from kvjudge.experiments.config import parse_seeds
    from kvjudge.experiments.diagnostics import run_diagnose

    positive("limit", args.limit)
    nonnegative("offset", args.offset)
    methods = _names("methods", args.methods, METHOD_ORDER, "judge method")
    out = Path(args.out) if args.out else Path("runs") / "diagnose"
    result = run_diagnose(args.kind, args.candidates, _model_on(args.model, args.device), methods, args.candidate_kv, parse_seeds(args.seeds),
                          args.limit, out, dataset=args.dataset, topology=args.topology, offset=args.offset,
                          sample_seed=args.sample_seed, debias=args.judge_debias or "none")
    print(f"-> {result['report']}")
    return 0


def cmd_bench_compress(args: argparse.Namespace) -> int:
    from kvjudge.experiments.bench.compress import bench_compress
    from kvjudge.experiments.config import parse_seeds

    positive("limit", args.limit)
    path = Path(args.candidates).expanduser()
    if not path.is_file():
        raise UserError(f"--candidates: file not found: {path}")
    methods = _names("methods", args.methods, COMPRESSION_METHODS, "compression method")
    judge_methods = _names("judge-methods", args.judge_methods, METHOD_ORDER, "judge method")
    out = Path(args.out) if args.out else Path("runs") / "bench-compress"
    result = bench_compress(path, _model_on(args.model, args.device), methods, _floats("ratios", args.ratios),
                            judge_methods,
                            candidate_kv=args.candidate_kv, seeds=parse_seeds(args.seeds), limit=args.limit,
                            out_dir=out, dataset=args.dataset, debias=args.judge_debias or "none")
    if args.json:
        print(json.dumps(result))
        return 0
    for p in result.get("points", []):
        jcr = "-" if p["jcr"] is None else f"{p['jcr']:.3f}"
        print(f"{p['method']:<10} kept {p['ratio']:<5g} {p['judge_method']:<8} JCR {jcr}  vs uncompressed "
              f"{p.get('jcr_vs_uncompressed')}  score shift {p.get('score_shift')}  bytes {p.get('store_bytes')}")
    print(f"-> {out / 'compress.json'}")
    return 0


def cmd_bench_generate(args: argparse.Namespace) -> int:
    from kvjudge.experiments.bench.generate import bench_generation
    from kvjudge.models import load_model

    positive("new-tokens", args.new_tokens)
    positive("repeats", args.repeats)
    try:
        sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes: {args.batch_sizes!r} is not a comma-separated list of integers") from None
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise UserError(f"--batch-sizes: give distinct positive integers, at least one (got {args.batch_sizes!r})")
    result = bench_generation(load_model(args.model, device=checked_device(args.device)), sizes, args.new_tokens,
                              repeats=args.repeats)
    if args.json:
        print(json.dumps(result))
        return 0
    for b, row in result["batches"].items():
        print(f"batch {b:<3} {row['tokens_per_s']:8.2f} tokens/s  ({result['speedup'][b]:.2f}x)  "
              f"{row['tokens']} tokens in {row['seconds']:.2f} s")
    print(f"{result['new_tokens']} tokens per request, {result['threads']} threads, {result['device']}")
    return 0


# ---------------------------------------------------------------------------- method options and gates
def _add_method_options(p: argparse.ArgumentParser, gate: bool = False) -> None:
    p.add_argument("--method-option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="an option of a judge method (repeat), e.g. selective.gate=gate.json; unknown keys are errors")
    if gate:
        p.add_argument("--gate", default=None, metavar="FILE",
                       help="the selective method's gate file (kvjudge calibrate-gate), = --method-option selective.gate=FILE")


def method_options_of(args: argparse.Namespace) -> dict[str, dict]:
    """``{method: {key: value}}`` from ``--method-option`` (and ``--gate``); one-line errors for unknown ones."""
    from kvjudge.judges.catalog import parse_method_options

    options = parse_method_options(getattr(args, "method_option", None) or [])
    gate = getattr(args, "gate", None)
    if gate is not None:
        if not Path(gate).expanduser().is_file():
            raise UserError(f"--gate: file not found: {gate}")
        options.setdefault("selective", {})["gate"] = str(Path(gate).expanduser())
    if options:
        from kvjudge.judges.methods import make_method

        for name, opts in options.items():
            make_method(name, **opts)  # bad values or gate files: one line, before any model loads
    return options


def _gate_parsers(sub: argparse._SubParsersAction) -> None:
    """``calibrate-gate``."""
    c = sub.add_parser("calibrate-gate", help="fit a selective gate with a guarantee on calibration problems")
    _add_model(c, default="smollm2-135m")
    c.add_argument("--candidates", required=True, help="candidates.jsonl of the calibration problems")
    c.add_argument("--data", default=None, help="read the problems' dataset from this JSONL(.gz)")
    c.add_argument("--limit", type=int, default=None, help="N problems of the file (dataset sampling order)")
    c.add_argument("--offset", type=int, default=0, help="skip the first K problems of the file")
    c.add_argument("--alpha", type=float, default=0.05, help="bound on disagreement with dense among accepted calls")
    c.add_argument("--delta", type=float, default=0.1, help="the bound holds with probability >= 1 - delta")
    c.add_argument("--score", choices=["margin", "risk"], default="margin", help="the gate's confidence")
    c.add_argument("--cheap", default="naive", help="the cheap path: naive, or any reuse method, e.g. partial:16")
    c.add_argument("--candidate-kv", choices=CANDIDATE_KV_MODES, default="agent", help="default agent")
    c.add_argument("--judge-debias", default="none", help="slot-prior debiasing of the judge (none, pride, content_free)")
    c.add_argument("--seeds", default="42", help="shuffle seeds (one call per problem and seed; default 42)")
    c.add_argument("--fit-share", type=float, default=0.5,
                   help="score risk: share of the problems that fit the risk model (lambda is set on the rest)")
    c.add_argument("--out", required=True, help="the gate file to write (gate.json)")
    c.set_defaults(func=cmd_calibrate_gate)


def _bench_gates_parser(bsub: argparse._SubParsersAction) -> None:
    bg = bsub.add_parser("gates", help="JCR vs cost of selective gates on held-out problems, with baselines")
    _add_model(bg, default="smollm2-135m")
    bg.add_argument("--calibration", required=True, help="candidates.jsonl the gates are calibrated on")
    bg.add_argument("--test", required=True, help="candidates.jsonl of held-out problems (every point is measured here)")
    bg.add_argument("--data-calibration", default=None, help="dataset JSONL(.gz) for the calibration problems")
    bg.add_argument("--data-test", default=None, help="dataset JSONL(.gz) for the test problems")
    bg.add_argument("--limit-calibration", type=int, default=None)
    bg.add_argument("--limit-test", type=int, default=None)
    bg.add_argument("--alphas", default="0.02,0.05,0.1", help="risk levels (default 0.02,0.05,0.1)")
    bg.add_argument("--delta", type=float, default=0.1)
    bg.add_argument("--cheap", action="append", default=None,
                    help="a cheap path (repeat; default naive, plus partial:16 when partial is registered)")
    bg.add_argument("--candidate-kv", choices=CANDIDATE_KV_MODES, default="agent", help="default agent")
    bg.add_argument("--judge-debias", default="none", help="none, pride or content_free")
    bg.add_argument("--seeds", default="42", help="shuffle seeds")
    bg.add_argument("--fit-share", type=float, default=0.5)
    bg.add_argument("--no-dg-jkr", action="store_true", help="leave DG-JKR out")
    bg.add_argument("--out", default=None, help="output folder (default runs/bench-gates)")
    bg.add_argument("--json", action="store_true")
    bg.set_defaults(func=cmd_bench_gates)


def cmd_calibrate_gate(args: argparse.Namespace) -> int:
    from kvjudge.experiments.calibrate_gate import calibrate_gate
    from kvjudge.experiments.config import parse_seeds

    positive("limit", args.limit)
    if args.offset < 0:
        raise UserError(f"--offset must be >= 0, got {args.offset}")
    if not Path(args.candidates).expanduser().is_file():
        raise UserError(f"--candidates: file not found: {args.candidates}")
    gate = calibrate_gate(Path(args.candidates).expanduser(), args.out, args.model, args.alpha, args.delta, args.score,
                          args.cheap, args.candidate_kv, args.judge_debias, args.data, args.offset, args.limit,
                          parse_seeds(args.seeds), args.fit_share, checked_device(args.device),
                          progress=lambda d: print(f"calibrating {d}", file=sys.stderr))
    lam = "inf (nothing passed: every call falls back to dense)" if gate["lambda"] is None else f"{gate['lambda']:.4g}"
    print(f"lambda {lam}: {gate['accepted']} of {gate['n']} calibration calls accepted, {gate['errors']} disagree; "
          f"bound {gate['bound']} <= alpha {gate['alpha']} at delta {gate['delta']} -> {args.out}")
    return 0


def cmd_bench_gates(args: argparse.Namespace) -> int:
    from kvjudge.experiments.bench.gates import bench_gates
    from kvjudge.experiments.config import parse_seeds

    for flag in ("calibration", "test"):
        if not Path(getattr(args, flag)).expanduser().is_file():
            raise UserError(f"--{flag}: file not found: {getattr(args, flag)}")
    positive("limit-calibration", args.limit_calibration)
    positive("limit-test", args.limit_test)
    out = Path(args.out) if args.out else Path("runs") / "bench-gates"
    result = bench_gates(Path(args.calibration).expanduser(), Path(args.test).expanduser(), out, args.model,
                         _floats("alphas", args.alphas), args.delta, args.cheap, args.data_calibration, args.data_test,
                         args.candidate_kv, args.judge_debias, parse_seeds(args.seeds), args.limit_calibration,
                         args.limit_test, args.fit_share, not args.no_dg_jkr, checked_device(args.device),
                         progress=None if args.json else (lambda d: print(f"judging {d}", file=sys.stderr)))
    if args.json:
        print(json.dumps(result))
    else:
        print((out / "frontier.md").read_text(encoding="utf-8"))
        print(f"-> {out / 'bench_gates.json'}, {out / 'frontier.md'}, {out / 'frontier.png'}")
    return 0


# ---------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    # SIGTERM takes Ctrl-C's path (the Ray runner puts this handler back after Ray installs its own)
    before = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        code, word = stop_code(exc)
        print(f"kvjudge: {word}", file=sys.stderr)
        return code
    except (ValueError, FileNotFoundError, PermissionError, OSError) as exc:
        if os.environ.get("KVJUDGE_DEBUG"):
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"kvjudge {args.command}: error: {msg}", file=sys.stderr)
        return 2
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
