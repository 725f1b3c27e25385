"""What the control socket and the HTTP side may ask of a running daemon: the control
verbs (pause, resume, drain, retry, keys), the typed status, and health.

Everything here runs on the event loop and reads memory only (the journal's live jobs and
counters); the verbs that read files (`retry` the history, `keys` the key files) do so
in a thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from traxd import __version__, keys
from traxd.config import Settings
from traxd.folders import move, sidecar_path, unique_path
from traxd.gates import InboxGates
from traxd.jobs import BackendGate, JobRunner
from traxd.journal import Job, JobState, Journal
from traxd.logs import get_logger
from traxd.pool import WorkerPool
from traxd.throttle import Governor

RATE_WINDOW = 3600.0
HEARTBEAT_LIMIT = 10.0  # seconds without a heartbeat before /healthz fails


@dataclass
class Parts:
    """The running pieces operations look at (built once by the daemon)."""

    journal: Journal
    pool: WorkerPool
    gates: InboxGates
    backends: BackendGate
    runner: JobRunner
    governor: Governor
    watchers_alive: Callable[[], bool]
    inboxes_missing: Callable[[], set[str]]


class Operations:
    def __init__(self, settings: Settings, parts: Parts) -> None:
        self.settings = settings
        self.parts = parts
        self.started_at = time.time()
        self.heartbeat = time.monotonic()
        self._log = get_logger(component="control")

    # --- control verbs ----------------------------------------------------------------------

    def pause(self, inbox: str | None) -> dict[str, Any]:
        names = self._names(inbox)
        self.parts.gates.pause(names)
        self._log.info("paused", inboxes=names)
        return {"paused": names}

    def resume(self, inbox: str | None) -> dict[str, Any]:
        names = self._names(inbox)
        self.parts.gates.resume(names)
        backends = self.parts.backends.resume() if inbox is None else []
        self.parts.journal.release_all(inbox)
        self.parts.pool.wake()
        self._log.info("resumed", inboxes=names, backends=backends)
        return {"resumed": names, "backends": backends}

    def drain(self, inbox: str | None) -> dict[str, Any]:
        names = self._names(inbox)
        self.parts.gates.drain(names)
        return {"draining": names, "running": len(self.parts.pool.running)}

    async def retry(self, names: list[str] | None) -> dict[str, Any]:
        """Put failed files back into their inbox (all, or those named) to be processed anew."""
        folders = self.parts.runner.folders
        await self.parts.journal.durable()  # a file failed a moment ago is on disk too
        failed = await asyncio.to_thread(self.parts.journal.failed)
        wanted = [j for j in failed if j.inbox in folders and (
            names is None or j.rel_path in names or Path(j.rel_path).name in names)]
        moved = await asyncio.to_thread(self._unfail_all, wanted)
        for job in moved:
            self.parts.journal.remove_failed(job)
        retried = [job.rel_path for job in moved]
        self._log.info("retry", files=retried)
        return {"retried": retried}

    async def keys(self) -> dict[str, Any]:
        """Whether this process has each API key its pipelines need, and from where (the
        key files are read now, in a thread); never a key."""
        return await asyncio.to_thread(keys.report, self.settings,
                                       dict(self.parts.backends.paused))

    def _unfail_all(self, jobs: list[Job]) -> list[Job]:
        moved = []
        for job in jobs:
            failed = Path(job.final_path or "")
            if failed.is_file():
                move(failed, unique_path(self.parts.runner.folders[job.inbox].inbox,
                                         job.rel_path))
                sidecar_path(failed).unlink(missing_ok=True)
                moved.append(job)
        return moved

    def _names(self, inbox: str | None) -> list[str]:
        known = [i.name for i in self.settings.inboxes]
        if inbox is None:
            return known
        if inbox not in known:
            raise ValueError(f"no inbox named {inbox!r}; inboxes: {', '.join(known)}")
        return [inbox]

    # --- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.time()
        admission = self.parts.governor.current
        return {
            "version": __version__,
            "started_at": self.started_at,
            "inboxes": [self._inbox(inbox.name, inbox.schedule, now)
                        for inbox in self.settings.inboxes],
            "backends_paused": dict(self.parts.backends.paused),
            "throttled": {"memory": admission.memory_short, "cpu": admission.cpu_busy},
            "workers_allowed": admission.allowed,
            "workers": self.settings.daemon.workers,
            **({"cluster": cluster} if (cluster := self.parts.runner.executor.status()) else {}),
        }

    def _inbox(self, name: str, schedule: str, now: float) -> dict[str, Any]:
        journal, gates = self.parts.journal, self.parts.gates
        mine = [(job_id, progress) for job_id, progress in list(self.parts.runner.progress.items())
                if job_id in journal and journal.get(job_id).inbox == name]
        running = [self._running(job_id) for job_id, progress in mine if progress.working]
        ahead = len(mine) - len(running)  # claimed, waiting for a worker: still queued
        queued = journal.count(name, JobState.QUEUED, JobState.SEEN) + ahead
        rate = self._rate(name, now)
        eta, basis = self._eta(name, [self._media(job["job_id"]) for job in running], queued,
                               rate)
        opens = gates.windows[name].next_open(datetime.fromtimestamp(now).astimezone())
        return {
            "name": name,
            "paused": name in gates.paused,
            "draining": name in gates.draining,
            "queued": queued,
            "waiting": journal.count(name, JobState.WAITING),
            "running": running,
            "done": journal.count(name, JobState.DONE, JobState.DUPLICATE),
            "failed": journal.count(name, JobState.FAILED),
            "rate_per_hour": rate * 3600.0,
            "eta_seconds": eta,
            "eta_basis": basis,
            "schedule": schedule,
            "next_window": opens.isoformat() if opens else None,
        }

    def _running(self, job_id: int) -> dict[str, Any]:
        job = self.parts.journal.get(job_id)
        progress = self.parts.runner.progress.get(job_id)
        return {
            "file": job.rel_path,
            "job_id": job_id,
            "step": progress.step if progress else "",
            "progress": progress.fraction if progress else 0.0,
            "started_at": progress.started if progress else None,
        }

    def _eta(self, inbox: str, running: list[float | None], queued: int,
             rate: float) -> tuple[float | None, str]:
        """Seconds until the running (their media seconds, where known) and queued files
        are done, and whether that was counted in media seconds (the files done here
        recently all had a duration) or in files (at `rate`, files a second)."""
        known = [m for m in running if m is not None]
        throughput = self.parts.runner.throughput.get(inbox)
        measured = throughput.eta(known, queued + len(running) - len(known)) \
            if throughput is not None else None
        if measured is not None and measured.basis == "media":
            return measured.seconds, "media"
        pending = queued + len(running)
        return (pending / rate if rate > 0 and pending else None), "files"

    def _media(self, job_id: int) -> float | None:
        progress = self.parts.runner.progress.get(job_id)
        return progress.media_seconds if progress is not None else None

    def _rate(self, inbox: str, now: float) -> float:
        """Jobs done per second over the recent window (from the first finish in it)."""
        times = [t for t, name in self.parts.journal.recent
                 if name == inbox and t >= now - RATE_WINDOW]
        if not times:
            return 0.0
        return len(times) / max(now - times[0], 60.0)

    # --- health (for the HTTP exporter) -----------------------------------------------------

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.heartbeat < HEARTBEAT_LIMIT

    def ready(self) -> tuple[bool, str]:
        if not self.parts.watchers_alive():
            return False, "a watcher has stopped"
        if missing := self.parts.inboxes_missing():
            return False, "inbox folder missing (not watched): " + ", ".join(sorted(missing))
        store = self.parts.journal.store
        if store.disk_full:
            return False, (f"the disk holding the journal is full ({store.problem}): no new "
                           "work starts until there is space")
        if store.problem is not None:
            return False, f"the journal is not writable: {store.problem}"
        if self.parts.backends.paused:
            return False, "paused backends: " + ", ".join(sorted(self.parts.backends.paused))
        return True, ""
