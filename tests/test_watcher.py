"""Discovery: settle detection on a driven clock, network filesystems, real watchdog events."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from traxd.config import InboxSettings
from traxd.watcher import Settler, Watchers, needs_polling, use_polling

KEY = ("in", "a.mp3")


def test_a_file_is_ready_only_after_settle_seconds_unchanged() -> None:
    settler = Settler(settle_seconds=2.0)
    settler.observe(KEY, size=10, mtime_ns=1, now=0.0)
    assert not settler.settled(KEY, now=1.9)
    assert settler.settled(KEY, now=2.0)


def test_any_change_restarts_the_quiet_period() -> None:
    # Given a file being written slowly: it grows every second
    settler = Settler(settle_seconds=2.0)
    for second in range(5):
        settler.observe(KEY, size=10 * (second + 1), mtime_ns=second, now=float(second))
        # Then it is never settled while it keeps growing
        assert not settler.settled(KEY, now=second + 1.5)
    # When the writer stops, it settles two seconds after the last change
    settler.observe(KEY, size=50, mtime_ns=4, now=5.0)
    assert settler.settled(KEY, now=6.0)
    assert settler.next_deadline() == 6.0


def test_an_unchanged_observation_does_not_restart_the_clock() -> None:
    settler = Settler(settle_seconds=2.0)
    settler.observe(KEY, 10, 1, now=0.0)
    settler.observe(KEY, 10, 1, now=1.5)
    assert settler.settled(KEY, now=2.0)


@pytest.mark.parametrize(("fstype", "polling"), [
    ("nfs4", True), ("cifs", True), ("smb3", True), ("fuse.sshfs", True), ("fuse.rclone", True),
    ("9p", True), ("ext4", False), ("xfs", False), ("apfs", False), ("tmpfs", False)])
def test_network_and_fuse_filesystems_are_polled(fstype: str, polling: bool) -> None:
    assert needs_polling(fstype) is polling


def test_polling_setting_overrides_detection(tmp_path: Path) -> None:
    inbox = InboxSettings("in", tmp_path, polling="always")
    assert use_polling(inbox, fstype="ext4")
    assert not use_polling(InboxSettings("in", tmp_path, polling="never"), fstype="nfs4")
    assert use_polling(InboxSettings("in", tmp_path), fstype="nfs4")


@pytest.mark.parametrize("polling", ["never", "always"])
async def test_observer_events_reach_the_loop_thread(tmp_path: Path, polling: str) -> None:
    # Given a watched inbox (native inotify, or the polling observer)
    inbox = InboxSettings("in", tmp_path, polling=polling)  # type: ignore[arg-type]
    seen: asyncio.Queue[tuple[str, Path]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    thread_ok: list[bool] = []

    def callback(name: str, path: Path) -> None:
        thread_ok.append(asyncio.get_running_loop() is loop)
        seen.put_nowait((name, path))

    watchers = Watchers(callback, polling_interval=0.1)
    watchers.start(inbox)
    try:
        # When a file is created in a sub-folder
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "a.mp3").write_bytes(b"x")
        # Then its path arrives on the loop thread
        async with asyncio.timeout(10):
            while True:
                name, path = await seen.get()
                if path == tmp_path / "sub" / "a.mp3":
                    break
        assert name == "in"
        assert all(thread_ok)
        assert watchers.modes["in"] == ("polling" if polling == "always" else "native")
    finally:
        watchers.stop_all()
