"""Sub-commands beyond judge/bench: validate, run (and the ones that build on them)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable


def add_subcommands(sub: argparse._SubParsersAction, add_model: Callable) -> None:
    v = sub.add_parser("validate", help="check a topology YAML file")
    v.add_argument("file", help="a topology file or a shipped name (progressive_refinement, debate, heterogeneous)")
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("run", help="run a topology over problems on Ray")
    r.add_argument("file", help="a topology file or a shipped name")
    r.add_argument("--model", default=None, help="override the topology's default model (agents and judge)")
    r.add_argument("--problems", default="humaneval", help="humaneval | gsm8k | mmlu | FILE.jsonl with {id, prompt}")
    r.add_argument("--limit", type=int, default=None, help="first N problems only")
    r.add_argument("--address", default=None, help="Ray address (auto, ray://host:10001); default: embedded local Ray")
    r.add_argument("--out", default=None, help="output folder (default runs/<topology name>)")
    r.add_argument("--resume", action="store_true", help="continue OUT/results.jsonl, skipping finished problems")
    r.add_argument("--no-dashboard", action="store_true", help="plain progress lines instead of the live dashboard")
    r.set_defaults(func=cmd_run)
    from kvjudge.experiments.protocol import add_eval_command; add_eval_command(sub, add_model)
    from kvjudge.app.dashboard import add_dashboard_command; add_dashboard_command(sub)  # noqa: E702


def cmd_validate(args: argparse.Namespace) -> int:
    from kvjudge.topologies import build_graph, generations, load_topology, resolve_topology

    topo = load_topology(resolve_topology(args.file))
    graph = build_graph(topo)
    order = " -> ".join("{" + ", ".join(g) + "}" for g in generations(graph))
    print(f"{topo.name}: ok — {len(topo.agents)} agents, {graph.number_of_edges()} edges, rounds {topo.rounds}, "
          f"judge {topo.judge.method}; generations {order}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from kvjudge.app.runtime import load_problems, run
    from kvjudge.topologies import load_topology, resolve_topology

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    topo = load_topology(resolve_topology(args.file))
    problems = load_problems(args.problems, args.limit)
    out = Path(args.out or Path("runs") / topo.name)
    reporter = choose_reporter(args.no_dashboard)
    try:
        counts = run(topo, problems, out, model=args.model, address=args.address, resume=args.resume,
                     reporter=reporter)
    except KeyboardInterrupt:
        print(f"interrupted: finished problems are in {out / 'results.jsonl'} (continue with --resume)",
              file=sys.stderr)
        return 130
    print(f"{counts['done']} done, {counts['failed']} failed, {counts['skipped']} skipped -> {counts['results']}")
    return 1 if counts["failed"] and not counts["done"] else 0


def choose_reporter(no_dashboard: bool):
    """The live dashboard on a terminal, plain progress lines otherwise."""
    from kvjudge.app.runtime import PlainReporter

    if no_dashboard or not sys.stdout.isatty():
        return PlainReporter()
    try:
        from kvjudge.app.dashboard import LiveReporter
    except ImportError:
        return PlainReporter()
    return LiveReporter()
