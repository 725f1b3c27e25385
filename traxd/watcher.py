"""Discovery: watchdog observers bridged into asyncio, settle detection and scan helpers.

Observer threads never call into the loop per event: they append to one mailbox and wake
the loop only when it was empty, so a burst of events reaches the loop as a few batches.
On Linux the inotify observer does not hold moves back (watchdog keeps each IN_MOVED_FROM
for 0.5 s to pair it with its IN_MOVED_TO, and every event behind it waits; traxd needs only
where a file went, never where it came from).
"""

from __future__ import annotations

import asyncio
import heapq
import os
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import psutil
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver
from watchdog.observers.polling import PollingObserver
from watchdog.utils import UnsupportedLibcError

from traxd.config import InboxSettings
from traxd.folders import scan

# Filesystems whose change events are missing or unreliable: watch them by polling.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb", "smbfs", "smb2", "smb3", "9p", "afpfs", "webdav", "davfs",
    "ncpfs", "glusterfs", "ceph", "lustre", "gpfs", "beegfs", "vboxsf", "vmhgfs", "sshfs",
})

Key = tuple[str, str]  # (inbox name, path relative to the inbox)


class Event(NamedTuple):
    """Something happened at path (absolute, as the observer reports it) in an inbox."""

    inbox: str
    path: str
    is_directory: bool


EventsCallback = Callable[[list[Event]], None]

# Event types that say nothing about a file to pick up (a deletion, a read).
_SILENT = frozenset({"deleted", "opened", "closed_no_write"})
# A folder matters only when it appears (created, or moved/renamed into place).
_FOLDER_NEWS = frozenset({"created", "moved"})
# What inotify is asked for: a file or folder appears (created, moved in) or a writer closes
# it. Writes (IN_MODIFY), opens and reads (traxd's own hashing), deletions and the claims'
# renames out are not even sent by the kernel. A file still growing is caught by the settle
# check, which compares its stat again before hashing it.
INOTIFY_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileMovedEvent, FileClosedEvent, DirCreatedEvent, DirMovedEvent]


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding path ("ext4", "nfs4", "fuse.sshfs", …)."""
    target = str(path.resolve())
    best, kind = "", ""
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint.rstrip("/") or "/"
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, part.fstype
    return kind


def needs_polling(fstype: str) -> bool:
    kind = fstype.lower()
    return kind in NETWORK_FILESYSTEMS or kind.startswith(("fuse", "nfs", "smb"))


def use_polling(inbox: InboxSettings, fstype: str | None = None) -> bool:
    if inbox.polling != "auto":
        return inbox.polling == "always"
    return needs_polling(fstype if fstype is not None else filesystem_type(inbox.path))


# --- a native observer without the move-pairing delay -------------------------------------

# None where it cannot be built: the stock observer, with its delay, is used.
PROMPT_OBSERVER: Callable[[], BaseObserver] | None = None

try:
    if not sys.platform.startswith("linux"):
        raise ImportError("inotify is Linux only")
    from watchdog.observers.inotify import InotifyEmitter, InotifyObserver, InotifyWatchGroup
    from watchdog.observers.inotify_move_event_grouper import (
        InotifyMoveEventGrouper,
        PathedInotifyEvent,
    )
except (ImportError, UnsupportedLibcError):  # not Linux, or a watchdog before 7 (no grouper)
    pass
else:
    class _PromptGrouper(InotifyMoveEventGrouper):
        """Hands on every event at once; a move whose two halves are read together still
        pairs, otherwise it arrives as a deletion and a creation (both fine for traxd).

        Pairing searches the queue, so it is tried only for an IN_MOVED_TO whose cookie an
        IN_MOVED_FROM of this watch carried: a file moved in from outside (most arrivals)
        goes straight on. Both methods run in watchdog's inotify reader thread only.
        """

        delay = 0.0
        _COOKIES = 1024  # IN_MOVED_FROM cookies remembered (claims leave unpaired ones)

        def __init__(self) -> None:
            super().__init__()
            self._from_cookies: dict[int, None] = {}

        def get_queued_moved_from_event(self, cookie: int) -> PathedInotifyEvent | None:
            if cookie not in self._from_cookies:
                return None
            return super().get_queued_moved_from_event(cookie)

        def put_event(self, event: PathedInotifyEvent) -> None:
            cookie = event.ev.cookie
            if event.ev.is_moved_to:
                if cookie not in self._from_cookies:
                    self._queue.put(event)  # from outside: nothing to pair it with
                    return
                del self._from_cookies[cookie]
            elif event.ev.is_moved_from:
                self._from_cookies[cookie] = None
                if len(self._from_cookies) > self._COOKIES:
                    del self._from_cookies[next(iter(self._from_cookies))]
            super().put_event(event)

    @dataclass
    class _PromptWatchGroup(InotifyWatchGroup):
        _move_event_grouper: InotifyMoveEventGrouper = field(
            default_factory=_PromptGrouper, init=False)

    class _PromptEmitter(InotifyEmitter):
        def on_thread_start(self) -> None:
            self._inotify = _PromptWatchGroup(
                self._inotify_fd, os.fsencode(self.watch.path),
                is_recursive=self.watch.is_recursive,
                event_mask=self.get_event_mask_from_filter(),
                follow_symlink=self.watch.follow_symlink)

    class PromptInotifyObserver(InotifyObserver):
        """watchdog's inotify observer, with emitters that do not delay moves."""

        def __init__(self, *, timeout: float = DEFAULT_OBSERVER_TIMEOUT) -> None:
            super().__init__(timeout=timeout)
            self._emitter_class = _PromptEmitter

    PROMPT_OBSERVER = PromptInotifyObserver


def native_observer() -> BaseObserver:
    return PROMPT_OBSERVER() if PROMPT_OBSERVER is not None else Observer()


# --- the bridge into the loop ---------------------------------------------------------------

class _Mailbox:
    """Observer threads post events; the loop takes them all at once, one wake-up a batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: EventsCallback) -> None:
        self.loop = loop
        self._callback = callback
        self._lock = threading.Lock()
        self._items: list[Event] = []
        self.wakeups = 0  # batches handed to the callback
        self.events = 0  # events in them

    def post(self, event: Event) -> None:
        """Any thread: queue the event; wake the loop only if nothing was waiting."""
        with self._lock:
            self._items.append(event)
            if len(self._items) > 1:
                return  # a wake-up is already on its way and will take this one too
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            return

    def _drain(self) -> None:
        with self._lock:
            batch, self._items = self._items, []
        if batch:
            self.wakeups += 1
            self.events += len(batch)
            self._callback(batch)


class _Bridge(FileSystemEventHandler):
    """Runs in the observer thread: posts where something appeared, and nothing else."""

    def __init__(self, mailbox: _Mailbox, inbox: str) -> None:
        self._mailbox, self._inbox = mailbox, inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        if kind in _SILENT or (event.is_directory and kind not in _FOLDER_NEWS):
            return  # a folder's "modified" only echoes the events of its entries
        path = event.dest_path if kind == "moved" else event.src_path
        if path:
            self._mailbox.post(Event(self._inbox, os.fsdecode(path), event.is_directory))


class Watchers:
    """One observer per inbox (inotify/FSEvents, or polling on network filesystems).

    `callback` runs on the loop thread with a batch of events at a time.
    """

    def __init__(self, callback: EventsCallback, polling_interval: float = 2.0) -> None:
        self._callback = callback
        self._polling_interval = polling_interval
        self._observers: dict[str, BaseObserver] = {}
        self._mailbox: _Mailbox | None = None
        self.modes: dict[str, str] = {}
        self._watched: dict[str, tuple[Path, tuple[int, int] | None]] = {}  # folder, identity
        self.missing: set[str] = set()  # inboxes whose folder is gone: not watched now

    def start(self, inbox: InboxSettings) -> str:
        """Watch an inbox (call it on the loop); returns the mode ("native" or "polling")."""
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = _Mailbox(loop, self._callback)
        polling = use_polling(inbox)
        observer = (PollingObserver(timeout=self._polling_interval) if polling
                    else native_observer())
        inotify = not polling and sys.platform.startswith("linux")
        observer.schedule(_Bridge(self._mailbox, inbox.name), str(inbox.path), recursive=True,
                          event_filter=INOTIFY_EVENTS if inotify else None)
        observer.daemon = True
        observer.start()
        self._observers[inbox.name] = observer
        self._watched[inbox.name] = (inbox.path, identity(inbox.path))
        self.missing.discard(inbox.name)
        self.modes[inbox.name] = "polling" if polling else "native"
        return self.modes[inbox.name]

    def track(self, inbox: InboxSettings) -> None:
        """Remember a missing inbox folder, so that `changed` reports it when it is back."""
        self._watched[inbox.name] = (inbox.path, None)

    def changed(self) -> list[str]:
        """Inboxes whose folder was removed, or replaced by another, since they were
        watched: their watch sees nothing any more. Blocking (a stat each): not on the loop."""
        return [name for name, (path, was) in list(self._watched.items())
                if identity(path) != was]

    @property
    def wakeups(self) -> int:
        """How many times the loop was woken for events (each time with a batch)."""
        return self._mailbox.wakeups if self._mailbox is not None else 0

    @property
    def events(self) -> int:
        return self._mailbox.events if self._mailbox is not None else 0

    def stop(self, name: str) -> None:
        observer = self._observers.pop(name, None)
        self.modes.pop(name, None)
        self._watched.pop(name, None)
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)

    def stop_all(self) -> None:
        for name in list(self._observers):
            self.stop(name)

    def alive(self) -> bool:
        return all(observer.is_alive() for observer in self._observers.values())


def identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder, or None when there is none."""
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


# --- settling -------------------------------------------------------------------------------

@dataclass(slots=True)
class _Pending:
    size: int
    mtime_ns: int
    since: float  # when size and mtime were last seen to change


class Settled(NamedTuple):
    """A file whose size and mtime stayed unchanged for the quiet period."""

    key: Key
    size: int
    mtime_ns: int


class Settler:
    """Holds files until their size and mtime stay unchanged for `settle_seconds`.

    Pure bookkeeping: callers pass `now` and the stat results, so tests drive the clock.
    A heap of (since, key) orders the files by deadline; an entry whose file changed again
    or was forgotten is stale and dropped when it reaches the top (lazy deletion).
    """

    def __init__(self, settle_seconds: float) -> None:
        self.settle_seconds = settle_seconds
        self._pending: dict[Key, _Pending] = {}
        self._heap: list[tuple[float, Key]] = []

    def __contains__(self, key: Key) -> bool:
        return key in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def pending(self) -> list[Key]:
        return list(self._pending)

    def observe(self, key: Key, size: int, mtime_ns: int, now: float) -> None:
        """Record a stat of the file; any change restarts its quiet period."""
        seen = self._pending.get(key)
        if seen is not None and (seen.size, seen.mtime_ns) == (size, mtime_ns):
            return
        self._pending[key] = _Pending(size, mtime_ns, now)
        heapq.heappush(self._heap, (now, key))
        if len(self._heap) > 2 * len(self._pending) + 64:
            self._compact()

    def forget(self, key: Key) -> None:
        self._pending.pop(key, None)  # its heap entry is stale from now on

    def settled(self, key: Key, now: float) -> bool:
        seen = self._pending.get(key)
        return seen is not None and now - seen.since >= self.settle_seconds

    def next_deadline(self) -> float | None:
        """When the first file settles (stale heads are dropped: amortised O(1))."""
        self._drop_stale()
        return self._heap[0][0] + self.settle_seconds if self._heap else None

    def due(self, now: float, limit: int | None = None) -> list[Settled]:
        """Take the files whose quiet period has passed (oldest first, `limit` at most);
        they are no longer pending."""
        out: list[Settled] = []
        heap = self._heap
        while heap and now - heap[0][0] >= self.settle_seconds and len(out) != limit:
            since, key = heapq.heappop(heap)
            seen = self._pending.get(key)
            if seen is not None and seen.since == since:
                del self._pending[key]
                out.append(Settled(key, seen.size, seen.mtime_ns))
        return out

    def stat_of(self, key: Key) -> tuple[int, int]:
        seen = self._pending[key]
        return seen.size, seen.mtime_ns

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap:
            since, key = heap[0]
            seen = self._pending.get(key)
            if seen is not None and seen.since == since:
                return
            heapq.heappop(heap)

    def _compact(self) -> None:
        self._heap = [(p.since, key) for key, p in self._pending.items()]
        heapq.heapify(self._heap)


# --- scans (blocking: run them in a thread) -------------------------------------------------

def candidates(inbox: InboxSettings) -> list[str]:
    """Every candidate file under an inbox (a reconcile scan); none when it is missing."""
    return list(scan(inbox.path))


def scan_folder(root: Path, rel_dir: str) -> list[str]:
    """Candidate files under one folder of an inbox, as names relative to the inbox."""
    if not rel_dir:
        return list(scan(root))
    prefix = rel_dir + "/"
    return [prefix + name for name in scan(root / rel_dir)]
