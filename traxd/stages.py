"""Claim and finish, batched: the jobs that reach one at the same moment share its work.

A claim batch: names chosen in a thread, the journal written and committed once, the renames
done in a thread with one fsync per folder. A finish batch: outputs planned, written down,
published; then the originals' destinations planned, written down, and the moves made. The
journal always records a move before the move happens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from traxd import metrics
from traxd.coalesce import Coalescer
from traxd.journal import Job, JobState, Journal
from traxd.logs import get_logger
from traxd.moves import ClaimPlan, Ending, Mover

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
    """`await finish(ending)`: the job ended as its outcome, the original moved."""

    def __init__(self, journal: Journal, mover: Mover, sidecar: SidecarFn) -> None:
        self.journal, self.mover, self.sidecar = journal, mover, sidecar
        self._batches: Coalescer[Ending, Job] = Coalescer(self._handle)

    async def finish(self, ending: Ending) -> Job:
        return await self._batches.submit(ending)

    async def _handle(self, endings: Sequence[Ending]) -> list[Job | BaseException]:
        results: list[Job | BaseException | None] = [None] * len(endings)
        endings = await self._publish(list(endings), results)
        live = [(i, e) for i, e in enumerate(endings) if results[i] is None]
        await self._place([e for _, e in live], [i for i, _ in live], results)
        return [r if r is not None else RuntimeError("not finished") for r in results]

    async def _publish(self, endings: list[Ending], results: list[Job | BaseException | None]
                       ) -> list[Ending]:
        """Outputs of jobs done: planned (unless a repeat), written down, then copied."""
        fresh = [i for i, e in enumerate(endings)
                 if e.outcome is JobState.DONE and e.job.final_path is None]
        unplanned = [i for i in fresh if self.journal.get(endings[i].job.id).outputs is None]
        plans = await asyncio.to_thread(self.mover.plan_outputs, [endings[i] for i in unplanned])
        for index, plan in zip(unplanned, plans, strict=True):
            self.journal.plan_outputs(endings[index].job, plan)
        endings = [_current(e, self.journal) for e in endings]
        if unplanned:
            await self.journal.durable()
        errors = await asyncio.to_thread(self.mover.publish, [endings[i] for i in fresh])
        for index, error in zip(fresh, errors, strict=True):
            results[index] = error
        return endings

    async def _place(self, endings: list[Ending], where: list[int],
                     results: list[Job | BaseException | None]) -> None:
        """Destinations chosen (unless a repeat), written down, then the originals moved."""
        new = [k for k, e in enumerate(endings) if e.job.final_path is None]
        finals = await asyncio.to_thread(self.mover.plan_finals, [endings[k] for k in new])
        for k, final in zip(new, finals, strict=True):
            e = endings[k]
            self.journal.destine(e.job, e.outcome, str(final), e.error)
        endings = [_current(e, self.journal) for e in endings]
        if new:
            await self.journal.durable()
        sidecars = [self.sidecar(e.job) if e.outcome is JobState.FAILED else None
                    for e in endings]
        errors = await asyncio.to_thread(self.mover.place, endings, sidecars)
        for k, error in enumerate(errors):
            results[where[k]] = error if error is not None else self._finished(endings[k].job)

    def _finished(self, job: Job) -> Job:
        job = self.journal.finish(job)
        metrics.JOBS_COMPLETED.labels(inbox=job.inbox, outcome=job.state.value).inc()
        get_logger(inbox=job.inbox, file=job.rel_path, job_id=job.id).info(
            "job_" + job.state.value, moved_to=job.final_path)
        return job

    async def close(self) -> None:
        await self._batches.close()


def _current(ending: Ending, journal: Journal) -> Ending:
    """The ending with the job as the journal has it now."""
    job = journal.get(ending.job.id)
    if job is ending.job:
        return ending
    return Ending(job, ending.outcome, ending.error, ending.artifacts, ending.spawn,
                  ending.workdir)

