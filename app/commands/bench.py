"""``kvjudge bench``: judge, run, compress, gates and generate (:mod:`kvjudge.experiments.bench`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvjudge.app.commands.common import (
    Parser,
    UserError,
    add_debias,
    add_method_options,
    add_model,
    checked_device,
    float_list,
    judge_permutations,
    method_options_of,
    model_on,
    name_list,
    positive,
    replicas_arg,
)
from kvjudge.cache.compress.catalog import COMPRESSION_METHODS
from kvjudge.judges.candidate import CANDIDATE_KV_MODES
from kvjudge.judges.catalog import DEFAULT_METHODS, METHOD_ORDER


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``bench judge``, ``bench run``, ``bench compress``, ``bench gates`` and ``bench generate``."""
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True, parser_class=Parser)
    bj = bsub.add_parser("judge", help="time every judge method on the same cached candidates")
    add_model(bj)
    bj.add_argument("--candidates", type=int, default=4)
    bj.add_argument("--candidate-tokens", type=int, default=256)
    bj.add_argument("--repeats", type=int, default=5)
    bj.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="comma-separated methods (default all but those needing a gate file)")
    bj.add_argument("--candidate-kv", choices=CANDIDATE_KV_MODES, default="judge_prefix",
                    help="where candidate KV comes from (default judge_prefix)")
    bj.add_argument("--json", action="store_true")
    add_debias(bj, permutations=True)
    add_method_options(bj)
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
    add_model(bc, default="smollm2-135m")
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
    add_debias(bc)
    bc.set_defaults(func=cmd_bench_compress)
    _bench_gates_parser(bsub)

    bgen = bsub.add_parser("generate", help="greedy generation throughput per batch size of a real model")
    add_model(bgen, default="smollm2-135m")
    bgen.add_argument("--batch-sizes", default="1,4", help="comma-separated batch sizes; speed-ups are over the "
                                                           "first (default 1,4)")
    bgen.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per request, no early stop (default 64)")
    bgen.add_argument("--repeats", type=int, default=1, help="timed runs per batch size, the best counts (default 1)")
    bgen.add_argument("--json", action="store_true")
    bgen.set_defaults(func=cmd_bench_generate)


def _bench_gates_parser(bsub: argparse._SubParsersAction) -> None:
    bg = bsub.add_parser("gates", help="JCR vs cost of selective gates on held-out problems, with baselines")
    add_model(bg, default="smollm2-135m")
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


def cmd_bench_judge(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvjudge.app.render import bench_judge_table
    from kvjudge.experiments.bench.judge import bench_judge

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for flag in ("candidates", "candidate_tokens", "repeats"):
        positive(flag.replace("_", "-"), getattr(args, flag))
    result = bench_judge(args.model, args.candidates, args.candidate_tokens, args.repeats, methods,
                         checked_device(args.device),
                         progress=not args.json, candidate_kv=args.candidate_kv,
                         method_options=method_options_of(args, ["dense", *methods], f"--methods {args.methods}"),
                         debias=args.judge_debias or "none",
                         permutations=judge_permutations(args))
    if args.json:
        print(json.dumps(result))
    else:
        Console().print(bench_judge_table(result))
    return 0


def cmd_bench_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kvjudge.app.render import bench_run_table
    from kvjudge.experiments.bench.run import bench_run

    positive("limit", args.limit)
    positive("concurrency", args.concurrency)
    result = bench_run(args.topology, args.model, args.problems, concurrency=args.concurrency,
                       replicas=replicas_arg(args.replicas), address=args.address, limit=args.limit)
    if args.json:
        print(json.dumps(result))
        return 0
    Console().print(bench_run_table(result))
    return 0


def cmd_bench_compress(args: argparse.Namespace) -> int:
    from kvjudge.experiments.bench.compress import bench_compress
    from kvjudge.experiments.config import parse_seeds

    positive("limit", args.limit)
    path = Path(args.candidates).expanduser()
    if not path.is_file():
        raise UserError(f"--candidates: file not found: {path}")
    methods = name_list("methods", args.methods, COMPRESSION_METHODS, "compression method")
    judge_methods = name_list("judge-methods", args.judge_methods, METHOD_ORDER, "judge method")
    out = Path(args.out) if args.out else Path("runs") / "bench-compress"
    result = bench_compress(path, model_on(args.model, args.device), methods, float_list("ratios", args.ratios),
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
                         float_list("alphas", args.alphas), args.delta, args.cheap, args.data_calibration, args.data_test,
                         args.candidate_kv, args.judge_debias, parse_seeds(args.seeds), args.limit_calibration,
                         args.limit_test, args.fit_share, not args.no_dg_jkr, checked_device(args.device),
                         progress=lambda d: print(f"judging {d}", file=sys.stderr))  # stderr: --json's stdout stays JSON
    if args.json:
        print(json.dumps(result))
    else:
        print((out / "frontier.md").read_text(encoding="utf-8"))
        print(f"-> {out / 'bench_gates.json'}, {out / 'frontier.md'}, {out / 'frontier.png'}")
    return 0
