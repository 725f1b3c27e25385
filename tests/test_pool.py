"""Pool: pulls from the journal's ready set in order, the concurrency cap, isolation, stopping."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from traxd.config import DaemonSettings
from traxd.journal import Job, Journal
from traxd.pool import AHEAD_PER_SLOT, CLAIM_HORIZON, MAX_AHEAD, Slot, Turnover, WorkerPool
from traxd.throttle import Admission, Governor, MachineSampler, Sample

ROOMY = Sample(available_mb=10_000, cpu_percent=0.0)


def governor(workers: int, sample: Sample = ROOMY) -> Governor:
    return Governor(DaemonSettings(workers=workers), sampler=lambda: sample)


def released(tmp_path: Path, jobs: list[tuple[str, int, int]], inbox: str = "in") -> Journal:
    """A journal whose jobs (name, priority, size) are queued and released by a tick."""
    journal = Journal.open(tmp_path / "j.sqlite3")
    for name, priority, size in jobs:
        job = journal.add_seen(inbox, name, size, 0, priority)
        journal.queue(job, None, size, 0)
    journal.ready.release(now=journal.clock())
    return journal


def pool_of(journal: Journal, run: Callable[[Job, Slot], Awaitable[None]], workers: int,
            inboxes: tuple[str, ...] = ("in",)) -> WorkerPool:
    pool = WorkerPool(journal, run, governor(workers), lambda: inboxes)  # type: ignore[arg-type]
    pool.wake()
    return pool


async def test_jobs_start_in_priority_then_size_order(tmp_path: Path) -> None:
    journal = released(tmp_path, [("a", 5, 10), ("b", 5, 900), ("c", 1, 1), ("d", 5, 50)])
    started: list[str] = []
    all_done = asyncio.Event()

    async def run(job: Job, slot: Slot) -> None:
        await slot.acquire()
        started.append(job.rel_path)
        if len(started) == 4:
            all_done.set()

    server = asyncio.create_task(pool_of(journal, run, 1).serve())
    async with asyncio.timeout(5):
        await all_done.wait()
    server.cancel()
    assert started == ["c", "b", "d", "a"]


async def test_closed_inboxes_keep_their_jobs_until_they_open(tmp_path: Path) -> None:
    # Given a job in a closed inbox (night) and, released after it, one in an open one (day)
    journal = released(tmp_path, [("x", 5, 1)], inbox="night")
    journal.queue(journal.add_seen("day", "y", 1, 0, 5), None, 1, 0)
    journal.ready.release(now=journal.clock())
    started: list[str] = []

    async def run(job: Job, slot: Slot) -> None:
        await slot.acquire()
        started.append(job.rel_path)

    inboxes: tuple[str, ...] = ("day",)
    pool = WorkerPool(journal, run, governor(1), lambda: inboxes)
    server = asyncio.create_task(pool.serve())
    # When the pool looks for work
    pool.wake()
    async with asyncio.timeout(5):
        while not started:
            await asyncio.sleep(0)
    # Then only the open inbox's job started, though the other was queued first
    assert started == ["y"]
    # And when the night inbox opens, its job starts too
    inboxes = ("day", "night")
    pool.wake()
    async with asyncio.timeout(5):
        while len(started) < 2:
            await asyncio.sleep(0)
    server.cancel()
    assert started == ["y", "x"]


async def test_never_more_than_the_cap_at_once(tmp_path: Path) -> None:
    journal = released(tmp_path, [(f"f{n}", 0, 0) for n in range(10)])
    running, peak = 0, 0
    release = asyncio.Event()
    finished = asyncio.Semaphore(0)

    async def run(job: Job, slot: Slot) -> None:
        await slot.acquire()
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        finished.release()

    server = asyncio.create_task(pool_of(journal, run, 3).serve())
    async with asyncio.timeout(5):
        while running < 3:
            await asyncio.sleep(0)
        release.set()
        for _ in range(10):
            await finished.acquire()
    server.cancel()
    assert peak == 3


async def test_a_failing_or_hanging_job_does_not_touch_the_others(tmp_path: Path) -> None:
    journal = released(tmp_path, [("1", 0, 0), ("2", 0, 0), ("3", 0, 0), ("4", 0, 0)])
    done: list[str] = []
    hang = asyncio.Event()

    async def run(job: Job, slot: Slot) -> None:
        await slot.acquire()
        if job.rel_path == "1":
            raise RuntimeError("boom")
        if job.rel_path == "2":
            await hang.wait()
        done.append(job.rel_path)

    pool = pool_of(journal, run, 4)
    server = asyncio.create_task(pool.serve())
    async with asyncio.timeout(5):
        while sorted(done) != ["3", "4"] or len(pool.running) > 1:
            await asyncio.sleep(0)
    assert len(pool.running) == 1
    await pool.stop(grace=0.1)
    server.cancel()
    assert pool.running == {}


async def test_pressure_holds_admission_but_one_job_may_always_run() -> None:
    gov = governor(4, Sample(available_mb=10, cpu_percent=99))
    assert gov.evaluate() == Admission(allowed=2, memory_short=True, cpu_busy=True)
    assert gov.may_start(running=0)
    assert not gov.may_start(running=1)


def test_allowance_grows_back_by_one_when_pressure_ends() -> None:
    samples = [Sample(10, 0.0)] * 3 + [Sample(10_000, 0.0)] * 2
    gov = Governor(DaemonSettings(workers=8), sampler=lambda: samples.pop(0))
    assert [gov.evaluate().allowed for _ in range(5)] == [4, 2, 1, 2, 3]


def test_the_daemons_own_cpu_is_not_counted_as_pressure() -> None:
    # Given a sampler, and this process (the daemon) burning 0.3 s of CPU
    sampler = MachineSampler()
    started, cpu = time.monotonic(), time.process_time()
    while time.process_time() - cpu < 0.3:
        pass
    # When the machine is sampled
    sample = sampler()
    # Then that CPU is counted as traxd's own, not as others' load
    wall = time.monotonic() - started
    floor = 100 * 0.3 / wall / (os.cpu_count() or 1)
    assert sample.own_percent >= 0.8 * floor
    assert sample.cpu_percent <= 100.0 - 0.8 * floor


async def test_jobs_are_claimed_ahead_of_their_slot_but_no_further(tmp_path: Path) -> None:
    # Given 10 released jobs, 2 slots, and steps that block
    journal = released(tmp_path, [(f"f{n}", 0, 0) for n in range(10)])
    claimed: list[str] = []
    holding = asyncio.Event()
    block = asyncio.Event()

    async def run(job: Job, slot: Slot) -> None:
        claimed.append(job.rel_path)  # the claim happens before the slot is taken
        await slot.acquire()
        if len(pool.busy) == 2:
            holding.set()
        await block.wait()

    pool = pool_of(journal, run, 2)
    server = asyncio.create_task(pool.serve())
    ahead = 2 * AHEAD_PER_SLOT
    async with asyncio.timeout(5):
        await holding.wait()
        while len(claimed) < 2 + ahead:
            await asyncio.sleep(0)
    # Then two run, a few more wait claimed, and nothing else is taken from the queue
    for _ in range(10):
        await asyncio.sleep(0)
    assert (len(pool.busy), len(pool.ahead), len(claimed)) == (2, ahead, 2 + ahead)
    block.set()
    async with asyncio.timeout(5):
        while len(claimed) < 10 or pool.running:
            await asyncio.sleep(0)
    server.cancel()


def test_slow_steps_are_claimed_two_per_slot_ahead() -> None:
    # Given slots granted twice a second (steps of seconds)
    turnover = Turnover()
    for n in range(2):
        turnover.granted(100.0 + n * 0.5)
    # Then the claims ahead stay at the floor per slot
    assert turnover.ahead(slots=4, now=101.0) == 4 * AHEAD_PER_SLOT


def test_quick_steps_are_claimed_a_horizon_ahead_within_the_cap() -> None:
    # Given 1,000 slots granted in the last second (steps of a millisecond)
    turnover = Turnover()
    for n in range(1000):
        turnover.granted(100.0 + n / 1000)
    # Then a horizon's worth is claimed ahead; 40,000 a second would still be capped
    assert 16 * AHEAD_PER_SLOT < round(1000 * CLAIM_HORIZON) < MAX_AHEAD
    assert turnover.ahead(slots=16, now=101.0) == round(1000 * CLAIM_HORIZON)
    for n in range(39_000):
        turnover.granted(101.0 + n / 39_000)
    assert turnover.ahead(slots=16, now=102.0) == MAX_AHEAD
    # And a second later with no grants, the floor again
    assert turnover.ahead(slots=16, now=103.5) == 16 * AHEAD_PER_SLOT


async def test_quick_steps_are_claimed_in_batches_larger_than_the_slots(tmp_path: Path) -> None:
    # Given 3,000 released jobs, 2 slots and steps that end at once
    journal = released(tmp_path, [(f"f{n}", 0, 0) for n in range(3000)])
    most_ahead = 0
    done = 0

    async def run(job: Job, slot: Slot) -> None:
        nonlocal most_ahead, done
        most_ahead = max(most_ahead, len(pool.ahead))
        await asyncio.sleep(0)  # a claim takes a turn of the loop at the least
        await slot.acquire()
        slot.release()
        done += 1

    pool = pool_of(journal, run, 2)
    server = asyncio.create_task(pool.serve())
    async with asyncio.timeout(60):
        while done < 3000:
            await asyncio.sleep(0.01)
    server.cancel()
    # Then far more than two per slot were claimed ahead at some point, so that one claim
    # batch (one commit, one fsync per folder) served many jobs
    assert most_ahead > 10 * 2 * AHEAD_PER_SLOT
