"""Pydantic validation errors -> one :class:`~kvjudge.topologies.schema.TopologyError` line
(``FILE:LINE: key.path: problem (got VALUE)``), and the did-you-mean hint every topology message uses."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable

from pydantic import BaseModel, ValidationError

from kvjudge.topologies.schema import Topology, TopologyError, format_path, lookup_line


def translate(exc: ValidationError, source: str, lines: dict) -> TopologyError:
    """The error to report for ``exc``: the one on the earliest line of ``source`` (``lines``: key
    path -> line, from :func:`~kvjudge.topologies.yaml_reader.parse_yaml`). One value failing every
    member of a union gives one message joining what each member wanted."""
    raw = exc.errors()
    errors = [_convert(err, source, lines) for err in raw]
    order = sorted(range(len(errors)), key=lambda i: errors[i].line or 0)
    first = errors[order[0]]
    same = [errors[i] for i in order if errors[i].path == first.path and errors[i].line == first.line]
    if len(same) > 1:  # one value failing every member of a union: say what each wanted
        problems = list(dict.fromkeys(e.problem for e in same))
        got = raw[order[0]].get("input", ...)
        return TopologyError(" or ".join(problems), file=source, line=first.line, path=first.path, got=got)
    return first


def hint(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` to ``word``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(err: dict, source: str, lines: dict) -> TopologyError:
    path, model, key_error = _clean_loc(err["loc"])
    line = lookup_line(lines, path)
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = list(model.model_fields) if model is not None else []
        problem = f"unknown key {path[-1]!r}{hint(str(path[-1]), allowed)}"
        if allowed:
            problem += f"; allowed: {', '.join(allowed)}"
        return TopologyError(problem, file=source, line=line, path=format_path(path))
    if kind == "missing":
        return TopologyError("missing required key", file=source, line=lookup_line(lines, path[:-1]),
                             path=format_path(path))
    if key_error:
        return TopologyError("keys must be strings", file=source, line=line, path=format_path(path),
                             got=err.get("input"))
    msg = err["msg"]
    msg = msg[0].lower() + msg[1:] if msg else kind
    return TopologyError(msg, file=source, line=line, path=format_path(path), got=err.get("input"))


def _clean_loc(loc: tuple) -> tuple[tuple, type | None, bool]:
    """Drop pydantic's union/key tags from ``loc``; return the key path, the model owning the last
    key (for extra-key hints) and whether the error is about a mapping key."""
    tp: object = Topology
    owner: type | None = None
    path: list = []
    for part in loc:
        if part == "[key]":
            return tuple(path), owner, True
        tp = _strip_optional(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            owner = tp
            path.append(part)
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                break
            tp = field.annotation
        elif typing.get_origin(tp) is dict:
            path.append(str(part))
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) is list:
            path.append(part)
            tp = typing.get_args(tp)[0]
        else:
            break  # a union member tag or a scalar: the path ends here
    return tuple(path), owner, False


def _strip_optional(tp: object) -> object:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _strip_optional(args[0])
    return tp
