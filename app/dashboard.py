"""The live dashboard: ``kvjudge run`` on a terminal, and ``kvjudge dashboard --address ADDR``.

* :func:`render` -- pure: a :class:`~kvjudge.runtime.telemetry.Snapshot` in, a rich renderable
  out (agents with who feeds whom, replicas per model, problems in flight, KV store, judge,
  progress with ETA). Stacked panels below 120 columns, agents beside store/judge from 120 up; it
  never draws wider than the console.
* :class:`LiveReporter` -- the Reporter a terminal gets: it folds events into a snapshot and
  shows it with ``rich.live.Live`` (4 refreshes/s, the final frame stays on screen). Publishing
  to the metrics actor is done by :class:`~kvjudge.runtime.telemetry.MetricsPublisher`, which
  the runner wraps around every reporter (this one and the plain printer alike).

Pure drawing: attaching to a run on a cluster (``kvjudge dashboard``) is :mod:`kvjudge.app.watch`.
"""

from __future__ import annotations

import threading
import time

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from kvjudge.runtime.telemetry import AgentStats, Snapshot, SnapshotTracker

WIDE = 120  # from this width on, agents sit beside the store and judge panels
STATE_STYLE = {"generating": "bold yellow", "done": "green", "failed": "bold red", "waiting": "dim"}
STATE_ICON = {"generating": "▶", "done": "✔", "failed": "✘", "waiting": "·"}


# ---------------------------------------------------------------------------- formatting
def fmt_bytes(n: float | int | None) -> str:
    """``1536`` -> ``1.5 KiB``."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def fmt_duration(seconds: float | None) -> str:
    """``75`` -> ``01:15``; ``3700`` -> ``1:01:40``; None -> ``--:--``."""
    if seconds is None:
        return "--:--"
    s = int(round(max(0.0, seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _line(*parts, style: str = "") -> Text:
    """One line of text that never wraps (it ends in … when the panel is too narrow)."""
    text = Text.assemble(*parts, style=style)
    text.no_wrap = True
    text.overflow = "ellipsis"
    return text


def _bar(completed: float, total: float, label: str, style: str = "bar.complete") -> Table:
    grid = Table.grid(expand=True, padding=(0, 1))
    grid.add_column(ratio=1)
    grid.add_column(no_wrap=True, justify="right")
    bar = ProgressBar(total=max(total, 1e-9), completed=min(completed, total) if total else 0, complete_style=style,
                      finished_style=style)
    grid.add_row(bar, Text(label, no_wrap=True, overflow="ellipsis"))
    return grid


# ---------------------------------------------------------------------------- panels
def _pick_agents(agents: dict[str, AgentStats], limit: int) -> tuple[list[str], int]:
    """At most ``limit`` agent ids in topology order; failed and busy agents are kept first."""
    ids = list(agents)
    if len(ids) <= limit:
        return ids, 0
    rows = max(1, limit - 1)  # one row goes to "+N more"
    rank = {"failed": 0, "generating": 1}
    keep = set(sorted(ids, key=lambda a: (rank.get(agents[a].state, 2), ids.index(a)))[:rows])
    return [a for a in ids if a in keep], len(ids) - len(keep)


def agents_panel(s: Snapshot, max_agents: int = 12) -> Panel:
    table = Table(expand=True, box=None, padding=(0, 1), show_edge=False, header_style="bold")
    table.add_column("agent", no_wrap=True, overflow="ellipsis", ratio=2, min_width=5)
    table.add_column("from", no_wrap=True, overflow="ellipsis", ratio=2, min_width=4)
    table.add_column("state", no_wrap=True, overflow="ellipsis", min_width=12)
    table.add_column("round", justify="right", no_wrap=True)
    table.add_column("tokens", justify="right", no_wrap=True)
    table.add_column("tok/s", justify="right", no_wrap=True)
    table.add_column("total", justify="right", no_wrap=True)
    shown, hidden = _pick_agents(s.agents, max(2, max_agents))
    upstream: dict[str, list[str]] = {}
    for src, dst in s.edges:
        upstream.setdefault(dst, []).append(src)
    for a in shown:
        st = s.agents[a]
        table.add_row(
            a,
            Text(", ".join(upstream.get(a, [])) or "-", style="dim"),
            Text(f"{STATE_ICON.get(st.state, '?')} {st.state}", style=STATE_STYLE.get(st.state, "")),
            str(st.round or "-"),
            str(st.tokens) if st.tokens else "-",
            f"{st.tokens_per_s:.1f}" if st.tokens_per_s else "-",
            str(st.total_tokens) if st.total_tokens else "-",
        )
    if hidden:
        table.add_row(Text(f"+{hidden} more", style="dim italic"), "", "", "", "", "", "")
    if not s.agents:
        table.add_row(Text("no agents yet", style="dim"), "", "", "", "", "", "")
    counts: dict[str, int] = {}
    for st in s.agents.values():
        counts[st.state] = counts.get(st.state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    title = f"[bold]agents[/] · {s.name or '?'}"
    return Panel(table, title=title, title_align="left", subtitle=summary or None, subtitle_align="right",
                 border_style="cyan")


def store_panel(s: Snapshot) -> Panel:
    st = s.store or {}
    used, budget = int(st.get("bytes", 0)), int(st.get("budget_bytes", 0))
    pct = f" ({used / budget:.0%})" if budget else ""
    lines: list = []
    if not st:
        lines.append(_line(("empty: no segment cached yet", "dim")))
    label = f"{fmt_bytes(used)} / {fmt_bytes(budget) if budget else 'no budget'}{pct}"
    style = "red" if budget and used / budget > 0.9 else "magenta"
    lines.append(_bar(used, budget or 1, label, style=style))
    hits, misses = int(st.get("hits", 0)), int(st.get("misses", 0))
    rate = f"{hits / (hits + misses):.0%}" if hits + misses else "-"
    lines.append(_line(("entries ", "dim"), str(st.get("entries", 0)), ("  hits ", "dim"), f"{hits}/{hits + misses}",
                       f" ({rate})", ("  evictions ", "dim"), str(st.get("evictions", 0))))
    extra: list = []
    if st.get("bytes_saved"):
        extra += [("compression saved ", "dim"), fmt_bytes(st["bytes_saved"])]
    if s.store_restarts:
        extra += [("  store restarts ", "dim"), (str(s.store_restarts), "yellow")]
    nodes = st.get("bytes_by_node") or {}
    if len(nodes) > 1:
        extra += [("  on ", "dim"), f"{len(nodes)} nodes"]
    if extra:
        lines.append(_line(*extra))
    return Panel(Group(*lines), title="[bold]KV store[/]", title_align="left", border_style="magenta")


def judge_panel(s: Snapshot) -> Panel:
    j = s.judge
    lines = [_line(("method ", "dim"), (j.method or "?", "bold"), ("  on ", "dim"), j.node or "?",
                   ("  model ", "dim"), j.model or "?")]
    last = j.current or "-"
    winner = f" -> winner {j.last_winner}" if j.last_winner else (" (failed)" if j.current else "")
    lines.append(_line(("last problem ", "dim"), last, winner))
    gate: list = []
    if j.gated or j.method in ("dg_jkr", "random_gate"):
        gate = [("reuse accepted ", "dim"), (str(j.accepted), "green"), ("  dense fallback ", "dim"),
                (str(j.dense_fallback), "yellow")]
    elif j.new_anchors or j.method in ("kvcomm", "pal_kv"):
        gate = [("new anchors ", "dim"), str(j.new_anchors)]
    if gate:
        lines.append(_line(("gate  ", "dim"), *gate))
    mean = j.mean_latency_ms
    lines.append(_line(("mean latency ", "dim"), f"{mean:.0f} ms" if mean is not None else "-",
                       ("  KV reused ", "dim"), f"{j.reused}/{j.judged}"))
    return Panel(Group(*lines), title="[bold]judge[/]", title_align="left", border_style="blue")


def progress_panel(s: Snapshot, now: float | None = None) -> Panel:
    now = now if now is not None else (s.updated_at or time.time())
    n = s.finished_problems
    elapsed = (now - s.started_at) if s.started_at is not None else None
    eta = s.eta_s(now)
    style = "red" if s.failed and not s.done else ("green" if s.finished else "cyan")
    lines: list = [_bar(n, s.total or 1, f"{n}/{s.total}", style=style)]
    status = ("finished", "bold green") if s.finished else ("running", "bold yellow")
    lines.append(_line(status, ("  done ", "dim"), (str(s.done), "green"), ("  failed ", "dim"),
                       (str(s.failed), "red" if s.failed else ""), ("  elapsed ", "dim"), fmt_duration(elapsed),
                       ("  ETA ", "dim"), "-" if s.finished else fmt_duration(eta)))
    if s.last_error:
        lines.append(_line(("last failure: ", "red"), " ".join(s.last_error.split())))
    return Panel(Group(*lines), title="[bold]progress[/]", title_align="left", border_style="green")


def cluster_panel(s: Snapshot) -> Panel:
    """Replicas per model (node, state, problems routed to it, tokens/s, last batch size) and
    problems in flight."""
    table = Table(expand=True, box=None, padding=(0, 1), show_edge=False, header_style="bold")
    for col in ("model", "replica", "node", "state", "in flight", "tok/s", "batch"):
        table.add_column(col, no_wrap=True, overflow="ellipsis",
                         justify="left" if col in ("model", "node", "state") else "right")
    for model, reps in s.replicas.items():
        for i, r in enumerate(reps, 1):
            busy = r.get("state") == "busy"
            table.add_row(model if i == 1 else "", str(i), str(r.get("node", "?")),
                          Text(str(r.get("state", "?")), style="bold yellow" if busy else "dim"),
                          str(r.get("in_flight", 0)), f"{float(r.get('tokens_per_s', 0) or 0):.1f}",
                          str(r.get("batch", 0) or "-"))
    if not s.replicas:
        table.add_row(Text("no replicas yet", style="dim"), "", "", "", "", "", "")
    return Panel(table, title=f"[bold]cluster[/] · {s.in_flight} problem(s) in flight", title_align="left",
                 border_style="yellow")


def _build(s: Snapshot, width: int, now: float | None, max_agents: int) -> Group:
    agents = agents_panel(s, max_agents)
    side = [store_panel(s), judge_panel(s)]
    if width >= WIDE:  # agents beside store + judge, both columns as tall as the taller one
        left_h = agents.renderable.row_count + 1 + 2  # header row, borders
        right_h = sum(len(p.renderable.renderables) + 2 for p in side)
        if left_h < right_h:
            agents.height = right_h
        else:
            side[-1].height = len(side[-1].renderable.renderables) + 2 + left_h - right_h
        top = Table.grid(expand=True)
        top.add_column(ratio=3)
        top.add_column(ratio=2)
        top.add_row(agents, Group(*side))
        parts: list = [top]
    else:
        parts = [agents, *side]
    parts.append(cluster_panel(s))
    parts.append(progress_panel(s, now))
    return Group(*parts)


class _Adaptive:
    """Picks the layout for the width it is drawn at."""

    def __init__(self, snapshot: Snapshot, now: float | None, max_agents: int) -> None:
        self.snapshot, self.now, self.max_agents = snapshot, now, max_agents

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield _build(self.snapshot, options.max_width, self.now, self.max_agents)


def render(snapshot: Snapshot, width: int | None = None, *, now: float | None = None, max_agents: int = 12):
    """The dashboard for ``snapshot``; ``width`` picks the layout (None: the width it is drawn at).

    ``now`` is the clock for elapsed time and ETA (default ``snapshot.updated_at``), so the same
    snapshot always draws the same frame.
    """
    if width is None:
        return _Adaptive(snapshot, now, max_agents)
    return _build(snapshot, width, now, max_agents)


def plain_line(s: Snapshot, now: float | None = None) -> str:
    """One line for a non-terminal: progress, store and judge."""
    now = now if now is not None else (s.updated_at or time.time())
    st, j = s.store or {}, s.judge
    busy = sum(a.state == "generating" for a in s.agents.values())
    bad = sum(a.state == "failed" for a in s.agents.values())
    gate = f", reuse accepted {j.accepted} / dense fallback {j.dense_fallback}" if j.gated else ""
    mean = j.mean_latency_ms
    state = "finished" if s.finished else f"ETA {fmt_duration(s.eta_s(now))}"
    line = (f"{s.name or '?'}: {s.finished_problems}/{s.total} ({s.done} ok, {s.failed} failed), {state}; "
            f"agents {busy} generating, {bad} failed of {len(s.agents)}; "
            f"store {st.get('entries', 0)} entries {fmt_bytes(st.get('bytes', 0))}/{fmt_bytes(st.get('budget_bytes', 0))}; "
            f"judge {j.method or '?'}{gate}, mean {f'{mean:.0f} ms' if mean is not None else '-'}; "
            f"{s.in_flight} in flight")
    return line


# ---------------------------------------------------------------------------- the reporter
class LiveReporter:
    """The Reporter for a terminal: the snapshot drawn with ``rich.live.Live``."""

    def __init__(self, console: Console | None = None, refresh_per_second: float = 4.0,
                 max_agents: int | None = None) -> None:
        self.console = console or Console()
        self.refresh_per_second = refresh_per_second
        self.max_agents = max_agents
        self.tracker = SnapshotTracker()
        self._lock = threading.Lock()
        self._live = None

    @property
    def snapshot(self) -> Snapshot:
        return self.tracker.snapshot

    def _rows(self) -> int:
        if self.max_agents is not None:
            return self.max_agents
        return max(4, self.console.height - 22)

    def frame(self):
        """The current frame (also what ``Live`` calls on every refresh)."""
        with self._lock:
            s = self.tracker.snapshot
            now = s.updated_at if s.finished else time.time()
            return _build(s, self.console.width, now, self._rows())

    def start(self, info: dict) -> None:
        with self._lock:
            self.tracker.start(info)
        self._live = Live(console=self.console, get_renderable=self.frame, refresh_per_second=self.refresh_per_second,
                          transient=False)
        self._live.start(refresh=True)

    def agent(self, agent: str, state: str, **stats) -> None:
        with self._lock:
            self.tracker.agent(agent, state, **stats)

    def status(self, **fields) -> None:
        with self._lock:
            self.tracker.status(**fields)

    def problem(self, record: dict) -> None:
        with self._lock:
            self.tracker.problem(record)

    def close(self) -> None:
        with self._lock:
            self.tracker.close()
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None
