"""Batcher: LPT order, size-balanced groups, and the APScheduler tick releasing to the pool."""

from __future__ import annotations

import asyncio
from pathlib import Path

from traxd import metrics
from traxd.batcher import Batcher, group_by_size, order_jobs
from traxd.config import DaemonSettings
from traxd.journal import Job, JobState, Journal
from traxd.pool import Slot, WorkerPool
from traxd.throttle import Governor, Sample


def queued(journal: Journal, name: str, size: int, priority: int = 5) -> Job:
    job = journal.add_seen("in", name, size, 0, priority)
    return journal.queue(job, None, size, 0)


def test_order_and_groups(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j.sqlite3")
    jobs = [queued(journal, f"f{n}", size) for n, size in enumerate([7, 5, 4, 3, 3, 2])]
    assert [j.size for j in order_jobs(jobs)] == [7, 5, 4, 3, 3, 2]
    groups = group_by_size(jobs, 2)
    assert sorted(sum(j.size for j in g) for g in groups) == [12, 12]


async def test_the_tick_releases_queued_jobs_as_one_batch_and_wakes_the_pool(
        tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j.sqlite3")
    for name, size in [("a", 1), ("b", 3), ("c", 2)]:
        queued(journal, name, size)
    order: list[str] = []
    all_ran = asyncio.Event()

    async def run(job: Job, slot: Slot) -> None:
        await slot.acquire()
        order.append(job.rel_path)
        if len(order) == 3:
            all_ran.set()

    gov = Governor(DaemonSettings(workers=1), sampler=lambda: Sample(10_000, 0))
    pool = WorkerPool(journal, run, gov, lambda: ["in"])
    batcher = Batcher(journal, pool)
    server = asyncio.create_task(pool.serve())
    await asyncio.sleep(0)
    assert order == []  # queued, not yet released
    batcher.start(interval=0.05)
    try:
        async with asyncio.timeout(5):
            await all_ran.wait()
    finally:
        batcher.shutdown()
        server.cancel()
    assert order == ["b", "c", "a"]


async def test_a_batch_counts_its_files_and_bytes(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j.sqlite3")
    queued(journal, "a", 10)
    queued(journal, "b", 32)
    gov = Governor(DaemonSettings(workers=1), sampler=lambda: Sample(10_000, 0))

    async def run(job: Job, slot: Slot) -> None:
        await slot.acquire()
        return None

    batcher = Batcher(journal, WorkerPool(journal, run, gov, lambda: []))
    batch = await batcher.tick()
    assert batch is not None and (batch.files, batch.bytes) == (2, 42)
    assert await batcher.tick() is None  # nothing new since


async def test_queue_depth_gauge_returns_to_zero_when_the_queue_empties(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j.sqlite3")
    job = queued(journal, "gauge-a", 1)
    gov = Governor(DaemonSettings(workers=1), sampler=lambda: Sample(10_000, 0))

    async def run(job: Job, slot: Slot) -> None:
        await slot.acquire()
        return None

    batcher = Batcher(journal, WorkerPool(journal, run, gov, lambda: []))
    depth = metrics.QUEUE_DEPTH.labels(inbox="in")
    await batcher.tick()
    assert depth._value.get() == 1
    journal.finish(journal.destine(job, JobState.DUPLICATE, "/d/gauge-a", None))
    await batcher.tick()
    assert depth._value.get() == 0
