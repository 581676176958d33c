"""What a person sees of a run that is not the live dashboard: plain progress lines and the eval progress bar."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class PlainReporter:
    """One line per finished problem (and nothing else): what a non-terminal gets."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.done = 0
        self.total = 0

    def start(self, info: dict) -> None:
        self.total = info["total"]
        print(f"run {info['name']}: {info['total']} problems, agents {', '.join(info['agents'])}, "
              f"judge {info['method']} on {info['judge_node']}", file=self.stream, flush=True)

    def agent(self, agent: str, state: str, **stats: Any) -> None:
        return None

    def status(self, **fields: Any) -> None:
        return None

    def problem(self, record: dict) -> None:
        self.done += 1
        head = f"[{self.done}/{self.total}] {record['id']}"
        if record["status"] != "ok":
            print(f"{head}: FAILED: {record['error']}", file=self.stream, flush=True)
            return
        v = record["verdict"]
        gate = {"accepted": ", reuse accepted", "fallback": ", dense fallback"}.get(v.get("gate"), "")
        print(f"{head}: winner #{v['winner']} ({record['winner_agent']}) by {v['method']}{gate}, "
              f"{v['latency_ms']:.0f} ms, store {record['store'].get('entries', '?')} entries",
              file=self.stream, flush=True)

    def close(self) -> None:
        return None


def choose_reporter(no_dashboard: bool, stream: TextIO | None = None):
    """The live dashboard on a terminal, plain progress lines otherwise."""
    if no_dashboard or not sys.stdout.isatty():
        return PlainReporter(stream)
    from kvjudge.app.dashboard import LiveReporter  # rich.live + Ray: only when a terminal will show it

    return LiveReporter()


class EvalProgress:
    """The judging step's progress: a rich bar on a terminal's stderr, else a line every 10%."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.total, self.done, self.label = 0, 0, ""
        self._bar: Progress | None = None
        self._last_pct = -1

    def start(self, total: int, label: str) -> None:
        self.total, self.label = total, label
        if self.enabled and sys.stderr.isatty():
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(label, total=total)

    def advance(self, desc: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=f"{self.label} {desc}")
            return
        pct = int(100 * self.done / max(1, self.total))
        if pct // 10 != self._last_pct // 10 or self.done == self.total:
            self._last_pct = pct
            print(f"{self.label}: {self.done}/{self.total} ({pct}%) {desc}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
