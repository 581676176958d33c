"""``kvjudge calibrate`` (the judge's slot priors for ``--judge-debias``) and ``kvjudge calibrate-gate``
(a selective gate with a guarantee)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvjudge.app.commands.common import (
    UserError,
    add_method_options,
    add_model,
    add_sampling,
    checked_device,
    default_out,
    method_options_of,
    name_list,
    nonnegative,
    positive,
)
from kvjudge.experiments.datasets import DATASET_NAMES
from kvjudge.judges.candidate import CANDIDATE_KV_MODES, OUTPUT_MODES
from kvjudge.judges.catalog import METHOD_ORDER
from kvjudge.judges.debias import DEBIAS_MODES, prior_path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``calibrate``: the judge's slot priors for ``--judge-debias``."""
    c = sub.add_parser("calibrate", help="estimate and save the judge's slot priors per method (for --judge-debias)")
    c.add_argument("dataset", nargs="?", choices=DATASET_NAMES, default=None,
                   help="generate candidates for this benchmark as eval does (or: the data set a --candidates "
                        "file's task ids refer to)")
    add_model(c, default="smollm2-135m")
    c.add_argument("--candidates", default=None, help="a candidates.jsonl to estimate on (skips generation)")
    c.add_argument("--data", default=None, help="read the data set from this JSONL(.gz) instead of its package")
    c.add_argument("--limit", type=int, default=None, help="N candidate sets (in the sampling order)")
    add_sampling(c, "candidate sets")
    c.add_argument("--methods", default="dense",
                   help="comma-separated judge methods; a gate stands for the methods it runs (default dense)")
    add_method_options(c)  # a method's prior is per setting: partial.recompute_first=32 gets its own
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
    from kvjudge.experiments.calibrate import estimate, generated_file, items_from_file, render
    from kvjudge.judges.judge import Judge
    from kvjudge.models import load_model

    positive("limit", args.limit)
    nonnegative("offset", args.offset)
    methods = name_list("methods", args.methods, METHOD_ORDER, "judge method")
    options = method_options_of(args, methods, f"--methods {','.join(methods)}")
    if args.candidates is None and args.dataset is None:
        raise UserError(f"give --candidates FILE, or a data set ({', '.join(DATASET_NAMES)}) to generate candidates for")
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
    judge.configure(options)
    items = items_from_file(Path(path).expanduser(), judge, limit, offset, args.dataset, args.topology,
                            args.sample_seed)
    tables = estimate(judge, items, methods, args.judge_debias,
                      progress=lambda line: print(f"calibrate: {line}", file=sys.stderr),
                      on_method=lambda table: table.save())  # each method's prior kept as it completes
    print(render(tables, [prior_path(t.key) for t in tables]))  # all saved by now
    return 0


def add_gate_parsers(sub: argparse._SubParsersAction) -> None:
    """``calibrate-gate``."""
    c = sub.add_parser("calibrate-gate", help="fit a selective gate with a guarantee on calibration problems")
    add_model(c, default="smollm2-135m")
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
