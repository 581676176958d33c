"""The ``kvjudge`` command line. Every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError)


class UserError(ValueError):
    """An error caused by the user's input; printed as one line."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage dump) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def read_text(value: str) -> str:
    """``@path`` reads the text from a file; anything else is the text itself."""
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    return value


def _add_model(p: argparse.ArgumentParser, default: str = "tiny-llama") -> None:
    p.add_argument(
        "--model",
        default=os.environ.get("KVJUDGE_MODEL", default),
        help=f"built-in alias (tiny-llama, tiny-qwen2, smollm2-135m) or a local checkpoint folder (default {default})",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def build_parser() -> Parser:
    from kvjudge.judges.methods import known_methods

    methods = known_methods()
    root = Parser(prog="kvjudge", description="Multi-agent LLM pipelines with a KV-reusing judge.")
    sub = root.add_subparsers(dest="command", required=True, parser_class=Parser)

    j = sub.add_parser("judge", help="pick the best candidate with one judge method")
    _add_model(j)
    j.add_argument("--method", default="dense", help=f"one of: {', '.join(methods)}")
    j.add_argument("--problem", required=True, help="problem text, or @file")
    j.add_argument("--candidate", action="append", default=[], help="a candidate text or @file (repeat)")
    j.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    j.set_defaults(func=cmd_judge)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True, parser_class=Parser)
    bj = bsub.add_parser("judge", help="time every judge method on the same cached candidates")
    _add_model(bj)
    bj.add_argument("--candidates", type=int, default=4)
    bj.add_argument("--candidate-tokens", type=int, default=256)
    bj.add_argument("--repeats", type=int, default=5)
    bj.add_argument("--methods", default=",".join(methods), help="comma-separated methods (default all)")
    bj.add_argument("--json", action="store_true")
    bj.set_defaults(func=cmd_bench_judge)

    from kvjudge.app import commands

    commands.add_subcommands(sub, _add_model)
    return root


def cmd_judge(args: argparse.Namespace) -> int:
    from kvjudge.models import load_model
    from kvjudge.judges.methods import make_method
    from kvjudge.judges.judge import Judge
    from kvjudge.judges.prompt import JudgeInputError

    make_method(args.method)  # unknown method: fail before loading a model
    problem = read_text(args.problem)
    candidates = [read_text(c) for c in args.candidate]
    if not candidates:
        raise JudgeInputError("no candidates to judge: give at least one --candidate")
    judge = Judge(load_model(args.model, device=args.device), method=args.method)
    verdict = judge.judge(problem, candidates)
    if args.json:
        print(json.dumps(verdict.to_dict()))
        return 0
    from kvjudge.app.render import verdict_table

    from rich.console import Console

    Console().print(verdict_table(verdict, candidates))
    return 0


def cmd_bench_judge(args: argparse.Namespace) -> int:
    from kvjudge.app.bench import bench_judge
    from kvjudge.app.render import bench_table

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for flag in ("candidates", "candidate_tokens", "repeats"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    result = bench_judge(args.model, args.candidates, args.candidate_tokens, args.repeats, methods, args.device,
                         progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        from rich.console import Console

        Console().print(bench_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("kvjudge: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if os.environ.get("KVJUDGE_DEBUG"):
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"kvjudge {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
