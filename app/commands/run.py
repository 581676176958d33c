"""``kvjudge validate``, ``kvjudge run`` and ``kvjudge dashboard`` (attach to a run on a cluster)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvjudge.app.commands.common import (
    UserError,
    add_judge_modes,
    add_sampling,
    default_out,
    judge_max_tokens,
    nonnegative,
    parse_compress,
    positive,
    replicas_arg,
    stop_code,
)
from kvjudge.experiments.datasets import DATASET_NAMES
from kvjudge.judges.debias import check_debias


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``validate`` and ``run``."""
    v = sub.add_parser("validate", help="check a topology YAML file")
    v.add_argument("file", help="a topology file or a shipped name (progressive_refinement, debate, heterogeneous)")
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("run", help="run a topology over problems on Ray")
    r.add_argument("file", help="a topology file or a shipped name")
    r.add_argument("--model", default=None, help="override the topology's default model (agents and judge)")
    r.add_argument("--problems", default="humaneval", help=" | ".join((*DATASET_NAMES, "FILE.jsonl with {id, prompt}")))
    r.add_argument("--limit", type=int, default=None, help="N problems only (MMLU: stratified over subjects)")
    add_sampling(r)
    r.add_argument("--address", default=None, help="Ray address (auto, ray://host:10001); default: embedded local Ray")
    r.add_argument("--out", default=None, help="output folder (default runs/<topology name>)")
    r.add_argument("--resume", action="store_true", help="continue OUT/results.jsonl, skipping finished problems")
    r.add_argument("--concurrency", type=int, default=None,
                   help="problems in flight (default: enough to keep every agent replica busy)")
    r.add_argument("--replicas", default=None, help="agent actors per model: N or auto (default: the topology's)")
    r.add_argument("--no-dashboard", action="store_true", help="plain progress lines instead of the live dashboard")
    add_judge_modes(r, None)
    r.add_argument("--compress", default=None, help="token-compress stored candidate KV: METHOD:RATIO (kept fraction), e.g. laprox:0.25")
    r.set_defaults(func=cmd_run)


def add_dashboard_parser(sub: argparse._SubParsersAction) -> None:
    """``dashboard``."""
    d = sub.add_parser("dashboard", help="attach to the live dashboard of a run on a Ray cluster")
    d.add_argument("--address", default="auto", help="Ray address of the cluster (auto, HOST:6379, ray://HOST:10001)")
    d.add_argument("--interval", type=float, default=1.0, help="seconds between polls (default 1)")
    d.set_defaults(func=cmd_dashboard)


def cmd_validate(args: argparse.Namespace) -> int:
    from kvjudge.topologies import build_graph, generations, load_topology, resolve_topology

    topo = load_topology(resolve_topology(args.file))
    graph = build_graph(topo)
    order = " -> ".join("{" + ", ".join(g) + "}" for g in generations(graph))
    print(f"{topo.name}: ok — {len(topo.agents)} agents, {graph.number_of_edges()} edges, rounds {topo.rounds}, "
          f"judge {topo.judge.method}; generations {order}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from kvjudge.app.reporters import choose_reporter
    from kvjudge.experiments.datasets import load_problems
    from kvjudge.runtime.runner import run
    from kvjudge.topologies import load_topology, resolve_topology

    positive("limit", args.limit)
    positive("concurrency", args.concurrency)
    replicas = replicas_arg(args.replicas)
    topo = load_topology(resolve_topology(args.file))
    if args.judge_max_tokens is not None:
        judge_max_tokens(args.judge_max_tokens)
    modes = {k: v for k, v in (("candidate_kv", args.candidate_kv), ("output", args.judge_output),
                               ("max_tokens", args.judge_max_tokens), ("debias", args.judge_debias),
                               ("permutations", args.judge_permutations)) if v is not None}
    positive("judge-permutations", args.judge_permutations)
    if modes:
        topo = topo.with_overrides(judge=modes)
        check_debias(topo.judge.debias, topo.judge.output, topo.judge.permutations)  # the combination overridden
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


def cmd_dashboard(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvjudge.app.watch import connect_run, fetcher, watch

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
