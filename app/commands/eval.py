"""``kvjudge eval``: the DG-JKR evaluation protocol (generate once, judge under shuffles, report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvjudge.app.commands.common import (
    UserError,
    add_judge_modes,
    add_method_options,
    add_model,
    add_sampling,
    checked_device,
    default_out,
    judge_max_tokens,
    judge_permutations,
    method_options_of,
    parse_compress,
    stop_code,
)
from kvjudge.experiments.datasets import DATASET_NAMES
from kvjudge.judges.catalog import DEFAULT_METHODS


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``eval``."""
    e = sub.add_parser("eval", help="DG-JKR evaluation protocol: generate once, judge under shuffles, report")
    e.add_argument("dataset", choices=DATASET_NAMES, help="benchmark")
    add_model(e, default="smollm2-135m")
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
    add_judge_modes(e, "agent")
    e.add_argument("--gate-arm", default="naive", help="the random gate's reuse arm: naive, kvcomm or pal_kv")
    e.add_argument("--compress", default=None, help="token-compress stored candidate KV: METHOD:RATIO (kept fraction), e.g. laprox:0.25")
    e.add_argument("--calibrate-on", type=int, default=0, metavar="K",
                   help="with --judge-debias: estimate the slot priors on the first K problems of the order and "
                        "judge and score only the rest (summary.json lists them under config.calibration)")
    e.add_argument("--rescore-from", default=None, metavar="DIR",
                   help="an eval folder of the same candidates, model and modes: its dense, naive and partial calls "
                        "are re-scored under this run's --judge-debias (same forward passes, prior swapped) instead "
                        "of judged again; other methods are judged")
    e.add_argument("--unsafe-exec", action="store_true",
                   help="grade generated code even when no sandbox isolation is available (not recommended)")
    add_method_options(e, gate=True)
    e.set_defaults(func=cmd_eval)


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
        judge_permutations=judge_permutations(args), calibrate_on=args.calibrate_on,
        rescore_from=Path(args.rescore_from).expanduser() if args.rescore_from else None,
    )
    cfg.method_options = method_options_of(args, cfg.methods, f"--methods {','.join(cfg.methods)}") or None
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
