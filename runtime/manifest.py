"""An output folder belongs to one run configuration: ``OUT/manifest.json``, kept beside the results.

A manifest is a small flat JSON object of what decides the records' meaning (``kvjudge run``: the
topology's name and hash, the model, the judge's candidate-KV and output modes, where the problems
came from; ``kvjudge eval`` adds the candidates file's hash and the data source). It is written when
a folder gets its first results; ``--resume`` into a folder with results compares it field by field
and refuses a difference in one line naming the field, so records of two configurations never mix.
What only changes speed or placement (replicas, concurrency, the store's budget) and what a resume
may extend (``--limit``, seeds, methods) is not in it. A folder with results but no manifest (written
before manifests existed) adopts the current one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kvjudge.runtime.results import ResultsError
from kvjudge.topologies.schema import Topology

MANIFEST = "manifest.json"


def digest(data: bytes | str) -> str:
    """``sha256:<first 16 hex digits>`` of ``data``."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    """:func:`digest` of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def topology_digest(topology: Topology) -> str:
    """The hash of what a topology makes of a problem: agents, edges, rounds, judge, store compression;
    not ``resources`` (placement) nor the store's budget and eviction (speed)."""
    data = topology.model_dump(mode="json")
    data.pop("resources", None)
    store = data.get("store") or {}
    data["store"] = {"compress": store.get("compress")}
    return digest(json.dumps(data, sort_keys=True))


def run_manifest(topology: Topology, model: str | None, problems: str | None) -> dict:
    """The manifest of ``kvjudge run``: topology name and hash, model (the override, else the
    topology's), the judge's candidate-KV and output modes, the problems' source."""
    # the hash last: a difference is named by the most specific field
    return {"topology": topology.name, "model": model or topology.defaults.model,
            "candidate_kv": topology.judge.candidate_kv, "output": topology.judge.output, "problems": problems,
            "topology_hash": topology_digest(topology)}


def check_manifest(folder: str | os.PathLike, manifest: dict, has_results: bool) -> None:
    """Keep ``folder`` to one configuration: with results there, ``manifest`` must equal the stored
    one (else a one-line :class:`ResultsError` naming the first field that differs); otherwise it is
    (re)written, atomically."""
    folder = Path(folder)
    path = folder / MANIFEST
    current = json.loads(json.dumps(manifest))  # as it reads back (tuples become lists)
    if has_results and path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = None
        if not isinstance(stored, dict):
            raise ResultsError(f"{path} is not a readable manifest: the results beside it cannot be matched to "
                               "this run; choose another --out")
        for key in [*current, *(k for k in stored if k not in current)]:
            if stored.get(key) != current.get(key):
                raise ResultsError(f"{folder} holds results of another configuration: {key} was "
                                   f"{stored.get(key)!r}, now {current.get(key)!r}; choose another --out")
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise ResultsError(f"cannot write {path}: {exc.strerror or exc}") from None
