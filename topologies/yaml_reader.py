"""The capped YAML reader of topology files, and the line map that lets every error name its line.

The reader is capped before anything is built: input size (:data:`MAX_TOPOLOGY_BYTES`), nesting
depth (:data:`MAX_YAML_DEPTH`), alias uses (:data:`MAX_YAML_ALIASES`) and the node count with every
alias expanded (:data:`MAX_YAML_NODES`, counted as nodes are composed), so an alias bomb, deep
nesting or a huge flat list fails within a fraction of a second; recursive aliases are refused.
Every problem raises :class:`~kvjudge.topologies.schema.TopologyError` with a one-line message.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from kvjudge.topologies.schema import TopologyError, format_path

MAX_TOPOLOGY_BYTES = 1 << 20  # 1 MiB: a topology is a few KB
MAX_YAML_DEPTH = 64  # nesting levels (shipped files use 4)
MAX_YAML_ALIASES = 1000  # uses of ``*anchor``
MAX_YAML_NODES = 10_000  # nodes with every alias expanded (what validation walks); shipped files: ~100


def read_capped(path: Path, source: str) -> str:
    """The file's text, reading at most ``MAX_TOPOLOGY_BYTES + 1`` bytes (so ``/dev/zero`` ends);
    ``source`` names the file in error messages."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_TOPOLOGY_BYTES + 1)
    except FileNotFoundError:
        raise TopologyError("no such topology file", file=source) from None
    except IsADirectoryError:
        raise TopologyError("is a directory, not a topology file", file=source) from None
    except OSError as exc:
        raise TopologyError(f"cannot read topology file: {exc.strerror or exc}", file=source) from None
    except ValueError as exc:  # an embedded NUL in the path
        raise TopologyError(f"cannot read topology file: {exc}", file=source) from None
    if len(raw) > MAX_TOPOLOGY_BYTES:
        raise TopologyError(f"topology file is larger than {MAX_TOPOLOGY_BYTES} bytes", file=source)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TopologyError(f"not UTF-8 text: {exc.reason} at byte {exc.start}", file=source) from None


def parse_yaml(text: str, source: str) -> tuple[object, dict]:
    """``(data, lines)`` where ``lines`` maps key paths (str keys, int indices) to 1-based lines;
    ``data`` is ``None`` for an empty document. Duplicate keys are refused."""
    loader = None
    try:
        loader = _CappedLoader(text)  # the reader already refuses control characters here
        node = loader.get_single_node()
        lines: dict = {}
        if node is not None:
            lines[()] = node.start_mark.line + 1
            _record(node, (), lines, source)  # before constructing: merge keys (<<) rewrite nodes
            data = loader.construct_document(node)
        else:
            data = None
    except _YamlLimit as exc:
        line = exc.mark.line + 1 if exc.mark else None
        raise TopologyError(exc.problem, file=source, line=line) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        col = f" at column {mark.column + 1}" if mark else ""
        raise TopologyError(f"YAML syntax error: {what}{col}", file=source, line=line) from None
    except yaml.YAMLError as exc:
        raise TopologyError(f"YAML error: {exc}", file=source) from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


class _YamlLimit(Exception):
    """A cap hit or an unreadable value while reading YAML: ``problem`` at ``mark``."""

    def __init__(self, problem: str, mark: yaml.Mark | None):
        super().__init__(problem)
        self.problem = problem
        self.mark = mark


class _CappedLoader(yaml.SafeLoader):
    """``SafeLoader`` that counts while composing: nesting depth, alias uses and nodes with aliases
    expanded (a DAG of shared nodes is measured as the tree it stands for), refusing as soon as a
    cap is passed; an alias to a node that is still open (a recursive structure) is refused.
    (Overrides PyYAML's ``Composer.compose_node`` and ``BaseConstructor.construct_object`` hooks.)"""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._sizes: dict[int, int] = {}  # id(node) -> expanded node count, set when the node is complete
        self._total = 0  # nodes so far, aliases expanded

    def compose_node(self, parent, index):  # noqa: D102 (PyYAML hook)
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise _YamlLimit(f"YAML refused: more than {MAX_YAML_ALIASES} aliases", mark)
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:
                raise _YamlLimit("YAML refused: recursive alias (an anchor used inside itself)", mark)
            self._count(self._sizes[id(node)], mark)
            return node
        mark = self.peek_event().start_mark
        self._count(1, mark)
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _YamlLimit(f"YAML refused: nested deeper than {MAX_YAML_DEPTH} levels", mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        self._sizes[id(node)] = 1 + sum(self._sizes[id(child)] for child in children)
        return node

    def _count(self, nodes: int, mark: yaml.Mark) -> None:
        self._total += nodes
        if self._total > MAX_YAML_NODES:
            raise _YamlLimit(f"YAML refused: more than {MAX_YAML_NODES} values once aliases are expanded", mark)

    def construct_object(self, node, deep=False):  # noqa: D102 (PyYAML hook)
        try:
            return super().construct_object(node, deep)
        except ValueError as exc:  # e.g. an int beyond Python's digit limit
            raise _YamlLimit(f"YAML value cannot be read: {exc}", node.start_mark) from None


def _record(node: yaml.Node, path: tuple, lines: dict, source: str) -> None:
    """Fill ``lines`` with the 1-based line of every key and item under ``node`` (at ``path``);
    refuse a duplicate key (the merge key ``<<`` may repeat)."""
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else f"<{key.id} key>"
            if name in seen and name != "<<":
                raise TopologyError("duplicate key", file=source, line=key.start_mark.line + 1,
                                    path=format_path(path + (name,)))
            seen.add(name)
            lines[path + (name,)] = key.start_mark.line + 1
            _record(value, path + (name,), lines, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _record(item, path + (i,), lines, source)
