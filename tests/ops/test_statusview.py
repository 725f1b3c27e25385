"""`traxd status` rendering, once and live against a real control socket."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from traxd.control import ControlServer, InboxStatus, Status
from traxd.statusview import format_duration, progress_bar, render_status, watch_status


def sample_status(now: float) -> Status:
    later = datetime.fromtimestamp(now).astimezone() + timedelta(hours=3, minutes=20)
    podcasts: InboxStatus = {
        "name": "podcasts", "paused": False, "draining": False, "queued": 12,
        "running": [{"file": "ep-42.mp3", "step": "transcribe", "progress": 0.5,
                     "started_at": now - 125}],
        "done": 40, "failed": 2, "rate_per_hour": 6.0, "eta_seconds": 7800.0,
        "schedule": "always", "next_window": None}
    nightly: InboxStatus = {
        "name": "nightly", "paused": True, "draining": False, "queued": 3, "running": [],
        "done": 0, "failed": 0, "rate_per_hour": 0.0, "eta_seconds": None,
        "schedule": "0 1-5 * * *", "next_window": later.isoformat()}
    return {"version": "0.1.0", "started_at": now - 3 * 3600 - 60,
            "inboxes": [podcasts, nightly],
            "backends_paused": {"openai": "401: invalid API key"},
            "throttled": {"memory": True, "cpu": False}, "workers_allowed": 2, "workers": 8}


def rendered(data: Any) -> str:
    out = io.StringIO()
    render_status(data, Console(file=out, width=200, color_system=None))
    return out.getvalue()


def test_status_shows_queues_jobs_backends_and_windows() -> None:
    text = rendered(sample_status(time.time()))

    assert "traxd 0.1.0" in text and "up 3h 01m" in text
    assert "workers 2/8 allowed" in text and "throttled: memory" in text
    podcasts = next(line for line in text.splitlines() if "podcasts" in line and "12" in line)
    for cell in ["active", "12", "40", "2", "6.0", "2h 10m", "open"]:
        assert cell in podcasts
    nightly = next(line for line in text.splitlines() if "nightly" in line)
    assert "paused" in nightly and "in 3h 1" in nightly
    note = next(line for line in text.splitlines() if line.startswith("nightly:"))
    assert "works in the window 0 1-5 * * *; opens" in note and "(in 3h 1" in note
    assert "ep-42.mp3" in text and "transcribe" in text and " 50%" in text and "2m 05s" in text
    assert "Running jobs" in text and "Paused backends" in text
    assert "openai" in text and "401: invalid API key" in text


def test_status_fits_80_columns_without_cutting_words() -> None:
    out = io.StringIO()
    render_status(sample_status(time.time()), Console(file=out, width=80, color_system=None))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in out.getvalue()
    header = next(line for line in lines if line.startswith("Inbox "))
    assert header.split() == ["Inbox", "State", "Queued", "Running", "Done", "Failed",
                              "Rate/h", "ETA", "Window"]
    podcasts = next(line for line in lines if line.startswith("podcasts "))
    assert podcasts.split() == ["podcasts", "active", "12", "1", "40", "2", "6.0", "2h", "10m",
                                "open"]


def test_an_idle_daemon_has_no_running_or_backend_tables() -> None:
    data = {"version": "0.1.0", "started_at": time.time(), "inboxes": [],
            "backends_paused": {}, "throttled": {"memory": False, "cpu": False},
            "workers_allowed": 4}
    text = rendered(data)
    assert "Running jobs" not in text and "Paused backends" not in text
    assert "not throttled" in text


def test_progress_bar_and_durations() -> None:
    assert progress_bar(0.5) == "██████░░░░░░  50%"
    assert progress_bar(None) == "░" * 12 + "   0%"
    assert progress_bar(3) == "█" * 12 + " 100%"
    assert [format_duration(s) for s in (5, 200, 3900, 200000)] == \
        ["5s", "3m 20s", "1h 05m", "2d 7h"]


class StatusHandler:
    def __init__(self, status: Status) -> None:
        self._status = status

    def status(self) -> dict[str, Any]:
        return dict(self._status)

    def pause(self, inbox: str | None) -> dict[str, Any]:
        return {}

    def resume(self, inbox: str | None) -> dict[str, Any]:
        return {}

    def drain(self, inbox: str | None) -> dict[str, Any]:
        return {}

    async def retry(self, names: list[str] | None) -> dict[str, Any]:
        return {}

    async def keys(self) -> dict[str, Any]:
        return {"keys": []}


def test_watch_renders_the_live_status(short_tmp: Path) -> None:
    path = short_tmp / "traxd.sock"
    out = io.StringIO()
    stop = threading.Event()
    stop.set()  # one frame, then return

    async def scenario() -> None:
        server = ControlServer(StatusHandler(sample_status(time.time())), path)
        await server.start()
        try:
            console = Console(file=out, width=200, color_system=None, force_terminal=False)
            await asyncio.to_thread(watch_status, path, console, 0.1, stop)
        finally:
            await server.close()

    asyncio.run(scenario())
    assert "ep-42.mp3" in out.getvalue()


def test_watch_says_when_the_daemon_is_gone(short_tmp: Path) -> None:
    out = io.StringIO()
    stop = threading.Event()
    stop.set()
    watch_status(short_tmp / "traxd.sock", Console(file=out, width=200), 0.1, stop)
    assert "traxd is not running" in out.getvalue()
