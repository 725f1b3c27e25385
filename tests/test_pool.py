"""Pool: priority order, the concurrency cap, isolation of failures, stopping."""

from __future__ import annotations

import asyncio

from traxd.config import DaemonSettings
from traxd.pool import WorkerPool
from traxd.throttle import Admission, Governor, Sample

ROOMY = Sample(available_mb=10_000, cpu_percent=0.0)


def governor(workers: int, sample: Sample = ROOMY) -> Governor:
    return Governor(DaemonSettings(workers=workers), sampler=lambda: sample)


async def test_jobs_start_in_priority_then_size_order() -> None:
    started: list[int] = []
    all_done = asyncio.Event()

    async def run(job_id: int) -> None:
        started.append(job_id)
        if len(started) == 4:
            all_done.set()

    pool = WorkerPool(run, governor(1))
    for job_id, priority, size in [(1, 5, 10), (2, 5, 900), (3, 1, 1), (4, 5, 50)]:
        pool.submit(job_id, priority, size)
    server = asyncio.create_task(pool.serve())
    async with asyncio.timeout(5):
        await all_done.wait()
    server.cancel()
    assert started == [3, 2, 4, 1]


async def test_never_more_than_the_cap_at_once() -> None:
    running, peak = 0, 0
    release = asyncio.Event()
    finished = asyncio.Semaphore(0)

    async def run(job_id: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        finished.release()

    pool = WorkerPool(run, governor(3))
    for job_id in range(10):
        pool.submit(job_id, 0, 0)
    server = asyncio.create_task(pool.serve())
    async with asyncio.timeout(5):
        while running < 3:
            await asyncio.sleep(0)
        release.set()
        for _ in range(10):
            await finished.acquire()
    server.cancel()
    assert peak == 3


async def test_a_failing_or_hanging_job_does_not_touch_the_others() -> None:
    done: list[int] = []
    hang = asyncio.Event()

    async def run(job_id: int) -> None:
        if job_id == 1:
            raise RuntimeError("boom")
        if job_id == 2:
            await hang.wait()
        done.append(job_id)

    pool = WorkerPool(run, governor(4))
    for job_id in (1, 2, 3, 4):
        pool.submit(job_id, 0, 0)
    server = asyncio.create_task(pool.serve())
    async with asyncio.timeout(5):
        while sorted(done) != [3, 4] or len(pool.running) > 1:
            await asyncio.sleep(0)
    assert list(pool.running) == [2]
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
