"""The ``kvjudge`` command line: the parser and the entry point. Every user error is one line on
stderr and exit code 2 (``KVJUDGE_DEBUG=1`` shows the traceback).

Each command group lives in :mod:`kvjudge.app.commands` (its subparsers and handlers); what they
share (one-line errors, flag checks, common flags) is :mod:`kvjudge.app.commands.common`.

Imports: the parser is built from the standard library and torch-free tables only, and each command
imports its stack (torch, transformers, Ray) inside its handler, so ``kvjudge --help`` and
``kvjudge validate`` start in well under a second. That is the one place in the package where
imports inside functions are the rule, for that reason.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from kvjudge.app.commands import bench, calibrate, diagnose, env, judge, run
from kvjudge.app.commands import eval as eval_command
from kvjudge.app.commands.common import (  # noqa: F401  (re-exported: the CLI's helpers by their old names)
    Parser,
    Terminated,
    UserError,
    checked_device,
    checked_text,
    on_sigterm,
    read_text,
    stop_code,
)


def build_parser() -> Parser:
    """Every subcommand, in the order ``kvjudge --help`` lists them."""
    root = Parser(prog="kvjudge", description="Multi-agent LLM pipelines with a KV-reusing judge.")
    sub = root.add_subparsers(dest="command", required=True, parser_class=Parser)
    judge.add_parsers(sub)  # judge
    run.add_parsers(sub)  # validate, run
    eval_command.add_parsers(sub)  # eval
    diagnose.add_parsers(sub)  # diagnose
    run.add_dashboard_parser(sub)  # dashboard
    calibrate.add_parsers(sub)  # calibrate
    bench.add_parsers(sub)  # bench judge | run | compress | gates | generate
    calibrate.add_gate_parsers(sub)  # calibrate-gate
    env.add_parsers(sub)  # env
    return root


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    # SIGTERM takes Ctrl-C's path (the Ray runner puts this handler back after Ray installs its own)
    before = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
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


EXIT_GRACE_S = 30.0  # after Ctrl-C / SIGTERM, how long the interpreter's exit may take


def console() -> None:
    """The ``kvjudge`` command: :func:`main`, then exit. After an interrupt (results already closed), a
    daemon timer ends the process if the interpreter's exit (atexit hooks, Ray's among them, and the
    threads it joins) has not within :data:`EXIT_GRACE_S`, so a stopped run never hangs."""
    code = main()
    if code in (130, 143):
        timer = threading.Timer(EXIT_GRACE_S, lambda: (sys.stderr.flush(), os._exit(code)))
        timer.daemon = True
        timer.start()
    sys.exit(code)


if __name__ == "__main__":
    console()
