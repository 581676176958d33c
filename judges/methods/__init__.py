"""Judge methods, one per file, and the registry that names them (explicit, as ``cache/eviction``).

Each method is a dataclass (its options are its fields) whose ``__call__(engine, case)`` returns an
:class:`~kvjudge.judges.base.Outcome`. Names and option names are also listed, torch-free, in
:mod:`kvjudge.judges.catalog` (a test keeps the two equal); the catalog's order is the display order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from kvjudge.judges.base import JudgeCase, Outcome
from kvjudge.judges.catalog import METHOD_ORDER
from kvjudge.judges.methods.dense import Dense
from kvjudge.judges.methods.dg_jkr import DGJKR
from kvjudge.judges.methods.kvcomm import KVCOMM
from kvjudge.judges.methods.naive import Naive
from kvjudge.judges.methods.pal_kv import PALKV
from kvjudge.judges.methods.partial import Partial
from kvjudge.judges.methods.random_gate import RandomGate
from kvjudge.judges.methods.selective import Selective
from kvjudge.judges.prompt import JudgeInputError

if TYPE_CHECKING:
    from kvjudge.judges.engine import JudgeEngine


class JudgeMethod(Protocol):
    """A registered method: its registry ``name`` and ``__call__(engine, case) -> Outcome``."""

    name: str

    def __call__(self, engine: JudgeEngine, case: JudgeCase) -> Outcome: ...


METHODS: dict[str, type] = {
    "dense": Dense,
    "naive": Naive,
    "kvcomm": KVCOMM,
    "pal_kv": PALKV,
    "random_gate": RandomGate,
    "dg_jkr": DGJKR,
    "partial": Partial,
    "selective": Selective,
}
for _name, _cls in METHODS.items():
    _cls.name = _name


def known_methods() -> list[str]:
    """Registered method names in display order."""
    return [m for m in METHOD_ORDER if m in METHODS]


def make_method(name: str, **options) -> JudgeMethod:
    """Instantiate a registered method; unknown names and bad options are one-line errors."""
    if name not in METHODS:
        raise JudgeInputError(f"unknown judge method {name!r}; known methods: {', '.join(known_methods())}")
    try:
        return METHODS[name](**options)
    except TypeError as exc:
        raise JudgeInputError(f"bad options for judge method {name!r}: {exc}") from exc


__all__ = ["METHODS", "JudgeMethod", "known_methods", "make_method"]
