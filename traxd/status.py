"""A snapshot of what the daemon is doing, for the control socket and `traxd status`."""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from traxd import __version__
from traxd.journal import JobState

if TYPE_CHECKING:
    from traxd.daemon import Daemon

RATE_WINDOW = 3600.0


def build_status(daemon: Daemon) -> dict[str, Any]:
    now = time.time()
    counts = daemon.journal.counts()
    recent = daemon.journal.finished_since(now - RATE_WINDOW)
    admission = daemon.governor.current
    return {
        "version": __version__,
        "started_at": daemon.started_at,
        "inboxes": [_inbox(daemon, inbox.name, inbox.schedule, counts.get(inbox.name, {}),
                           [j for j in recent if j.inbox == inbox.name], now)
                    for inbox in daemon.settings.inboxes],
        "backends_paused": dict(daemon.gate.paused),
        "throttled": {"memory": admission.memory_short, "cpu": admission.cpu_busy},
        "workers_allowed": admission.allowed,
        "workers": daemon.settings.daemon.workers,
    }


def _inbox(daemon: Daemon, name: str, schedule: str, counts: dict[str, int],
           recent: list[Any], now: float) -> dict[str, Any]:
    running = [_running(daemon, job_id) for job_id in list(daemon.runner.progress)
               if daemon.journal.get(job_id).inbox == name]
    queued = counts.get(JobState.QUEUED.value, 0) + counts.get(JobState.SEEN.value, 0)
    rate = _rate(recent, now)
    pending = queued + len(running)
    window = daemon.windows[name]
    next_open = window.next_open(datetime.fromtimestamp(now).astimezone())
    return {
        "name": name,
        "paused": name in daemon.paused,
        "draining": name in daemon.draining,
        "queued": queued,
        "waiting": counts.get(JobState.WAITING.value, 0),
        "running": running,
        "done": counts.get(JobState.DONE.value, 0) + counts.get(JobState.DUPLICATE.value, 0),
        "failed": counts.get(JobState.FAILED.value, 0),
        "rate_per_hour": rate * 3600.0,
        "eta_seconds": pending / rate if rate > 0 and pending else None,
        "schedule": schedule,
        "next_window": next_open.isoformat() if next_open else None,
    }


def _running(daemon: Daemon, job_id: int) -> dict[str, Any]:
    job = daemon.journal.get(job_id)
    progress = daemon.runner.progress.get(job_id)
    return {
        "file": job.rel_path,
        "job_id": job_id,
        "step": progress.step if progress else "",
        "progress": progress.fraction if progress else 0.0,
        "started_at": progress.started if progress else None,
    }


def _rate(recent: list[Any], now: float) -> float:
    """Jobs done per second over the recent window (from the first finish in it)."""
    if not recent:
        return 0.0
    first: float = min(job.finished for job in recent)
    span = max(now - first, 60.0)
    return len(recent) / span
