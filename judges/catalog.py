"""Judge method names and option names, without importing torch (``--help`` and ``validate`` read this).

The classes live in :mod:`kvjudge.judges.methods` (the registry); a test checks that the two agree,
so this table cannot drift from the dataclasses it describes. The order here is the display order
of every table, plot and dashboard.
"""

from __future__ import annotations

_ANCHOR_OPTIONS = ("gamma", "max_anchors", "window", "top_p", "min_anchors", "tau")

METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "dense": (),
    "naive": (),
    "kvcomm": _ANCHOR_OPTIONS + ("pool_by",),
    "pal_kv": _ANCHOR_OPTIONS + ("pool_by",),
    "random_gate": ("coverage", "seed", "arm", "accept"),
    "dg_jkr": ("first", "second"),
}
METHOD_ORDER: tuple[str, ...] = tuple(METHOD_OPTIONS)
GATE_METHODS: tuple[str, ...] = ("random_gate", "dg_jkr")  # methods whose outcome carries a ``gate``


def method_options(method: str) -> tuple[str, ...]:
    """The option names of ``method`` (``KeyError`` for an unknown method)."""
    return METHOD_OPTIONS[method]


def ordered(methods) -> list[str]:
    """``methods`` in display order (unknown names last, in the order given)."""
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(methods, key=lambda m: rank.get(m, len(rank)))
