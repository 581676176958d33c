"""The one append-only JSONL log behind ``kvjudge run`` and ``kvjudge eval`` results.

* every record is one line, flushed and fsynced before :meth:`ResultsLog.append` returns, so a
  finished problem is on disk before it counts as done;
* a line torn by a crash (the file does not end in a newline) is cut off when the log is opened,
  so the next record starts on a clean line; lines that are not JSON objects are skipped;
* the log holds an exclusive ``flock`` on ``<folder>/.lock`` while open: a second run into the same
  folder gets a one-line :class:`ResultsError` instead of interleaving records;
* a folder that is a file, an unwritable folder or a full disk is a one-line :class:`ResultsError`;
  records already written stay where they are.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Callable, Hashable
from pathlib import Path


class ResultsError(ValueError):
    """The results cannot be written (locked, not a folder, disk full); one line."""


def _why(exc: OSError) -> str:
    return {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}.get(
        exc.errno, exc.strerror or type(exc).__name__)


class ResultsLog:
    """``path``: one JSON object a line. ``key(record)`` indexes records (the last one with a key wins)."""

    def __init__(self, path: str | Path, key: Callable[[dict], Hashable] | None = None, *, lock: bool = True) -> None:
        self.path = Path(path)
        self.key = key
        self._lock_fh = None
        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise ResultsError(f"{folder} is not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if lock:
                self._lock(folder)
            if self.path.is_dir():
                raise ResultsError(f"{self.path} is a folder, not a results file")
            self._records = self._read_and_repair()
        except OSError as exc:
            self.close()
            raise ResultsError(f"cannot use results folder {folder}: {_why(exc)}") from None
        except ResultsError:
            self.close()
            raise
        self._index = {self.key(r): r for r in self._records if self._keyable(r)} if key else {}

    def _lock(self, folder: Path) -> None:
        fh = open(folder / ".lock", "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise ResultsError(f"another kvjudge run is writing to {folder}: wait for it, or choose another --out") \
                from None
        self._lock_fh = fh

    def _read_and_repair(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # torn by a crash mid-write: drop the partial line
            data = data[: data.rfind(b"\n") + 1]
            with self.path.open("r+b") as fh:
                fh.truncate(len(data))
                fh.flush()
                os.fsync(fh.fileno())
        return _parse(data.decode("utf-8", errors="replace"))

    def _keyable(self, rec: dict) -> bool:
        try:
            self.key(rec)
            return True
        except (KeyError, TypeError, ValueError):
            return False

    @property
    def records(self) -> list[dict]:
        """Every record so far, in the order written."""
        return list(self._records)

    def latest(self) -> list[dict]:
        """The last record of every key, in key order of first appearance."""
        return list(self._index.values())

    def __contains__(self, key: Hashable) -> bool:
        return key in self._index

    def get(self, key: Hashable) -> dict | None:
        return self._index.get(key)

    def append(self, record: dict) -> None:
        """Write ``record`` as one line and make it durable before returning."""
        line = json.dumps(record) + "\n"
        try:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            self._read_and_repair()  # never leave a torn line behind for the next append
            raise ResultsError(f"cannot write {self.path}: {_why(exc)}; records written so far are kept") from None
        self._records.append(record)
        if self.key and self._keyable(record):
            self._index[self.key(record)] = record

    def close(self) -> None:
        """Release the folder lock (records are already durable)."""
        if self._lock_fh is not None:
            try:
                fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_UN)
            finally:
                self._lock_fh.close()
                self._lock_fh = None

    def __enter__(self) -> "ResultsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_records(path: str | Path) -> list[dict]:
    """The records of a results file without locking or repairing it (for readers of a finished run)."""
    path = Path(path)
    return _parse(path.read_text(encoding="utf-8", errors="replace")) if path.is_file() else []


def _parse(text: str) -> list[dict]:
    """The JSON objects of ``text``, one a line; other lines (torn, not JSON, not an object) are skipped."""
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
