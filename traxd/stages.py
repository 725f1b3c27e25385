"""Claim and finish, batched: the jobs that reach one at the same moment share its work.

A claim batch: names chosen in a thread, the journal written and committed once, the renames
done in a thread with one fsync per folder. A finish batch: outputs planned, written down,
published; then the originals' destinations planned, written down, and the moves made. The
journal always records a move before the move happens.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from traxd import metrics
from traxd.coalesce import Coalescer
from traxd.journal import Job, JobState, Journal
from traxd.logs import get_logger
from traxd.moves import ClaimPlan, Ending, Mover
from traxd.pipeline.base import BESIDE

SidecarFn = Callable[[Job], bytes]
Result = Job | None | BaseException


class ClaimStage:
    """`await claim(job)`: the job running with its file in processing/, or None when the
    file changed since it settled (it is watched again)."""

    def __init__(self, journal: Journal, mover: Mover) -> None:
        self.journal, self.mover = journal, mover
        self._batches: Coalescer[Job, Job | None] = Coalescer(self._handle)

    async def claim(self, job: Job) -> Job | None:
        return await self._batches.submit(job)

    async def _handle(self, jobs: Sequence[Job]) -> list[Result]:
        plans = await asyncio.to_thread(self.mover.plan_claims, jobs)
        results: list[Result] = []
        moving: list[tuple[int, ClaimPlan]] = []
        for plan in plans:
            if plan.problem is not None:
                results.append(plan.problem)
            elif plan.changed:
                self.journal.unsettle(plan.job)
                results.append(None)
            else:
                assert plan.dest is not None
                results.append(self.journal.start(plan.job, str(plan.dest)))
                moving.append((len(results) - 1, plan))
        await self.journal.durable()
        errors = await asyncio.to_thread(self.mover.claim, [plan for _, plan in moving])
        for (index, _), error in zip(moving, errors, strict=True):
            if error is not None:
                results[index] = error
        return results

    async def close(self) -> None:
        await self._batches.close()


class FinishStage:
    """`await finish(ending)`: the job ended as its outcome, the original moved; for a
    partial ending, its outputs so far published and the job still running."""

    def __init__(self, journal: Journal, mover: Mover, sidecar: SidecarFn) -> None:
        self.journal, self.mover, self.sidecar = journal, mover, sidecar
        self._batches: Coalescer[Ending, Job] = Coalescer(self._handle)

    async def finish(self, ending: Ending) -> Job:
        return await self._batches.submit(ending)

    async def _handle(self, endings: Sequence[Ending]) -> list[Job | BaseException]:
        results: list[Job | BaseException | None] = [None] * len(endings)
        current = [_current(e, self.journal) for e in endings]
        open_ = [i for i, e in enumerate(current) if e.job.final_path is None]
        todo = [i for i in open_ if not current[i].partial]
        publishing = [i for i in open_ if current[i].outcome in (JobState.DONE, JobState.DUPLICATE)
                      and (current[i].artifacts or current[i].spawn)]
        unplanned = [i for i in publishing if not _planned(current[i])]
        plans, finals = await asyncio.to_thread(
            self.mover.plan_endings, [current[i] for i in unplanned], [current[i] for i in todo])
        if unplanned:
            await self._record_outputs([current[i] for i in unplanned], plans)
            current = [_current(e, self.journal) for e in current]
        if publishing:
            errors = await asyncio.to_thread(self.mover.publish, [current[i] for i in publishing])
            for index, error in zip(publishing, errors, strict=True):
                results[index] = error
        for i in open_:
            if current[i].partial and results[i] is None:  # published; the job goes on
                results[i] = current[i].job
        await self._destine([(current[i], f) for i, f in zip(todo, finals, strict=True)
                             if results[i] is None])
        live = [i for i in range(len(current)) if results[i] is None]
        await self._place([_current(current[i], self.journal) for i in live], live, results)
        return [r if r is not None else RuntimeError("not finished") for r in results]

    async def _record_outputs(self, endings: list[Ending], plans: list[dict[str, str]]) -> None:
        """Where each output goes, written down before anything is copied there."""
        for ending, plan in zip(endings, plans, strict=True):
            self.journal.plan_outputs(ending.job, plan)
        await self.journal.durable()

    async def _destine(self, endings: list[tuple[Ending, Path]]) -> None:
        """Where each original goes, written down before it moves."""
        for ending, final in endings:
            self.journal.destine(ending.job, ending.outcome, str(final), ending.error)
        if endings:
            await self.journal.durable()

    async def _place(self, endings: list[Ending], where: list[int],
                     results: list[Job | BaseException | None]) -> None:
        sidecars = [self.sidecar(e.job) if e.outcome is JobState.FAILED else None
                    for e in endings]
        errors = await asyncio.to_thread(self.mover.place, endings, sidecars)
        for k, error in enumerate(errors):
            results[where[k]] = error if error is not None else self._finished(endings[k].job)

    def _finished(self, job: Job) -> Job:
        job = self.journal.finish(job)
        metrics.JOBS_COMPLETED.labels(inbox=job.inbox, outcome=job.state.value).inc()
        # A failure was logged, with its reason, when it happened; here only where it went.
        event = "failed_file_placed" if job.state is JobState.FAILED else f"job_{job.state.value}"
        get_logger(inbox=job.inbox, file=job.rel_path, job_id=job.id).info(
            event, moved_to=job.final_path)
        return job

    async def close(self) -> None:
        await self._batches.close()


def _current(ending: Ending, journal: Journal) -> Ending:
    """The ending with the job as the journal has it now."""
    job = journal.get(ending.job.id)
    if job is ending.job:
        return ending
    return dataclasses.replace(ending, job=job)


def _planned(ending: Ending) -> bool:
    """Whether the journal names a destination for each output the ending brings (a plan
    made before a restart, or outputs published before a later step ran)."""
    planned = ending.job.outputs
    if planned is None:
        return False
    wanted = set(ending.sources())
    if ending.partial:
        wanted = {key for key in wanted if not key.startswith(BESIDE)}
    return wanted <= planned.keys()

