"""Discovery: settle detection on a driven clock, network filesystems, real watchdog events."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from pathlib import Path

import pytest

from traxd.config import InboxSettings
from traxd.watcher import (
    PROMPT_OBSERVER,
    Event,
    Settled,
    Settler,
    Watchers,
    needs_polling,
    use_polling,
)

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


def test_files_come_due_in_deadline_order_and_stale_entries_are_skipped() -> None:
    # Given files seen at different times on a driven clock (settle_seconds = 2)
    settler = Settler(settle_seconds=2.0)
    a, b, c = ("in", "a"), ("in", "b"), ("in", "c")
    settler.observe(a, 1, 1, now=0.0)
    settler.observe(b, 1, 1, now=0.5)
    settler.observe(c, 1, 1, now=1.0)
    # When a changes (its first heap entry goes stale) and b is forgotten
    settler.observe(a, 2, 2, now=1.2)
    settler.forget(b)
    # Then the next deadline is c's, the stale heads skipped
    assert settler.next_deadline() == 3.0
    assert settler.due(now=2.9) == []
    assert settler.due(now=3.0) == [Settled(c, 1, 1)]
    # And a comes due at its new deadline, with its new stat, once; then nothing is left
    assert settler.next_deadline() == pytest.approx(3.2)
    assert settler.due(now=10.0) == [Settled(a, 2, 2)]
    assert settler.next_deadline() is None and len(settler) == 0
    assert settler.due(now=20.0) == []


def test_many_files_come_due_oldest_first_and_the_heap_stays_small() -> None:
    # Given 1,000 files seen in random order, each re-observed with a change 5 times
    settler = Settler(settle_seconds=1.0)
    rng = random.Random(7)
    times = {("in", f"f{i}"): rng.uniform(0, 100) for i in range(1000)}
    for round_ in range(5):
        for key, at in times.items():
            settler.observe(key, round_, round_, now=at + round_ * 0.001)
    # When everything is due
    due = settler.due(now=1000.0)
    # Then each file comes due once, in the order of its last change, with its last stat
    assert [item.key for item in due] == sorted(times, key=times.__getitem__)
    assert {(item.size, item.mtime_ns) for item in due} == {(4, 4)}
    assert len(settler._heap) <= 2 * 1000 + 64


@pytest.mark.parametrize("polling", ["never", "always"])
async def test_observer_events_reach_the_loop_thread(tmp_path: Path, polling: str) -> None:
    # Given a watched inbox (native inotify, or the polling observer)
    inbox = InboxSettings("in", tmp_path, polling=polling)  # type: ignore[arg-type]
    seen: asyncio.Queue[Event] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    thread_ok: list[bool] = []

    def callback(batch: list[Event]) -> None:
        thread_ok.append(asyncio.get_running_loop() is loop)
        for event in batch:
            seen.put_nowait(event)

    watchers = Watchers(callback, polling_interval=0.1)
    watchers.start(inbox)
    try:
        # When a file is created in a sub-folder
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "a.mp3").write_bytes(b"x")
        # Then its path arrives on the loop thread
        async with asyncio.timeout(10):
            while True:
                event = await seen.get()
                if event.path == str(tmp_path / "sub" / "a.mp3"):
                    break
        assert event.inbox == "in" and not event.is_directory
        assert all(thread_ok)
        assert watchers.modes["in"] == ("polling" if polling == "always" else "native")
    finally:
        watchers.stop_all()


class Arrivals:
    """Collects announced paths on the loop; tests wait on them with a deadline."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.batches = 0
        self.changed = asyncio.Event()

    def __call__(self, batch: list[Event]) -> None:
        self.batches += 1
        now = time.monotonic()
        for event in batch:
            self.at.setdefault(event.path, now)
        self.changed.set()

    async def wait_for(self, paths: set[str], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not paths <= self.at.keys():
                self.changed.clear()
                await self.changed.wait()


def native_inbox(tmp_path: Path) -> tuple[InboxSettings, Path]:
    root = tmp_path / "box"
    (root / "inbox").mkdir(parents=True)
    (root / "staging").mkdir()
    return InboxSettings("in", root / "inbox", polling="never"), root / "staging"


async def test_a_burst_of_renames_reaches_the_loop_in_batches(tmp_path: Path) -> None:
    # Given a natively watched inbox and 1,000 files written beside it
    inbox, staging = native_inbox(tmp_path)
    names = [f"f{i:04}.mp3" for i in range(1000)]
    for name in names:
        (staging / name).write_bytes(b"x")
    arrivals = Arrivals()
    watchers = Watchers(arrivals)
    watchers.start(inbox)
    try:
        # When they are all renamed into the inbox at once (by another thread: the loop is free)
        def rename_all() -> None:
            for name in names:
                os.rename(staging / name, inbox.path / name)

        await asyncio.to_thread(rename_all)
        # Then every one is announced, and the loop was woken far less often than once a file
        await arrivals.wait_for({str(inbox.path / name) for name in names})
        assert watchers.events >= len(names)
        assert watchers.wakeups == arrivals.batches < watchers.events
        print(f"\n1,000 renames: {watchers.events} events in {watchers.wakeups} loop wake-ups")
    finally:
        watchers.stop_all()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify only")
async def test_a_rename_in_is_announced_at_once_after_a_rename_out(tmp_path: Path) -> None:
    # Given a natively watched inbox, a file in it, and files ready beside it
    assert PROMPT_OBSERVER is not None
    inbox, staging = native_inbox(tmp_path)
    processing = staging.parent / "processing"
    processing.mkdir()
    arrivals = Arrivals()
    watchers = Watchers(arrivals)
    watchers.start(inbox)
    latencies: list[float] = []
    try:
        for round_ in range(5):
            (inbox.path / f"out{round_}.mp3").write_bytes(b"x")
            (staging / f"in{round_}.mp3").write_bytes(b"y")
            await arrivals.wait_for({str(inbox.path / f"out{round_}.mp3")})
            # When a file is claimed (renamed out of the inbox), and another renamed in
            os.rename(inbox.path / f"out{round_}.mp3", processing / f"out{round_}.mp3")
            start = time.monotonic()
            os.rename(staging / f"in{round_}.mp3", inbox.path / f"in{round_}.mp3")
            # Then the new file is announced without waiting for the move to be paired
            target = str(inbox.path / f"in{round_}.mp3")
            await arrivals.wait_for({target})
            latencies.append(arrivals.at[target] - start)
        print(f"\nrename -> announce: max {max(latencies) * 1000:.1f} ms, "
              f"all {[round(x * 1000, 1) for x in latencies]} ms")
        assert max(latencies) < 0.3
    finally:
        watchers.stop_all()
