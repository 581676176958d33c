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
    "partial": ("recompute_first", "blend"),
    "selective": ("cheap", "score", "gate"),
}
METHOD_ORDER: tuple[str, ...] = tuple(METHOD_OPTIONS)
GATE_METHODS: tuple[str, ...] = ("random_gate", "dg_jkr", "selective")  # methods whose outcome carries a ``gate``
# methods that need a calibration file to be useful: not in the default method lists of eval / bench judge
CALIBRATED_METHODS: tuple[str, ...] = ("selective",)
# opt-in methods: calibrated ones, and ``partial`` (a cheap path with a knob; name it with its options)
OPT_IN_METHODS: tuple[str, ...] = CALIBRATED_METHODS + ("partial",)
DEFAULT_METHODS: tuple[str, ...] = tuple(m for m in METHOD_ORDER if m not in OPT_IN_METHODS)
# a cheap path's bare value (``selective``'s ``cheap: partial:16``) names this option of its method
CHEAP_SHORTHAND: dict[str, str] = {"partial": "recompute_first"}


def method_options(method: str) -> tuple[str, ...]:
    """The option names of ``method`` (``KeyError`` for an unknown method)."""
    return METHOD_OPTIONS[method]


def ordered(methods) -> list[str]:
    """``methods`` in display order (unknown names last, in the order given)."""
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(methods, key=lambda m: rank.get(m, len(rank)))


def option_value(text: str) -> object:
    """An option's text as its value: ``true``/``false``, ``none``/``null``, an int, a float, else the text."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_method_options(items: list[str] | tuple[str, ...]) -> dict[str, dict[str, object]]:
    """``["partial.recompute_first=16", "selective.gate=gate.json"]`` (``--method-option``, repeatable) ->
    ``{method: {key: value}}`` (values: bool, null, int, float, else the text). Unknown methods or keys
    and malformed items are one-line ``ValueError``s."""
    out: dict[str, dict[str, object]] = {}
    for item in items:
        head, eq, value = str(item).partition("=")
        method, dot, key = head.strip().partition(".")
        if not eq or not dot or not method or not key.strip():
            raise ValueError(f"--method-option {item!r}: write METHOD.KEY=VALUE, e.g. selective.gate=gate.json")
        if method not in METHOD_OPTIONS:
            raise ValueError(f"--method-option: unknown judge method {method!r}; known: {', '.join(METHOD_ORDER)}")
        key = key.strip()
        if key not in METHOD_OPTIONS[method]:
            known = ", ".join(METHOD_OPTIONS[method]) or "none"
            raise ValueError(f"--method-option: unknown option {key!r} for {method}; known: {known}")
        out.setdefault(method, {})[key] = option_value(value.strip())
    return out
