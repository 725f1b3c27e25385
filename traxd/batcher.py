"""APScheduler ticks that release queued jobs to the pool in batches."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from traxd import metrics
from traxd.jobs import JobEnd
from traxd.journal import Job, JobState, Journal
from traxd.logs import get_logger
from traxd.pool import WorkerPool
from traxd.readyset import order_key

RELEASE_SLICE = 5000  # fresh jobs released between two turns of the event loop


def order_jobs(jobs: Iterable[Job]) -> list[Job]:
    """Jobs in the order they run (the ready set's order, for callers holding a list)."""
    return sorted(jobs, key=lambda j: order_key(j.priority, j.size, j.id))


def group_by_size(jobs: Sequence[Job], groups: int) -> list[list[Job]]:
    """Fixed groups of near-equal total size (greedy LPT), where a backend needs them."""
    bins: list[list[Job]] = [[] for _ in range(max(1, groups))]
    totals = [0] * len(bins)
    for job in order_jobs(jobs):
        smallest = totals.index(min(totals))
        bins[smallest].append(job)
        totals[smallest] += job.size
    return [b for b in bins if b]


@dataclass
class Batch:
    id: str
    job_ids: set[int]
    files: int
    bytes: int
    started: float = field(default_factory=time.monotonic)
    outcomes: dict[str, int] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    wall_seconds: float = 0.0  # set when its last job ends
    ends: list[JobEnd] = field(default_factory=list)  # its jobs that reached an end

    @property
    def finished(self) -> int:
        return sum(self.outcomes.values())


def _ignore(_: Batch) -> None:
    return None


class Batcher:
    """Every `batch_interval`, releases the jobs queued since the last tick (and retries now
    due) to the pool as one batch, and wakes the pool."""

    def __init__(self, journal: Journal, pool: WorkerPool,
                 clock: Callable[[], float] = time.time) -> None:
        self.journal = journal
        self.pool = pool
        self.clock = clock
        self.scheduler = AsyncIOScheduler()
        self._batch_of: dict[int, Batch] = {}
        self._gauged: set[str] = set()
        self._log = get_logger(component="batcher")
        self.on_finished: Callable[[Batch], None] = _ignore  # reports, notifications
        self._loose: list[JobEnd] = []

    def start(self, interval: float) -> None:
        self.scheduler.add_job(self.tick, IntervalTrigger(seconds=interval), id="batch",
                               next_run_time=datetime.now() + timedelta(milliseconds=10),
                               max_instances=1, coalesce=True, misfire_grace_time=None)
        self.scheduler.start()

    def reschedule(self, interval: float) -> None:
        self.scheduler.reschedule_job("batch", trigger=IntervalTrigger(seconds=interval))

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    async def tick(self) -> Batch | None:
        now, ready = self.clock(), self.journal.ready
        released = ready.release(now, RELEASE_SLICE)
        while ready.waiting:  # a whole archive at once: let the loop breathe between slices
            await asyncio.sleep(0)
            released += ready.release(now, RELEASE_SLICE)
        self.publish_depth()
        self.pool.wake()
        # Duplicates end at intake, never in the pool: they join the batch formed next.
        loose, self._loose = self._loose, []
        if not released and not loose:
            return None
        size = -sum(entry.neg_size for entry in released) + sum(e.size for e in loose)
        batch = Batch(uuid.uuid4().hex[:12], {e.job_id for e in released},
                      len(released) + len(loose), size, ends=loose)
        if loose:
            batch.outcomes["duplicate"] = len(loose)
        for job_id in batch.job_ids:
            self._batch_of[job_id] = batch
        self._log.info("batch_formed", batch_id=batch.id, files=batch.files, bytes=batch.bytes)
        if not released:
            self._finish(batch)
        return batch

    def job_finished(self, job_id: int, outcome: str) -> None:
        """Count an outcome; log the batch summary when its last job ends."""
        batch = self._batch_of.pop(job_id, None)
        if batch is None:
            return
        batch.outcomes[outcome] = batch.outcomes.get(outcome, 0) + 1
        if batch.finished == batch.files:
            self._finish(batch)

    def _finish(self, batch: Batch) -> None:
        wall = batch.wall_seconds = round(time.monotonic() - batch.started, 3)
        self._log.info("batch_finished", batch_id=batch.id, files=batch.files,
                       bytes=batch.bytes, wall_seconds=wall, **batch.outcomes)
        try:
            self.on_finished(batch)
        except Exception:  # a listener's bug never stops the batcher
            self._log.exception("batch_listener_failed", batch_id=batch.id)

    def job_ended(self, end: JobEnd) -> None:
        """Keep what a batch's job ended with (before `job_finished` counts it); a
        duplicate found at intake waits for the next batch."""
        batch = self._batch_of.get(end.job_id)
        if batch is not None:
            batch.ends.append(end)
        elif end.outcome == "duplicate":
            self._loose.append(end)

    def publish_depth(self) -> None:
        """Queue and in-progress gauges from the journal's counters (no query)."""
        self._gauged.update(inbox for inbox, _ in self.journal.counts)
        for inbox in self._gauged:
            metrics.QUEUE_DEPTH.labels(inbox=inbox).set(
                self.journal.count(inbox, JobState.QUEUED))
            metrics.JOBS_IN_PROGRESS.labels(inbox=inbox).set(
                self.journal.count(inbox, JobState.RUNNING))
