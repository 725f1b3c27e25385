"""Batcher: LPT order, size-balanced groups, and the APScheduler tick feeding the pool."""

from __future__ import annotations

import asyncio
from pathlib import Path

from traxd import metrics
from traxd.batcher import Batcher, group_by_size, order_jobs
from traxd.config import DaemonSettings
from traxd.journal import Job, JobState, Journal
from traxd.pool import WorkerPool
from traxd.throttle import Governor, Sample


def queued(journal: Journal, name: str, size: int, priority: int = 5) -> Job:
    job = journal.add_seen("in", name, size, 0, priority, now=1.0)
    return journal.update(job.id, 1.0, state=JobState.QUEUED)


def test_order_and_groups(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j.sqlite3")
    jobs = [queued(journal, f"f{n}", size) for n, size in enumerate([7, 5, 4, 3, 3, 2])]
    assert [j.size for j in order_jobs(jobs)] == [7, 5, 4, 3, 3, 2]
    groups = group_by_size(jobs, 2)
    assert sorted(sum(j.size for j in g) for g in groups) == [12, 12]


async def test_tick_hands_ready_jobs_of_open_inboxes_to_the_pool(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j.sqlite3")
    for name, size in [("a", 1), ("b", 3), ("c", 2)]:
        queued(journal, name, size)
    order: list[str] = []
    all_ran = asyncio.Event()

    async def run(job_id: int) -> None:
        order.append(journal.get(job_id).rel_path)
        if len(order) == 3:
            all_ran.set()

    gov = Governor(DaemonSettings(workers=1), sampler=lambda: Sample(10_000, 0))
    pool = WorkerPool(run, gov)
    closed = Batcher(journal, pool, open_inboxes=lambda now: [])
    assert await closed.tick() is None

    batcher = Batcher(journal, pool, open_inboxes=lambda now: ["in"])
    server = asyncio.create_task(pool.serve())
    batcher.start(interval=0.05)
    try:
        async with asyncio.timeout(5):
            await all_ran.wait()
    finally:
        batcher.shutdown()
        server.cancel()
    assert order == ["b", "c", "a"]


async def test_queue_depth_gauge_returns_to_zero_when_the_queue_empties(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j.sqlite3")
    job = queued(journal, "gauge-a", 1)
    gov = Governor(DaemonSettings(workers=1), sampler=lambda: Sample(10_000, 0))

    async def run(job_id: int) -> None:
        return None

    batcher = Batcher(journal, WorkerPool(run, gov), open_inboxes=lambda now: [])
    depth = metrics.QUEUE_DEPTH.labels(inbox="in")
    await batcher.tick()
    assert depth._value.get() == 1
    journal.update(job.id, 2.0, state=JobState.DONE)
    await batcher.tick()
    assert depth._value.get() == 0
