"""`traxd status`: the daemon's status (see traxd.control.Status) as rich tables."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from traxd.control import request
from traxd.errors import ControlRejected, ControlUnavailable

_BAR_WIDTH = 12


def render_status(data: Mapping[str, Any], console: Console) -> None:
    """Print one status snapshot."""
    console.print(status_renderable(data, time.time()))


def watch_status(socket_path: Path, console: Console, interval: float = 1.0,
                 stop: threading.Event | None = None) -> None:
    """Redraw the status every `interval` seconds until Ctrl-C (or `stop` is set)."""
    stop = stop or threading.Event()
    with Live(console=console, auto_refresh=False) as live:
        try:
            while True:
                live.update(_snapshot(socket_path), refresh=True)
                if stop.wait(interval):
                    return
        except KeyboardInterrupt:
            return


def _snapshot(socket_path: Path) -> RenderableType:
    try:
        data = request(socket_path, "status")
    except (ControlUnavailable, ControlRejected) as exc:
        return Text(f"traxd: {exc} (retrying)", style="bold red")
    return status_renderable(data, time.time())


def status_renderable(data: Mapping[str, Any], now: float) -> RenderableType:
    """Everything `traxd status` shows, as one rich renderable."""
    inboxes: Sequence[Mapping[str, Any]] = data.get("inboxes", [])
    parts: list[RenderableType] = [_headline(data, now), _inbox_table(inboxes, now)]
    if any(inbox.get("running") for inbox in inboxes):
        parts.append(_running_table(inboxes, now))
    if paused := data.get("backends_paused"):
        parts.append(_backends_table(paused))
    if cluster := data.get("cluster"):
        parts.extend(_cluster_tables(cluster, now))
    return Group(*parts)


def _cluster_tables(cluster: Mapping[str, Any], now: float) -> list[RenderableType]:
    """Workers (host, queues, busy, last heartbeat) and the steps in flight on them."""
    workers = Table(title=f"Workers ({cluster.get('broker', '?')})", title_justify="left")
    for column in ("Worker", "Queues", "Busy", "Heartbeat", "Running"):
        workers.add_column(column)
    for worker in cluster.get("workers") or []:
        beat = format_duration(now - float(worker.get("last_heartbeat") or now)) + " ago"
        workers.add_row(str(worker.get("worker")), ",".join(worker.get("queues") or []),
                        f"{worker.get('busy', 0)}/{worker.get('threads', '?')}",
                        Text(beat, style="green" if worker.get("alive") else "red"),
                        ", ".join(worker.get("steps") or []) or "-")
    depths = ", ".join(f"{q} {n}" for q, n in sorted((cluster.get("queues") or {}).items()))
    parts: list[RenderableType] = [workers, Text(f"Queued messages: {depths or '-'}")]
    if not cluster.get("reachable", True):
        parts.append(Text("Redis cannot be reached: steps wait for it", style="bold red"))
    flights = Table(title="Steps in flight", title_justify="left")
    for column in ("Inbox", "File", "Step", "Queue", "Worker"):
        flights.add_column(column)
    for step in cluster.get("in_flight") or []:
        flights.add_row(str(step.get("inbox")), str(step.get("file")), str(step.get("step")),
                        str(step.get("queue")), str(step.get("worker") or "queued"))
    if cluster.get("in_flight"):
        parts.append(flights)
    return parts


def _headline(data: Mapping[str, Any], now: float) -> Text:
    line = Text(f"traxd {data.get('version', '?')}", style="bold")
    if started := data.get("started_at"):
        line.append(f"  up {format_duration(now - float(started))}")
    allowed, cap = data.get("workers_allowed"), data.get("workers")
    if allowed is not None:
        line.append(f"  workers {allowed}" + (f"/{cap}" if cap is not None else "") + " allowed")
    throttled = sorted(k for k, v in (data.get("throttled") or {}).items() if v)
    if throttled:
        line.append(f"  throttled: {', '.join(throttled)}", style="yellow")
    else:
        line.append("  not throttled", style="green")
    return line


def _inbox_table(inboxes: Sequence[Mapping[str, Any]], now: float) -> RenderableType:
    table = _table("Inboxes")
    for column in ("Inbox", "State", "Queued", "Running", "Done", "Failed", "Rate/h", "ETA",
                   "Window"):
        table.add_column(column, justify="right" if column in _NUMERIC else "left",
                         no_wrap=column in _NUMERIC, overflow="fold",
                         min_width=10 if column == "Inbox" else None)
    notes: list[RenderableType] = []
    for inbox in inboxes:
        name, schedule = str(inbox.get("name", "?")), str(inbox.get("schedule", "always"))
        opens = _opens(inbox.get("next_window"), schedule)
        table.add_row(
            name, _state(inbox), str(inbox.get("queued", 0)),
            str(len(inbox.get("running") or [])), str(inbox.get("done", 0)),
            _failed(int(inbox.get("failed", 0))), f"{float(inbox.get('rate_per_hour', 0)):.1f}",
            _eta(inbox.get("eta_seconds")), _window(opens, now))
        if schedule != "always":
            notes.append(_window_note(name, schedule, opens, now))
    return Group(table, *notes) if notes else table


def _table(title: str) -> Table:
    """A table that fits 80 columns: a rule under the header, no outer padding."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                 pad_edge=False, padding=(0, 1, 0, 0))


_NUMERIC = frozenset({"Queued", "Running", "Done", "Failed", "Rate/h", "ETA"})
_ALWAYS = datetime.min.replace(tzinfo=UTC)  # the window of "always": open since ever


def _state(inbox: Mapping[str, Any]) -> Text:
    if inbox.get("paused"):
        return Text("paused", style="yellow")
    if inbox.get("draining"):
        return Text("draining", style="yellow")
    if inbox.get("waiting"):
        return Text(f"{inbox['waiting']} waiting", style="yellow")
    return Text("active", style="green")


def _failed(count: int) -> Text:
    return Text(str(count), style="red" if count else "")


def _eta(seconds: object) -> str:
    return format_duration(float(seconds)) if isinstance(seconds, int | float) else "-"


def _opens(next_window: object, schedule: str) -> datetime | None:
    """When the inbox's window next opens (in the past: open now); None: never."""
    if schedule == "always":
        return _ALWAYS
    if not isinstance(next_window, str):
        return None
    try:
        return datetime.fromisoformat(next_window)
    except ValueError:
        return None


def _window(opens: datetime | None, now: float) -> Text:
    if opens is None:
        return Text("never", style="red")
    wait = opens.timestamp() - now
    if wait <= 1:
        return Text("open", style="green")
    return Text(f"in {format_duration(wait)}", style="yellow")


def _window_note(name: str, schedule: str, opens: datetime | None, now: float) -> Text:
    """`nightly: works in the window 0 1-5 * * *; opens Wed 01:00 (in 3h 20m)`."""
    if opens is None:
        when = "it never opens"
    elif opens.timestamp() - now <= 1:
        when = "open now"
    else:
        when = (opens.astimezone().strftime("opens %a %H:%M")
                + f" (in {format_duration(opens.timestamp() - now)})")
    return Text(f"{name}: works in the window {schedule}; {when}")


def _running_table(inboxes: Sequence[Mapping[str, Any]], now: float) -> Table:
    table = _table("Running jobs")
    for column in ("Inbox", "File", "Step", "Progress", "Elapsed"):
        table.add_column(column, justify="right" if column == "Elapsed" else "left",
                         no_wrap=column in ("Progress", "Elapsed"), overflow="fold")
    for inbox in inboxes:
        for job in inbox.get("running") or []:
            started = job.get("started_at")
            elapsed = format_duration(now - float(started)) if started else "-"
            table.add_row(str(inbox.get("name", "?")), str(job.get("file", "?")),
                          str(job.get("step") or "-"), progress_bar(job.get("progress")),
                          elapsed)
    return table


def _backends_table(paused: Mapping[str, Any]) -> Group:
    table = _table("Paused backends")
    table.title_style = "bold red"
    table.add_column("Backend")
    table.add_column("Why")
    for backend, reason in sorted(paused.items()):
        table.add_row(Text(str(backend), style="red"), str(reason))
    return Group(table, Text("Their files wait: fix the cause, then `traxd resume`."))


def progress_bar(fraction: object) -> str:
    """A text bar such as '██████░░░░░░  50%'."""
    value = float(fraction) if isinstance(fraction, int | float) else 0.0
    value = min(max(value, 0.0), 1.0)
    filled = round(value * _BAR_WIDTH)
    return "█" * filled + "░" * (_BAR_WIDTH - filled) + f" {value * 100:3.0f}%"


def format_duration(seconds: float) -> str:
    """'45s', '3m 20s', '1h 05m', '2d 3h'."""
    total = max(int(seconds), 0)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"
