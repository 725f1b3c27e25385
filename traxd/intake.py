"""Intake: from paths announced in an inbox to queued jobs (seen -> settled -> hashed).

Everything here works in batches. Announcements are collected per inbox in a set; one
thread hop lstats the whole batch (and scans the folders among it); back on the loop the
journal learns the new files and the settler their stats. One loop timer fires at the
earliest settle deadline; the files due then are re-stat'ed and hashed in one more thread
hop, which also looks their hashes up among done files. The loop never touches the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

from traxd import metrics
from traxd.coalesce import MAX_BATCH
from traxd.config import InboxSettings, Settings
from traxd.errors import JournalError
from traxd.folders import describe_unprocessable, folder_prefix, movable, relative_below
from traxd.journal import Job, JobState, Journal
from traxd.logs import get_logger
from traxd.watcher import Event, Settled, Settler, candidates, scan_folder

Key = tuple[str, str]  # (inbox name, path relative to the inbox)
DuplicateFn = Callable[[Job, int], None]  # (the duplicate, the id of the job done before)
HashLookup = Callable[[str, str], int | None]  # (inbox, sha256) -> a done job's id
LeftLookup = Callable[[str, str, int, int], bool]  # (inbox, rel, size, mtime_ns) -> failed as is

HASH_CHUNK = 1 << 20
# One thread hop takes at most this many files (and a hash hop about this many bytes), so
# that a burst flows through in a pipeline (probing, hashing and the journal overlap) and
# the loop's share of each batch stays short.
BATCH_FILES = MAX_BATCH  # files probed, settled or hashed per batch (and loop turn)
HASH_BATCH_BYTES = 256 << 20
APPLY_CHUNK = 100  # results applied between two yields to the loop


def sha256_file(path: Path, buffer: bytearray | None = None) -> str:
    """The file's sha256, read in 1 MiB chunks (into `buffer`, when one is given)."""
    digest = hashlib.sha256()
    buf = buffer if buffer is not None else bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as handle:
        while count := handle.readinto(buf):
            digest.update(view[:count])
    return digest.hexdigest()


# --- the blocking halves (they run in a thread, a batch at a time) --------------------------

class Found(Enum):
    FILE = "file"  # a regular file: it settles
    ODD = "odd"  # a link, FIFO, socket, device or unreadable file: it fails at claim
    GONE = "gone"  # nothing there (any more)
    CLAIMED = "claimed"  # a job chose a processing/ path for it and has not moved it yet
    RETRY = "retry"  # could not be read this time (not for want of permission): look again
    LEFT = "left"  # failed as it is and cannot be moved (read-only folder): until it changes


class Probe(NamedTuple):
    inbox: str
    root: str  # the inbox folder, ending in a separator
    rel: str
    claimed: str | None  # the processing/ path of the job that claims this name, if any


class Seen(NamedTuple):
    inbox: str
    rel: str
    claimed: str | None  # as probed: the claim that was checked
    found: Found
    size: int = 0
    mtime_ns: int = 0
    why: str | None = None


def probe_batch(probes: Iterable[Probe], left: LeftLookup | None = None) -> list[Seen]:
    """lstat every path; a folder is scanned (that folder only) and its files lstat'ed.
    A file that cannot be moved is looked up with `left`: one that failed as it is is LEFT."""
    out: list[Seen] = []
    done: set[Key] = set()
    left_alone = _LeftAlone(left) if left is not None else None
    for probe in probes:
        if (probe.inbox, probe.rel) in done:
            continue
        done.add((probe.inbox, probe.rel))
        seen = _probe(probe, left_alone)
        if seen is not None:
            out.append(seen)
            continue
        for rel in scan_folder(Path(probe.root), probe.rel):
            if (probe.inbox, rel) not in done:
                done.add((probe.inbox, rel))
                found = _probe(Probe(probe.inbox, probe.root, rel, None), left_alone)
                if found is not None:
                    out.append(found)
    return out


class _LeftAlone:
    """For one batch: whether a file failed as it is and cannot be moved. Each folder is
    asked once whether it can be written; the journal only for files in those that cannot."""

    def __init__(self, lookup: LeftLookup) -> None:
        self.lookup = lookup
        self.writable: dict[str, bool] = {}

    def __call__(self, probe: Probe, path: str, info: os.stat_result) -> bool:
        folder = path.rpartition(os.sep)[0]
        if (writable := self.writable.get(folder)) is None:
            writable = self.writable[folder] = movable(Path(path))
        return not writable and self.lookup(probe.inbox, probe.rel, info.st_size,
                                            info.st_mtime_ns)


def _probe(probe: Probe, left: _LeftAlone | None) -> Seen | None:
    """What is at the path; None for a folder (to be scanned)."""
    if probe.claimed is not None and not os.path.lexists(probe.claimed):
        return Seen(probe.inbox, probe.rel, probe.claimed, Found.CLAIMED)  # checked first
    path = probe.root + probe.rel
    try:
        info = os.lstat(path)
    except OSError:
        return Seen(probe.inbox, probe.rel, probe.claimed, Found.GONE)
    if stat.S_ISDIR(info.st_mode):
        return None
    if stat.S_ISREG(info.st_mode):
        found = Found.LEFT if left is not None and left(probe, path, info) else Found.FILE
        return Seen(probe.inbox, probe.rel, probe.claimed, found, info.st_size,
                    info.st_mtime_ns)
    why = describe_unprocessable(Path(path))
    return Seen(probe.inbox, probe.rel, probe.claimed, Found.ODD if why else Found.GONE,
                info.st_size, info.st_mtime_ns, why)


class Hashed(NamedTuple):
    key: Key
    found: Found  # FILE (hashed, or changed), GONE, ODD or RETRY
    changed: bool  # size or mtime moved since it settled (size, mtime_ns are the new ones)
    size: int
    mtime_ns: int
    sha256: str | None = None
    duplicate_of: int | None = None
    why: str | None = None


def hash_batch(items: Iterable[tuple[Settled, str]], lookup: HashLookup | None) -> list[Hashed]:
    """Re-stat each settled file and hash the unchanged ones; look the hash up if asked."""
    buffer = bytearray(HASH_CHUNK)
    return [_hash_one(item, path, buffer, lookup) for item, path in items]


def _hash_one(item: Settled, path: str, buffer: bytearray,
              lookup: HashLookup | None) -> Hashed:
    key, size, mtime_ns = item
    try:
        before = os.lstat(path)
        if (before.st_size, before.st_mtime_ns) != (size, mtime_ns):
            return Hashed(key, Found.FILE, True, before.st_size, before.st_mtime_ns)
        digest = sha256_file(Path(path), buffer)
        after = os.lstat(path)
    except OSError:
        return _unreadable(item, path)
    if (after.st_size, after.st_mtime_ns) != (size, mtime_ns):
        return Hashed(key, Found.FILE, True, after.st_size, after.st_mtime_ns)
    original = lookup(key[0], digest) if lookup is not None else None
    return Hashed(key, Found.FILE, False, size, mtime_ns, digest, original)


def _unreadable(item: Settled, path: str) -> Hashed:
    """Why a settled file could not be hashed: gone, unprocessable, or a passing error."""
    key, size, mtime_ns = item
    if not os.path.lexists(path):
        return Hashed(key, Found.GONE, False, size, mtime_ns)
    why = describe_unprocessable(Path(path))
    if why is None:  # EIO, EMFILE…: look again
        return Hashed(key, Found.RETRY, False, size, mtime_ns)
    return Hashed(key, Found.ODD, False, size, mtime_ns, why=why)


# --- the loop side --------------------------------------------------------------------------

class Intake:
    """Turns watcher events and reconcile finds into journal rows, on the loop thread."""

    def __init__(self, settings: Settings, journal: Journal, on_duplicate: DuplicateFn,
                 clock: Callable[[], float] = time.time) -> None:
        self.journal = journal
        self.clock = clock
        self.settler = Settler(settings.daemon.settle_seconds)
        self._on_duplicate = on_duplicate
        self._dirty: dict[str, set[str]] = {}  # announced, waiting for the next probe hop
        self._probing: set[Key] = set()  # in the probe hop now
        self._hashing: set[Key] = set()  # settled: waiting for or in the hash hop
        self._due: list[Settled] = []
        self._timer: asyncio.TimerHandle | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._hash_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._log = get_logger(component="intake")
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        self.settings = settings
        self.inboxes = {inbox.name: inbox for inbox in settings.inboxes}
        self._prefixes = {name: folder_prefix(inbox.path)
                          for name, inbox in self.inboxes.items()}
        self.settler.settle_seconds = settings.daemon.settle_seconds

    @property
    def idle(self) -> bool:
        """Nothing announced is waiting for a thread hop (files may still be settling)."""
        return (not self._dirty and not self._probing and not self._hashing
                and self._probe_task is None and self._hash_task is None)

    # --- announcements ----------------------------------------------------------------------

    def announce_many(self, events: Iterable[Event]) -> None:
        """Watcher events (on the loop thread): remembered now, looked at in the next hop.

        Whether a path is a folder is decided by its lstat in that hop (a folder is then
        scanned, and only that folder), not by the event, which may be stale.
        """
        added = False
        for name, path, _is_directory in events:
            prefix = self._prefixes.get(name)
            rel = relative_below(prefix, path) if prefix is not None else None
            if rel is not None:
                self._dirty.setdefault(name, set()).add(rel)
                added = True
        if added and self._probe_task is None:
            self._probe_task = self._spawn(self._probe_pump())

    def announce(self, inbox_name: str, path: str | os.PathLike[str]) -> None:
        self.announce_many([Event(inbox_name, os.fspath(path), False)])

    def _mark_dirty(self, key: Key) -> None:
        self._dirty.setdefault(key[0], set()).add(key[1])
        if self._probe_task is None:
            self._probe_task = self._spawn(self._probe_pump())

    async def _probe_pump(self) -> None:
        try:
            while self._dirty:
                if self.journal.store.problem is not None:  # disk full: no new intake
                    with contextlib.suppress(JournalError):
                        await self.journal.durable()  # until what waits is written
                probes = self._take_dirty()
                try:
                    seen = await asyncio.to_thread(probe_batch, probes,
                                                   self.journal.failed_unmoved)
                    await self._apply_seen(seen)
                except Exception:  # a bug: these files wait for the next event or reconcile
                    self._log.exception("intake_failed", files=len(probes))
                finally:
                    self._probing.clear()
        finally:
            self._probe_task = None

    def _take_dirty(self) -> list[Probe]:
        """The next announced paths to probe, at most BATCH_FILES of them."""
        probes: list[Probe] = []
        for name, rels in list(self._dirty.items()):
            known_inbox = name in self.inboxes
            while rels and len(probes) < BATCH_FILES:
                key = (name, rels.pop())
                if known_inbox and (probe := self._probe_for(key)) is not None:
                    probes.append(probe)
                    self._probing.add(key)
            if not rels:
                del self._dirty[name]
        return probes

    def _probe_for(self, key: Key) -> Probe | None:
        if key in self._hashing:
            return None  # the hash hop looks at it again
        job = self.journal.unclaimed(*key)
        if job is not None and job.state is not JobState.SEEN:
            return None  # queued already
        claiming = self.journal.claiming(*key)
        claimed = claiming.claimed_path if claiming is not None else None
        return Probe(key[0], self._prefixes[key[0]], key[1], claimed)

    async def _apply_seen(self, seen: list[Seen]) -> list[Key]:
        """Journal and settler learn what the probe found; returns the files new to both."""
        new: list[Key] = []
        now = self.clock()
        for start in range(0, len(seen), APPLY_CHUNK):  # one `now`: they settle together
            if start:
                await asyncio.sleep(0)  # let the loop breathe between chunks of a big batch
            new.extend(key for item in seen[start:start + APPLY_CHUNK]
                       if (key := self._apply_one(item, now)) is not None)
        for name, count in Counter(name for name, _ in new).items():
            metrics.FILES_DISCOVERED.labels(inbox=name).inc(count)
        if seen:
            self._log.debug("intake_probed", files=len(seen), new=len(new))
        self._arm()
        return new

    def _apply_one(self, item: Seen, now: float) -> Key | None:
        key = (item.inbox, item.rel)
        inbox = self.inboxes.get(item.inbox)
        if inbox is None or key in self._hashing or item.found is Found.CLAIMED:
            return None  # gone from the settings; being hashed; its claim takes it
        claiming = self.journal.claiming(*key)
        if claiming is not None and claiming.claimed_path != item.claimed:
            self._mark_dirty(key)  # a claim began after the probe: look again, with it
            return None
        job = self.journal.unclaimed(*key)
        if item.found in (Found.GONE, Found.LEFT):
            self._vanished(key, job)
            return None
        created = job is None
        if job is None:
            job = self.journal.add_seen(item.inbox, item.rel, item.size, item.mtime_ns,
                                        inbox.priority)
            self._log.debug("file_seen", inbox=item.inbox, file=item.rel, job_id=job.id)
        elif job.state is not JobState.SEEN:
            return None
        if item.found is Found.ODD:
            self.settler.forget(key)
            self._queue(job, None, item.size, item.mtime_ns, why=item.why)
        else:
            self.settler.observe(key, item.size, item.mtime_ns, now)
        return key if created else None

    # --- settling and hashing ---------------------------------------------------------------

    def _arm(self) -> None:
        """One loop timer, at the earliest settle deadline."""
        deadline = self.settler.next_deadline()
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, deadline - self.clock())
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = loop.call_at(when, self._tick)

    def _tick(self) -> None:
        self._timer = None
        for item in self.settler.due(self.clock(), limit=BATCH_FILES):  # more: next tick
            job = self.journal.unclaimed(*item.key)
            if (item.key[0] in self.inboxes and job is not None
                    and job.state is JobState.SEEN and item.key not in self._hashing):
                self._hashing.add(item.key)
                self._due.append(item)
        if self._due and self._hash_task is None:
            self._hash_task = self._spawn(self._hash_pump())
        self._arm()

    async def _hash_pump(self) -> None:
        try:
            while self._due:
                batch = self._take_due()
                lookup = (self.journal.done_with_hash
                          if self.settings.daemon.on_duplicate == "skip" else None)
                try:
                    hashed = await asyncio.to_thread(hash_batch, batch, lookup)
                    await self._apply_hashed(hashed)
                except Exception:  # a bug must not strand these files: look at them again
                    self._log.exception("intake_failed", files=len(batch))
                    for item, _ in batch:
                        if item.key in self._hashing:
                            self._hashing.discard(item.key)
                            self._mark_dirty(item.key)
        finally:
            self._hash_task = None

    def _take_due(self) -> list[tuple[Settled, str]]:
        """The next files to hash: up to BATCH_FILES, and about HASH_BATCH_BYTES."""
        taken: list[tuple[Settled, str]] = []
        total, count = 0, 0
        for item in self._due:
            if taken and (total + item.size > HASH_BATCH_BYTES or count >= BATCH_FILES):
                break
            count += 1
            total += item.size
            prefix = self._prefixes.get(item.key[0])
            if prefix is None:
                self._hashing.discard(item.key)  # its inbox went away meanwhile
                continue
            taken.append((item, prefix + item.key[1]))
        del self._due[:count]
        return taken

    async def _apply_hashed(self, hashed: list[Hashed]) -> None:
        now = self.clock()
        queued = 0
        for start in range(0, len(hashed), APPLY_CHUNK):
            if start:
                await asyncio.sleep(0)
            for item in hashed[start:start + APPLY_CHUNK]:
                queued += self._apply_hash(item, now)
        if len(hashed) > 1:  # a single file has its own line
            self._log.info("intake_batch", hashed=len(hashed), queued=queued)
        self._arm()

    def _apply_hash(self, item: Hashed, now: float) -> bool:
        key = item.key
        self._hashing.discard(key)
        job = self.journal.unclaimed(*key)
        if job is None or job.state is not JobState.SEEN:
            return False
        if item.found is Found.GONE:
            self._vanished(key, job)
        elif item.found is Found.RETRY:
            self._mark_dirty(key)
        elif item.changed:
            self.settler.observe(key, item.size, item.mtime_ns, now)  # settles again
        else:
            skip = self.settings.daemon.on_duplicate == "skip"
            self._queue(job, item.sha256, item.size, item.mtime_ns, why=item.why,
                        duplicate_of=item.duplicate_of if skip else None)
            return True
        return False

    def _queue(self, job: Job, digest: str | None, size: int, mtime_ns: int, *,
               why: str | None = None, duplicate_of: int | None = None) -> None:
        job = self.journal.queue(job, digest, size, mtime_ns)
        if why is None:
            self._log.info("file_queued", inbox=job.inbox, file=job.rel_path, job_id=job.id,
                           size=size)
        else:  # it fails at claim, with this reason
            self._log.info("file_queued", inbox=job.inbox, file=job.rel_path, job_id=job.id,
                           size=size, unprocessable=why)
        if duplicate_of is not None:
            self._on_duplicate(job, duplicate_of)

    def _vanished(self, key: Key, job: Job | None) -> None:
        self.settler.forget(key)
        if job is not None and job.state is JobState.SEEN:
            self.journal.forget(job)
            self._log.debug("file_vanished", inbox=job.inbox, file=job.rel_path, job_id=job.id)

    # --- reconcile --------------------------------------------------------------------------

    async def reconcile(self, *, count_missed: bool) -> int:
        """Scan every inbox for files the journal does not know; returns how many."""
        found = 0
        for inbox in list(self.inboxes.values()):
            found += await self.reconcile_inbox(inbox, count_missed=count_missed)
        return found

    async def reconcile_inbox(self, inbox: InboxSettings, *, count_missed: bool) -> int:
        """Scan (in a thread), keep the names nobody knows, probe them (one more hop)."""
        names = await asyncio.to_thread(candidates, inbox)
        probes = self._reconcile_probes(inbox.name, names)
        if not probes:
            return 0
        seen = await asyncio.to_thread(probe_batch, probes, self.journal.failed_unmoved)
        new = await self._apply_seen(seen)
        if count_missed and new:
            metrics.RECONCILE_FOUND.labels(inbox=inbox.name).inc(len(new))
            for key in new:
                self._log.warning("reconcile_found", inbox=inbox.name, file=key[1])
        return len(new)

    def _reconcile_probes(self, name: str, names: list[str]) -> list[Probe]:
        if name not in self.inboxes:
            return []
        dirty = self._dirty.get(name, set())
        probes: list[Probe] = []
        for rel in names:
            key = (name, rel)
            if (rel in dirty or key in self.settler or key in self._hashing
                    or key in self._probing or self.journal.unclaimed(*key) is not None):
                continue
            if (probe := self._probe_for(key)) is not None:
                probes.append(probe)
        for job in self.journal.live(JobState.SEEN, inbox=name):  # seen before a restart
            key = job.key
            if not (job.rel_path in dirty or key in self.settler or key in self._hashing
                    or key in self._probing):
                probes.append(Probe(name, self._prefixes[name], job.rel_path, None))
        return probes

    # --- tasks ------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("intake_failed", error=repr(task.exception()))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in self._tasks:
            task.cancel()
