"""The bounded asyncio worker pool: priority order, admission by the governor, clean stops."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from traxd.logs import get_logger
from traxd.throttle import Governor

JobFn = Callable[[int], Coroutine[Any, Any, None]]
DoneFn = Callable[[int], None]


@dataclass(order=True)
class _Entry:
    priority: int
    neg_size: int
    seq: int
    job_id: int = field(compare=False)


class WorkerPool:
    """Runs submitted jobs, lowest priority value first and largest first within it.

    At most `governor.cap` jobs run at once, fewer while the governor holds admission.
    One job's failure or hang never touches another: each runs in its own task.
    """

    def __init__(self, run: JobFn, governor: Governor, on_done: DoneFn | None = None) -> None:
        self._run = run
        self._governor = governor
        self._on_done = on_done
        self._heap: list[_Entry] = []
        self._queued: set[int] = set()
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self.running: dict[int, asyncio.Task[None]] = {}
        self.accepting = True
        self._log = get_logger(component="pool")

    def __contains__(self, job_id: int) -> bool:
        return job_id in self._queued or job_id in self.running

    @property
    def queued(self) -> int:
        return len(self._queued)

    def submit(self, job_id: int, priority: int, size: int) -> bool:
        if not self.accepting or job_id in self:
            return False
        heapq.heappush(self._heap, _Entry(priority, -size, next(self._seq), job_id))
        self._queued.add(job_id)
        self._wake.set()
        return True

    def withdraw(self, job_ids: set[int]) -> None:
        """Drop queued (not running) jobs, e.g. of an inbox that was paused."""
        self._heap = [e for e in self._heap if e.job_id not in job_ids]
        heapq.heapify(self._heap)
        self._queued -= job_ids

    def poke(self) -> None:
        """Re-check admission (the governor's view changed)."""
        self._wake.set()

    async def serve(self) -> None:
        """Dispatch queued jobs as admission allows; runs until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._heap and self.accepting and self._governor.may_start(len(self.running)):
                entry = heapq.heappop(self._heap)
                self._queued.discard(entry.job_id)
                self._start(entry.job_id)

    def _start(self, job_id: int) -> None:
        task = asyncio.create_task(self._run(job_id), name=f"job-{job_id}")
        self.running[job_id] = task
        task.add_done_callback(lambda t: self._finished(job_id, t))

    def _finished(self, job_id: int, task: asyncio.Task[None]) -> None:
        self.running.pop(job_id, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("job_crashed", job_id=job_id, error=repr(exc))
        if self._on_done is not None:
            self._on_done(job_id)
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Take no more work; let running jobs finish for `grace` seconds, then cancel them."""
        self.accepting = False
        self.withdraw(set(self._queued))
        if self.running and grace > 0:
            await asyncio.wait(list(self.running.values()), timeout=grace)
        await self.cancel_all()

    async def cancel_all(self) -> None:
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
