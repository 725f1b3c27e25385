"""Intake: announced paths become journal rows in batches, a thread hop per batch."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest

from traxd import intake as intake_module
from traxd import metrics
from traxd.config import Settings
from traxd.intake import Intake
from traxd.journal import Job, JobState, Journal
from traxd.watcher import Event

T = TypeVar("T")


class Clock:
    """A clock the test moves: nothing settles until the test says time has passed."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def until(predicate: Callable[[], T | None], timeout: float = 20.0,
                what: str = "it") -> T:
    """Wait on the loop until predicate holds, or fail after timeout."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
    return value


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def count_hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every asyncio.to_thread call (the name of the function sent to a thread)."""
    hops: list[str] = []
    real = asyncio.to_thread

    async def counting(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        hops.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting)
    return hops


def reconcile_found() -> float:
    value = metrics.REGISTRY.get_sample_value("traxd_reconcile_found_total", {"inbox": "main"})
    return value or 0.0


@pytest.fixture
def inbox(settings: Settings) -> Path:
    path = settings.inboxes[0].path
    path.mkdir(parents=True)
    return path


@pytest.fixture
def journal(settings: Settings) -> Iterator[Journal]:
    journal = Journal.open(settings.daemon.state_dir / "journal.sqlite3")
    yield journal
    journal.close()


@pytest.fixture
def duplicates() -> list[Job]:
    return []


@pytest.fixture
async def intake(settings: Settings, journal: Journal,
                 duplicates: list[Job]) -> AsyncIterator[Intake]:
    intake = Intake(settings, journal, lambda job, original: duplicates.append(job))
    yield intake
    intake.close()


def drop(inbox: Path, rel: str, data: bytes) -> Event:
    path = inbox / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return Event("main", str(path), False)


def queued(journal: Journal) -> dict[str, Job]:
    return {job.rel_path: job for job in journal.live(JobState.QUEUED)}


async def test_a_burst_of_files_is_queued_in_a_few_thread_hops(
        inbox: Path, intake: Intake, journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given 2,000 files dropped into the inbox at once
    contents = {f"f{i:04}.mp3": f"media {i}".encode() for i in range(2000)}
    events = [drop(inbox, name, data) for name, data in contents.items()]
    hops = count_hops(monkeypatch)
    # When the watcher announces them in one batch
    intake.announce_many(events)
    # Then each becomes one queued job, with the sha256, size and mtime of its file
    await until(lambda: journal.count("main", JobState.QUEUED) == len(contents), what="queued")
    jobs = queued(journal)
    assert sorted(jobs) == sorted(contents)
    for name, job in jobs.items():
        assert job.sha256 == sha(contents[name])
        assert (job.size, job.mtime_ns) == (len(contents[name]), (inbox / name).stat().st_mtime_ns)
    # And the disk was touched in a bounded number of thread hops, not one per file
    assert set(hops) <= {"probe_batch", "hash_batch"}
    assert len(hops) <= 10, hops
    print(f"\n2,000 files: {len(hops)} thread hops ({', '.join(hops)})")


async def test_a_folder_event_scans_that_folder_only(
        inbox: Path, intake: Intake, journal: Journal) -> None:
    # Given a folder moved into the inbox, and a file elsewhere no event announced
    drop(inbox, "sub/a.mp3", b"a")
    drop(inbox, "sub/deeper/b.mp3", b"b")
    drop(inbox, "sub/.hidden.mp3", b"h")
    drop(inbox, "elsewhere.mp3", b"e")
    # When the folder's event arrives
    intake.announce_many([Event("main", str(inbox / "sub"), True)])
    # Then the files under that folder are picked up
    await until(lambda: journal.unclaimed("main", "sub/deeper/b.mp3"), what="b.mp3")
    await until(lambda: intake.idle, what="idle")
    assert journal.unclaimed("main", "sub/a.mp3") is not None
    assert journal.unclaimed("main", "sub/.hidden.mp3") is None
    # And the rest of the inbox was not scanned: only a reconcile finds the other file
    assert journal.unclaimed("main", "elsewhere.mp3") is None
    before = reconcile_found()
    assert await intake.reconcile(count_missed=True) == 1
    assert journal.unclaimed("main", "elsewhere.mp3") is not None
    assert reconcile_found() == before + 1


async def test_a_file_still_changing_is_queued_only_once_quiet(
        settings: Settings, inbox: Path, journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a clock the test moves (settle_seconds = 0.2) and a hash function that counts
    clock = Clock()
    intake = Intake(settings, journal, lambda job, original: None, clock=clock)
    hashed: list[Path] = []
    real_hash = intake_module.sha256_file

    def counting_hash(path: Path, buffer: bytearray | None = None) -> str:
        hashed.append(path)
        return real_hash(path, buffer)

    monkeypatch.setattr(intake_module, "sha256_file", counting_hash)
    try:
        # When a file is announced, then grows 0.15 s later
        intake.announce_many([drop(inbox, "slow.mp3", b"v1")])
        await until(lambda: journal.unclaimed("main", "slow.mp3"), what="seen")
        clock.now += 0.15
        intake.announce_many([drop(inbox, "slow.mp3", b"v1 and v2")])
        await until(lambda: intake.settler.stat_of(("main", "slow.mp3"))[0] == 9, what="regrow")
        # Then its quiet period started again at the change: not at the first sighting
        assert intake.settler.next_deadline() == pytest.approx(clock.now + 0.2)
        still = journal.unclaimed("main", "slow.mp3")
        assert still is not None and still.state is JobState.SEEN
        # And once quiet for settle_seconds, it is hashed once, as written last, and queued
        clock.now += 0.25
        job = (await until(lambda: queued(journal).get("slow.mp3"), what="queued"))
        assert job.sha256 == sha(b"v1 and v2") and job.size == 9
        assert hashed == [inbox / "slow.mp3"]
    finally:
        intake.close()


async def test_a_file_changed_while_hashed_settles_again(
        inbox: Path, intake: Intake, journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a writer that appends to the file while its first hash is being computed
    real_hash = intake_module.sha256_file
    calls: list[str] = []

    def racing_hash(path: Path, buffer: bytearray | None = None) -> str:
        digest = real_hash(path, buffer)
        if not calls:
            with path.open("ab") as handle:
                handle.write(b" and more")
        calls.append(digest)
        return digest

    monkeypatch.setattr(intake_module, "sha256_file", racing_hash)
    # When it is announced and settles
    intake.announce_many([drop(inbox, "race.mp3", b"first")])
    # Then it is queued only after a second quiet period, with the hash of what is there now
    job = await until(lambda: queued(journal).get("race.mp3"), what="queued")
    assert job.sha256 == sha(b"first and more")
    assert calls == [sha(b"first"), sha(b"first and more")]


async def test_a_seen_file_that_vanishes_is_forgotten(
        settings: Settings, inbox: Path, journal: Journal) -> None:
    # Given a seen file that has not settled yet (the clock is the test's)
    clock = Clock()
    intake = Intake(settings, journal, lambda job, original: None, clock=clock)
    try:
        intake.announce_many([drop(inbox, "brief.mp3", b"x")])
        await until(lambda: journal.unclaimed("main", "brief.mp3"), what="seen")
        # When it is deleted (watchdog's deletion events are not announced) and time passes
        (inbox / "brief.mp3").unlink()
        clock.now += 1.0
        # Then its job is forgotten, in memory and on disk
        await until(lambda: journal.unclaimed("main", "brief.mp3") is None, what="forget")
        await asyncio.to_thread(journal.sync)
        rows = await asyncio.to_thread(journal.store.read, "SELECT COUNT(*) FROM jobs")
        assert rows[0][0] == 0
        assert ("main", "brief.mp3") not in intake.settler
    finally:
        intake.close()


def finished_job(journal: Journal, rel: str, data: bytes, outcome: JobState) -> Job:
    job = journal.add_seen("main", rel, len(data), 1, 5)
    running = journal.start(journal.queue(job, sha(data), len(data), 1), f"/p/{rel}")
    return journal.finish(journal.destine(running, outcome, f"/d/{rel}", None))


@pytest.mark.parametrize("policy", ["skip", "reprocess"])
async def test_a_file_already_done_is_handed_on_as_a_duplicate(
        settings: Settings, inbox: Path, journal: Journal,
        policy: Literal["skip", "reprocess"]) -> None:
    # Given a file processed before (done) and the duplicate policy
    settings = dataclasses.replace(
        settings, daemon=dataclasses.replace(settings.daemon, on_duplicate=policy))
    old = finished_job(journal, "old.mp3", b"same bytes", JobState.DONE)
    await asyncio.to_thread(journal.sync)
    duplicates: list[tuple[Job, int]] = []
    intake = Intake(settings, journal, lambda job, original: duplicates.append((job, original)))
    try:
        # When the same bytes arrive under another name, beside a new file
        intake.announce_many([drop(inbox, "again.mp3", b"same bytes"),
                              drop(inbox, "new.mp3", b"other bytes")])
        await until(lambda: len(queued(journal)) == 2, what="queued")
        # Then (policy skip) the copy is queued and handed to on_duplicate; the other is not
        if policy == "skip":
            assert [(j.rel_path, j.state, original) for j, original in duplicates] == [
                ("again.mp3", JobState.QUEUED, old.id)]
            assert duplicates[0][0].sha256 == sha(b"same bytes")
        else:
            assert duplicates == []
    finally:
        intake.close()


async def test_a_file_whose_claim_is_pending_is_not_added_again(
        settings: Settings, inbox: Path, intake: Intake, journal: Journal) -> None:
    # Given a job that chose its processing/ path and has not moved the file yet
    drop(inbox, "a.mp3", b"a")
    processing = settings.inboxes[0].sibling("processing")
    processing.mkdir()
    job = journal.add_seen("main", "a.mp3", 1, 1, 5)
    journal.start(journal.queue(job, sha(b"a"), 1, 1), str(processing / "a.mp3"))
    # When an event and a reconcile come across the file in the inbox
    intake.announce_many([Event("main", str(inbox / "a.mp3"), False)])
    await until(lambda: intake.idle, what="idle")
    found = await intake.reconcile(count_missed=True)
    # Then nothing new is made of it: the claim takes it
    assert found == 0
    assert [j.id for j in journal.live()] == [job.id]
    assert ("main", "a.mp3") not in intake.settler
    # And once the claim's rename happened, a new file of that name is a new job
    os.rename(inbox / "a.mp3", processing / "a.mp3")
    intake.announce_many([drop(inbox, "a.mp3", b"a, again")])
    fresh = await until(lambda: journal.unclaimed("main", "a.mp3"), what="new job")
    assert fresh.id != job.id


async def test_seen_jobs_from_before_a_restart_are_observed_again(
        inbox: Path, intake: Intake, journal: Journal) -> None:
    # Given a seen job left in the journal by a previous run, its file still there
    drop(inbox, "left.mp3", b"left over")
    journal.add_seen("main", "left.mp3", 9, 1, 5)
    before = reconcile_found()
    # When the inbox is reconciled
    found = await intake.reconcile(count_missed=True)
    # Then it is not counted as missed, but it settles and is queued
    assert found == 0 and reconcile_found() == before
    job = await until(lambda: queued(journal).get("left.mp3"), what="queued")
    assert job.sha256 == sha(b"left over")


async def test_a_link_or_fifo_is_queued_unhashed_to_fail_at_claim(
        inbox: Path, intake: Intake, journal: Journal, tmp_path: Path) -> None:
    # Given a symbolic link and a FIFO in the inbox
    (tmp_path / "target.mp3").write_bytes(b"t")
    (inbox / "link.mp3").symlink_to(tmp_path / "target.mp3")
    os.mkfifo(inbox / "pipe.mp3")
    # When they are announced
    intake.announce_many([Event("main", str(inbox / name), False)
                          for name in ("link.mp3", "pipe.mp3")])
    # Then they are queued at once without a hash (the claim says why they cannot be done)
    await until(lambda: len(queued(journal)) == 2, what="queued")
    assert {name: job.sha256 for name, job in queued(journal).items()} == {
        "link.mp3": None, "pipe.mp3": None}


async def test_names_outside_the_inbox_or_hidden_are_ignored(
        inbox: Path, intake: Intake, journal: Journal, tmp_path: Path) -> None:
    # Given announcements of a partial download, a hidden file, a path outside, an unknown inbox
    events = [drop(inbox, "a.mp3.part", b"p"), drop(inbox, ".b.mp3", b"h"),
              Event("main", str(tmp_path / "c.mp3"), False), Event("nope", str(inbox), True),
              Event("main", str(inbox), True), drop(inbox, "ok.mp3", b"ok")]
    # When they are announced
    intake.announce_many(events)
    # Then only the regular name in the inbox becomes a job
    await until(lambda: queued(journal).get("ok.mp3"), what="ok.mp3")
    assert [job.rel_path for job in journal.live()] == ["ok.mp3"]


async def test_a_failed_hash_hop_does_not_strand_its_files(
        inbox: Path, intake: Intake, journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a hash hop that fails once (a bug, say) and works afterwards
    real = intake_module.hash_batch
    failures: list[int] = []

    def failing_once(*args: Any) -> list[intake_module.Hashed]:
        if not failures:
            failures.append(1)
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(intake_module, "hash_batch", failing_once)
    # When files settle into that hop
    intake.announce_many([drop(inbox, f"f{i}.mp3", b"%d" % i) for i in range(3)])
    # Then they are looked at again and queued all the same
    await until(lambda: len(queued(journal)) == 3, what="queued")
    assert failures == [1]
