"""``kvjudge diagnose``: why a reusing judge flips (attention, progressive, hybrid, risk)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvjudge.app.commands.common import add_debias, add_model, add_sampling, model_on, name_list, nonnegative, positive
from kvjudge.judges.candidate import CANDIDATE_KV_MODES
from kvjudge.judges.catalog import METHOD_ORDER


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``diagnose``."""
    g = sub.add_parser("diagnose", help="why a reusing judge flips: attention, progressive, hybrid, risk")
    g.add_argument("kind", choices=["attention", "progressive", "hybrid", "risk", "all"])
    add_model(g, default="smollm2-135m")
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
    add_debias(g)
    g.set_defaults(func=cmd_diagnose)


def cmd_diagnose(args: argparse.Namespace) -> int:
    from kvjudge.experiments.config import parse_seeds
    from kvjudge.experiments.diagnostics import run_diagnose

    positive("limit", args.limit)
    nonnegative("offset", args.offset)
    methods = name_list("methods", args.methods, METHOD_ORDER, "judge method")
    out = Path(args.out) if args.out else Path("runs") / "diagnose"
    result = run_diagnose(args.kind, args.candidates, model_on(args.model, args.device), methods, args.candidate_kv, parse_seeds(args.seeds),
                          args.limit, out, dataset=args.dataset, topology=args.topology, offset=args.offset,
                          sample_seed=args.sample_seed, debias=args.judge_debias or "none")
    print(f"-> {result['report']}")
    return 0
