"""Sub-commands beyond judge/bench: validate, run, eval, dashboard (added as they land)."""

from __future__ import annotations

import argparse
from typing import Callable


def add_subcommands(sub: argparse._SubParsersAction, add_model: Callable) -> None:
    return None
