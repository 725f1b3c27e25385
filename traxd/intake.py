"""Intake: from a path announced in an inbox to a queued job (seen -> settled -> hashed)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from traxd import metrics
from traxd.config import InboxSettings, Settings
from traxd.folders import describe_unprocessable, is_ignored
from traxd.journal import Job, JobState, Journal
from traxd.logs import get_logger
from traxd.watcher import Settler, candidates, relative_to_inbox

Key = tuple[str, str]  # (inbox name, path relative to the inbox)
DuplicateFn = Callable[[Job], None]

HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Intake:
    """Turns watcher events and reconcile finds into journal rows, on the loop thread."""

    def __init__(self, settings: Settings, journal: Journal, on_duplicate: DuplicateFn,
                 clock: Callable[[], float] = time.time) -> None:
        self.journal = journal
        self.clock = clock
        self.settler = Settler(settings.daemon.settle_seconds)
        self._on_duplicate = on_duplicate
        self._hashing: set[Key] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._log = get_logger(component="intake")
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        self.settings = settings
        self.inboxes = {inbox.name: inbox for inbox in settings.inboxes}
        self.settler.settle_seconds = settings.daemon.settle_seconds

    def known(self, key: Key) -> bool:
        return (key in self.settler or key in self._hashing
                or self.journal.active(*key) is not None or self._claim_pending(key))

    def _claim_pending(self, key: Key) -> bool:
        """The file is one a job began to claim and has not moved yet: that job takes it."""
        job = self.journal.claiming(*key)
        return (job is not None and job.claimed_path is not None
                and not os.path.lexists(job.claimed_path))

    # --- announcements ----------------------------------------------------------------------

    def announce(self, inbox_name: str, path: Path) -> None:
        """A watcher saw something happen at path (called on the loop thread)."""
        inbox = self.inboxes.get(inbox_name)
        if inbox is None:
            return
        if path.is_dir() and not path.is_symlink():
            self._spawn(self.reconcile_inbox(inbox, count_missed=False))
            return
        rel = relative_to_inbox(inbox, path)
        if rel is not None:
            self.observe(inbox, rel)

    def observe(self, inbox: InboxSettings, rel: str) -> None:
        key = (inbox.name, rel)
        if key in self._hashing:
            return
        path = inbox.path / rel
        try:
            info = path.lstat()
        except FileNotFoundError:
            self._vanished(key)
            return
        now = self.clock()
        job = self.journal.active(*key)
        if job is None:
            if self._claim_pending(key):
                return
            job = self.journal.add_seen(inbox.name, rel, info.st_size, info.st_mtime_ns,
                                        inbox.priority, now)
            metrics.FILES_DISCOVERED.labels(inbox=inbox.name).inc()
            self._log.info("file_seen", inbox=inbox.name, file=rel, job_id=job.id)
        if job.state is not JobState.SEEN:
            return
        if not stat.S_ISREG(info.st_mode) or describe_unprocessable(path):
            self._queue(job, None, info.st_size, info.st_mtime_ns)  # fails at claim, with why
            return
        self.settler.observe(key, info.st_size, info.st_mtime_ns, now)
        self._arm()

    # --- settling ---------------------------------------------------------------------------

    def _arm(self) -> None:
        deadline = self.settler.next_deadline()
        if deadline is None:
            return
        delay = max(0.05, deadline - self.clock())
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            if self._timer.when() <= loop.time() + delay:
                return
            self._timer.cancel()
        self._timer = loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self.clock()
        for key in self.settler.pending():
            if self.settler.settled(key, now):
                self._check_settled(key, now)
        self._arm()

    def _check_settled(self, key: Key, now: float) -> None:
        path = self.inboxes[key[0]].path / key[1] if key[0] in self.inboxes else None
        try:
            info = path.stat() if path is not None else None
        except FileNotFoundError:
            info = None
        if info is None:
            self._vanished(key)
            return
        size, mtime = self.settler.stat_of(key)
        if (info.st_size, info.st_mtime_ns) != (size, mtime):
            self.settler.observe(key, info.st_size, info.st_mtime_ns, now)
            return
        self.settler.forget(key)
        self._hashing.add(key)
        self._spawn(self._hash_and_queue(key, size, mtime))

    async def _hash_and_queue(self, key: Key, size: int, mtime_ns: int) -> None:
        path = self.inboxes[key[0]].path / key[1]
        try:
            digest = await asyncio.to_thread(sha256_file, path)
            info = path.stat()
        except OSError:
            digest, info = None, None
        finally:
            self._hashing.discard(key)
        job = self.journal.active(*key)
        if job is None or job.state is not JobState.SEEN:
            return
        if info is None or (info.st_size, info.st_mtime_ns) != (size, mtime_ns):
            self.observe(self.inboxes[key[0]], key[1])  # changed while hashed: settle again
            return
        self._queue(job, digest, size, mtime_ns)

    def _queue(self, job: Job, digest: str | None, size: int, mtime_ns: int) -> None:
        job = self.journal.update(job.id, self.clock(), state=JobState.QUEUED, sha256=digest,
                                  size=size, mtime_ns=mtime_ns)
        self._log.info("file_queued", inbox=job.inbox, file=job.rel_path, job_id=job.id,
                       size=size)
        if digest is not None and self.settings.daemon.on_duplicate == "skip":
            original = self.journal.done_with_hash(job.inbox, digest)
            if original is not None:
                self._on_duplicate(job)

    def _vanished(self, key: Key) -> None:
        self.settler.forget(key)
        job = self.journal.active(*key)
        if job is not None and job.state is JobState.SEEN:
            self.journal.delete(job.id)

    # --- reconcile --------------------------------------------------------------------------

    async def reconcile(self, *, count_missed: bool) -> int:
        """Scan every inbox for files the journal does not know; returns how many."""
        found = 0
        for inbox in list(self.inboxes.values()):
            found += await self.reconcile_inbox(inbox, count_missed=count_missed)
        return found

    async def reconcile_inbox(self, inbox: InboxSettings, *, count_missed: bool) -> int:
        if not inbox.path.is_dir():
            return 0
        names = await asyncio.to_thread(candidates, inbox)
        found = 0
        for rel in names:
            key = (inbox.name, rel)
            if self.known(key) or is_ignored(Path(rel).name):
                continue
            found += 1
            if count_missed:
                metrics.RECONCILE_FOUND.labels(inbox=inbox.name).inc()
                self._log.warning("reconcile_found", inbox=inbox.name, file=rel)
            self.observe(inbox, rel)
        for job in self.journal.in_states(JobState.SEEN, inbox=inbox.name):
            if (job.inbox, job.rel_path) not in self.settler:
                self.observe(inbox, job.rel_path)
        return found

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            task.cancel()
