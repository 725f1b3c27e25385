"""`traxd status`: the daemon's status (see traxd.control.Status) as rich tables."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

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
    return Group(*parts)


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


def _inbox_table(inboxes: Sequence[Mapping[str, Any]], now: float) -> Table:
    table = Table(title="Inboxes", title_justify="left")
    for column in ("Inbox", "State", "Queued", "Running", "Done", "Failed", "Rate/h", "ETA",
                   "Schedule", "Window"):
        table.add_column(column, justify="right" if column in _NUMERIC else "left")
    for inbox in inboxes:
        table.add_row(
            str(inbox.get("name", "?")), _state(inbox), str(inbox.get("queued", 0)),
            str(len(inbox.get("running") or [])), str(inbox.get("done", 0)),
            _failed(int(inbox.get("failed", 0))), f"{float(inbox.get('rate_per_hour', 0)):.1f}",
            _eta(inbox.get("eta_seconds")), str(inbox.get("schedule", "always")),
            _window(inbox.get("next_window"), inbox.get("schedule", "always"), now))
    return table


_NUMERIC = frozenset({"Queued", "Running", "Done", "Failed", "Rate/h", "ETA"})


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


def _window(next_window: object, schedule: object, now: float) -> Text:
    if schedule == "always":
        return Text("open", style="green")
    if not isinstance(next_window, str):
        return Text("never", style="red")
    try:
        opens = datetime.fromisoformat(next_window)
    except ValueError:
        return Text(next_window)
    wait = opens.timestamp() - now
    if wait <= 1:
        return Text("open", style="green")
    clock = opens.astimezone().strftime("%a %H:%M")
    return Text(f"opens {clock} (in {format_duration(wait)})", style="yellow")


def _running_table(inboxes: Sequence[Mapping[str, Any]], now: float) -> Table:
    table = Table(title="Running jobs", title_justify="left")
    for column in ("Inbox", "File", "Step", "Progress", "Elapsed"):
        table.add_column(column, justify="right" if column == "Elapsed" else "left")
    for inbox in inboxes:
        for job in inbox.get("running") or []:
            started = job.get("started_at")
            elapsed = format_duration(now - float(started)) if started else "-"
            table.add_row(str(inbox.get("name", "?")), str(job.get("file", "?")),
                          str(job.get("step") or "-"), progress_bar(job.get("progress")),
                          elapsed)
    return table


def _backends_table(paused: Mapping[str, Any]) -> Group:
    table = Table(title="Paused backends", title_justify="left", title_style="bold red")
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
