"""``kvjudge env``: versions (and the tested set), device, sandbox and model cache, for a bug report."""

from __future__ import annotations

import argparse
import json


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``env``: versions, tested set, device, sandbox and model cache, for a bug report."""
    e = sub.add_parser("env", help="versions (and the tested set), device, sandbox, model cache: for bug reports")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_env)


def cmd_env(args: argparse.Namespace) -> int:
    from kvjudge.app.envinfo import collect, render

    info = collect()
    print(json.dumps(info, indent=1) if args.json else render(info))
    return 0
