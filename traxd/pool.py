"""The bounded asyncio worker pool: pulls jobs from the journal's ready set as slots free.

The order is the ready set's (inbox priority, then largest first); the pool keeps no queue
of its own. A job holds a slot while its steps run. Its claim happens just before, while
the previous job still holds the slot, and moving its files into place afterwards does not
hold one: both are batched bookkeeping, not work. How far ahead jobs are claimed follows
how fast slots turn over (`Turnover`): AHEAD_PER_SLOT per slot for steps of seconds or
more, enough to cover CLAIM_HORIZON of work for steps of milliseconds, so that a claim batch
(one commit, one fsync per folder) serves many jobs. At most `governor` allows hold slots
at once, fewer while it holds admission. One job's failure or hang never touches another:
each runs in its own task.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Coroutine
from typing import Any

from traxd.coalesce import MAX_BATCH
from traxd.journal import Job, Journal
from traxd.logs import get_logger
from traxd.throttle import Governor

OpenInboxes = Callable[[], Collection[str]]
AHEAD_PER_SLOT = 2  # jobs claimed ahead per slot, at the least
CLAIM_HORIZON = 0.25  # seconds of work claimed ahead when steps are short
MAX_AHEAD = MAX_BATCH  # a claim batch's most


class Turnover:
    """How many slots are granted per second, over the last `window` seconds: the pool
    claims ahead what that rate uses up in CLAIM_HORIZON. Pure: the clock is passed in."""

    def __init__(self, window: float = 1.0) -> None:
        self._window = window
        self._grants: deque[float] = deque()

    def granted(self, now: float) -> None:
        self._grants.append(now)
        self._trim(now)

    def rate(self, now: float) -> float:
        self._trim(now)
        return len(self._grants) / self._window

    def ahead(self, slots: int, now: float) -> int:
        """How many jobs to hold claimed ahead of `slots` slots."""
        wanted = math.ceil(self.rate(now) * CLAIM_HORIZON)
        return min(MAX_AHEAD, max(AHEAD_PER_SLOT * slots, wanted))

    def _trim(self, now: float) -> None:
        horizon = now - self._window
        while self._grants and self._grants[0] < horizon:
            self._grants.popleft()


class Slot:
    """A job's place in the pool: `await acquire()` before its steps, `release()` after."""

    def __init__(self, pool: WorkerPool, job_id: int) -> None:
        self._pool, self._job_id = pool, job_id

    async def acquire(self) -> None:
        await self._pool._acquire(self._job_id)

    def release(self) -> None:
        self._pool._release(self._job_id)


JobFn = Callable[[Job, Slot], Coroutine[Any, Any, None]]


class WorkerPool:
    def __init__(self, journal: Journal, run: JobFn, governor: Governor,
                 open_inboxes: OpenInboxes, clock: Callable[[], float] = time.monotonic) -> None:
        self._journal = journal
        self._run = run
        self._governor = governor
        self._open_inboxes = open_inboxes
        self._wake = asyncio.Event()
        self.running: dict[int, asyncio.Task[None]] = {}  # every job task, finishing included
        self.busy: set[int] = set()  # jobs holding a slot
        self.ahead: set[int] = set()  # jobs started that do not hold a slot yet
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()
        self.accepting = True
        self._clock = clock
        self.turnover = Turnover()
        self._log = get_logger(component="pool")

    def wake(self) -> None:
        """Look for work again (jobs were released, a slot or an inbox opened)."""
        self._wake.set()

    async def serve(self) -> None:
        """Start released jobs as admission allows; runs until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._grant()
            self._fill()

    def _fill(self) -> None:
        slots = self._governor.current.allowed
        room = self.turnover.ahead(slots, self._clock()) - len(self.ahead)
        if not self.accepting or room <= 0:
            return
        inboxes = self._open_inboxes()
        for _ in range(room):
            job = self._journal.next_ready(inboxes)
            if job is None:
                return
            self._start(job)

    def _start(self, job: Job) -> None:
        self.ahead.add(job.id)
        task = asyncio.create_task(self._run(job, Slot(self, job.id)), name=f"job-{job.id}")
        self.running[job.id] = task
        task.add_done_callback(lambda t: self._finished(job.id, t))

    async def _acquire(self, job_id: int) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((job_id, future))
        self._grant()
        await future

    def _grant(self) -> None:
        """Hand free slots to the jobs waiting for one, first come first served."""
        while self.accepting and self._waiting and self._governor.may_start(len(self.busy)):
            job_id, future = self._waiting.popleft()
            if future.done():  # its job was cancelled while it waited
                continue
            self.ahead.discard(job_id)
            self.busy.add(job_id)
            self.turnover.granted(self._clock())
            future.set_result(None)
            self._wake.set()  # one more may be claimed ahead

    def _release(self, job_id: int) -> None:
        self.ahead.discard(job_id)
        if job_id in self.busy:
            self.busy.discard(job_id)
        self._wake.set()

    def _finished(self, job_id: int, task: asyncio.Task[None]) -> None:
        self.running.pop(job_id, None)
        self._release(job_id)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("job_crashed", job_id=job_id, error=repr(exc), exc_info=exc)

    async def stop(self, grace: float) -> None:
        """Take no more work; let running jobs finish for `grace` seconds, then cancel them.
        Jobs claimed ahead that hold no slot yet go back at once (they resume at the next
        start, from processing/)."""
        self.accepting = False
        for job_id in list(self.ahead):
            if (task := self.running.get(job_id)) is not None:
                task.cancel()
        if self.running and grace > 0:
            await asyncio.wait(list(self.running.values()), timeout=grace)
        await self.cancel_all()

    async def cancel_all(self) -> None:
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
