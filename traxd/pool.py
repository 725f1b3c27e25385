"""The bounded asyncio worker pool: pulls jobs from the journal's ready set as slots free.

The order is the ready set's (inbox priority, then largest first); the pool keeps no queue
of its own. A job holds a slot from its claim to the end of its steps; moving its files
into place afterwards does not (that is batched bookkeeping, not work). At most `governor`
allows hold slots at once, fewer while it holds admission. One job's failure or hang never
touches another: each runs in its own task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Coroutine
from typing import Any

from traxd.journal import Job, Journal
from traxd.logs import get_logger
from traxd.throttle import Governor

Release = Callable[[], None]
JobFn = Callable[[Job, Release], Coroutine[Any, Any, None]]  # calls Release when its steps end
OpenInboxes = Callable[[], Collection[str]]


class WorkerPool:
    def __init__(self, journal: Journal, run: JobFn, governor: Governor,
                 open_inboxes: OpenInboxes) -> None:
        self._journal = journal
        self._run = run
        self._governor = governor
        self._open_inboxes = open_inboxes
        self._wake = asyncio.Event()
        self.running: dict[int, asyncio.Task[None]] = {}  # every job task, finishing included
        self.busy: set[int] = set()  # jobs holding a slot
        self.accepting = True
        self._log = get_logger(component="pool")

    def wake(self) -> None:
        """Look for work again (jobs were released, a slot or an inbox opened)."""
        self._wake.set()

    async def serve(self) -> None:
        """Start released jobs as admission allows; runs until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._fill()

    def _fill(self) -> None:
        if not self.accepting or not self._governor.may_start(len(self.busy)):
            return
        inboxes = self._open_inboxes()
        while self._governor.may_start(len(self.busy)):
            job = self._journal.next_ready(inboxes)
            if job is None:
                return
            self._start(job)

    def _start(self, job: Job) -> None:
        self.busy.add(job.id)
        task = asyncio.create_task(self._run(job, lambda: self._release(job.id)),
                                   name=f"job-{job.id}")
        self.running[job.id] = task
        task.add_done_callback(lambda t: self._finished(job.id, t))

    def _release(self, job_id: int) -> None:
        if job_id in self.busy:
            self.busy.discard(job_id)
            self._wake.set()

    def _finished(self, job_id: int, task: asyncio.Task[None]) -> None:
        self.running.pop(job_id, None)
        self.busy.discard(job_id)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("job_crashed", job_id=job_id, error=repr(exc), exc_info=exc)
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Take no more work; let running jobs finish for `grace` seconds, then cancel them."""
        self.accepting = False
        if self.running and grace > 0:
            await asyncio.wait(list(self.running.values()), timeout=grace)
        await self.cancel_all()

    async def cancel_all(self) -> None:
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
