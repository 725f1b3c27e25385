"""Discovery: watchdog observers bridged into asyncio, settle detection and reconcile scans."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from traxd.config import InboxSettings
from traxd.folders import relative_name, scan

# Filesystems whose change events are missing or unreliable: watch them by polling.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb", "smbfs", "smb2", "smb3", "9p", "afpfs", "webdav", "davfs",
    "ncpfs", "glusterfs", "ceph", "lustre", "gpfs", "beegfs", "vboxsf", "vmhgfs", "sshfs",
})

PathCallback = Callable[[str, Path], None]


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


class _Bridge(FileSystemEventHandler):
    """Runs in the observer thread: hands each path to the loop and does nothing else."""

    def __init__(self, loop: asyncio.AbstractEventLoop, inbox: str, callback: PathCallback) -> None:
        self._loop, self._inbox, self._callback = loop, inbox, callback

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("deleted", "opened", "closed_no_write"):
            return
        path = event.dest_path if event.event_type == "moved" else event.src_path
        name = os.fsdecode(path)
        self._loop.call_soon_threadsafe(self._callback, self._inbox, Path(name))


class Watchers:
    """One observer per inbox (inotify/FSEvents, or polling on network filesystems)."""

    def __init__(self, callback: PathCallback, polling_interval: float = 2.0) -> None:
        self._callback = callback
        self._polling_interval = polling_interval
        self._observers: dict[str, BaseObserver] = {}
        self.modes: dict[str, str] = {}

    def start(self, inbox: InboxSettings) -> str:
        """Watch an inbox; returns the mode used ("native" or "polling")."""
        loop = asyncio.get_running_loop()
        polling = use_polling(inbox)
        observer: BaseObserver = (PollingObserver(timeout=self._polling_interval) if polling
                                  else Observer())
        observer.schedule(_Bridge(loop, inbox.name, self._callback), str(inbox.path),
                          recursive=True)
        observer.daemon = True
        observer.start()
        self._observers[inbox.name] = observer
        self.modes[inbox.name] = "polling" if polling else "native"
        return self.modes[inbox.name]

    def stop(self, name: str) -> None:
        observer = self._observers.pop(name, None)
        self.modes.pop(name, None)
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)

    def stop_all(self) -> None:
        for name in list(self._observers):
            self.stop(name)

    def alive(self) -> bool:
        return all(observer.is_alive() for observer in self._observers.values())


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    since: float  # when size and mtime were last seen to change


class Settler:
    """Holds files until their size and mtime stay unchanged for `settle_seconds`.

    Pure bookkeeping: callers pass `now` and the stat results, so tests drive the clock.
    """

    def __init__(self, settle_seconds: float) -> None:
        self.settle_seconds = settle_seconds
        self._pending: dict[tuple[str, str], _Pending] = {}

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def pending(self) -> list[tuple[str, str]]:
        return list(self._pending)

    def observe(self, key: tuple[str, str], size: int, mtime_ns: int, now: float) -> None:
        """Record a stat of the file; any change restarts its quiet period."""
        seen = self._pending.get(key)
        if seen is None or (seen.size, seen.mtime_ns) != (size, mtime_ns):
            self._pending[key] = _Pending(size, mtime_ns, now)

    def forget(self, key: tuple[str, str]) -> None:
        self._pending.pop(key, None)

    def settled(self, key: tuple[str, str], now: float) -> bool:
        seen = self._pending.get(key)
        return seen is not None and now - seen.since >= self.settle_seconds

    def next_deadline(self) -> float | None:
        if not self._pending:
            return None
        return min(p.since for p in self._pending.values()) + self.settle_seconds

    def stat_of(self, key: tuple[str, str]) -> tuple[int, int]:
        seen = self._pending[key]
        return seen.size, seen.mtime_ns


def candidates(inbox: InboxSettings) -> list[str]:
    """Every candidate file under an inbox (a reconcile scan); blocking, run it in a thread."""
    return list(scan(inbox.path))


def relative_to_inbox(inbox: InboxSettings, path: Path) -> str | None:
    return relative_name(inbox.path, path)
