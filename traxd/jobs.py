"""Running one job: claim, steps with checkpoints, publish outputs, move the original.

Every move is prepared in the journal before it happens (the destination is written
first), so that `finalize` and `claim` can be repeated after a crash at any point and end
in the same place: one set of outputs, the original in exactly one folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any

from structlog.typing import FilteringBoundLogger

from traxd import metrics
from traxd.config import InboxSettings, Settings, StepSpec
from traxd.errors import (
    BackendFatal,
    Category,
    Permanent,
    Retry,
    StepTimeout,
    classify_exception,
    compute_backoff,
)
from traxd.folders import (
    InboxFolders,
    copy_atomic,
    describe_unprocessable,
    move,
    remove_empty_parents,
    sidecar_path,
    unique_path,
    write_atomic,
)
from traxd.journal import Job, JobState, Journal
from traxd.logs import get_logger, redact_text
from traxd.pipeline.base import JobInfo, StepContext, StepResult
from traxd.pipeline.registry import StepRegistry, step_label
from traxd.procs import ProcessLimits

SPAWN_PREFIX = "spawn:"


class Outcome(str, Enum):
    DONE = "done"
    FAILED = "failed"
    DUPLICATE = "duplicate"
    RETRY = "retry"  # back to queued, after a back-off
    WAITING = "waiting"  # its backend is paused
    INTERRUPTED = "interrupted"  # shutdown: back to queued, resumes where it stopped
    CHANGED = "changed"  # the file changed since it settled: watched again


class BackendGate:
    """Backends paused by a fatal error, with the reason; jobs needing them wait."""

    def __init__(self) -> None:
        self.paused: dict[str, str] = {}

    def pause(self, backend: str, reason: str) -> None:
        self.paused[backend] = reason
        metrics.BACKEND_PAUSED.labels(backend=backend).set(1)

    def resume(self, backend: str | None = None) -> list[str]:
        names = [name for name in self.paused if backend in (None, name)]
        for name in names:
            del self.paused[name]
            metrics.BACKEND_PAUSED.labels(backend=name).set(0)
        return names


@dataclass
class Progress:
    """What a running job is doing, for `traxd status`."""

    step: str = "claim"
    fraction: float = 0.0
    started: float = field(default_factory=time.time)


@dataclass
class PipelineState:
    """The result of the steps so far; saved after each step so a restart resumes there."""

    media: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    spawn: list[str] = field(default_factory=list)
    finished: bool = False

    def merge(self, result: StepResult) -> None:
        self.media = str(result.media) if result.media is not None else self.media
        self.facts.update(result.facts)
        self.artifacts.update({name: str(path) for name, path in result.artifacts.items()})
        self.spawn.extend(str(path) for path in result.spawn)
        self.finished = self.finished or result.finish


class JobRunner:
    def __init__(self, settings: Settings, journal: Journal, steps: StepRegistry,
                 gate: BackendGate, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.journal = journal
        self.steps = steps
        self.gate = gate
        self.clock = clock
        self.folders = {i.name: InboxFolders.of(i, settings.folders) for i in settings.inboxes}
        self.progress: dict[int, Progress] = {}

    @property
    def work_root(self) -> Path:
        return self.settings.daemon.state_dir / "work"

    def inbox(self, name: str) -> InboxSettings:
        return self.settings.inbox(name)

    # --- the whole job ----------------------------------------------------------------------

    async def run(self, job_id: int) -> Outcome:
        job = self.journal.get(job_id)
        log = get_logger(inbox=job.inbox, file=job.rel_path, job_id=job.id)
        if job.final_path is not None:
            return await asyncio.to_thread(self._finalize_again, job, log)
        self.progress[job_id] = progress = Progress()
        try:
            return await self._run(job, progress, log)
        except asyncio.CancelledError:
            await asyncio.shield(asyncio.to_thread(self._interrupt, job_id, log))
            raise
        except Exception as exc:
            log.exception("job_error", error=repr(exc))
            return self._retry(self.journal.get(job_id), exc, error_info(
                job, exc, classify_exception(exc), progress.step, self.clock()), progress.step, log)
        finally:
            self.progress.pop(job_id, None)

    async def _run(self, job: Job, progress: Progress, log: FilteringBoundLogger) -> Outcome:
        started = self.clock()
        try:
            claimed = await asyncio.to_thread(self.claim, job, log)
            if claimed is None:
                return Outcome.CHANGED
            job = self.journal.update(claimed.id, self.clock(), state=JobState.RUNNING,
                                      started=claimed.started or started)
            log.info("job_started", attempt=job.attempts + 1, step_index=job.step)
            state = await self.run_steps(job, progress, log)
            progress.step = "publish"
            await asyncio.to_thread(self.publish, job, state)
        except Exception as exc:
            return await asyncio.to_thread(self.handle_error, job, exc, progress.step, log)
        done = await asyncio.to_thread(self.finish, job, JobState.DONE, None, log)
        self._count_done(done, state, self.clock() - started)
        return Outcome.DONE

    # --- claim ------------------------------------------------------------------------------

    def source(self, job: Job) -> Path:
        if job.claimed_path is not None:
            return Path(job.claimed_path)
        return self.folders[job.inbox].inbox / job.rel_path

    def claim(self, job: Job, log: FilteringBoundLogger) -> Job | None:
        """Rename the file into processing/ (repeatable); None when it changed since it settled."""
        folders = self.folders[job.inbox]
        if job.claimed_path is not None:
            claimed, original = Path(job.claimed_path), folders.inbox / job.rel_path
            if not os.path.lexists(claimed) and os.path.lexists(original):
                move(original, claimed)
            return job
        src = folders.inbox / job.rel_path
        if (reason := describe_unprocessable(src)) is not None:
            raise Permanent(reason, reason="input")
        info = src.stat()
        if (info.st_size, info.st_mtime_ns) != (job.size, job.mtime_ns):
            log.info("file_changed_while_queued")
            self.journal.update(job.id, self.clock(), state=JobState.SEEN)
            return None
        dest = unique_path(folders.processing, job.rel_path)
        job = self.journal.update(job.id, self.clock(), claimed_path=str(dest))
        move(src, dest)
        remove_empty_parents(src, folders.inbox)
        log.debug("claimed", processing=str(dest))
        return job

    # --- steps ------------------------------------------------------------------------------

    async def run_steps(self, job: Job, progress: Progress,
                        log: FilteringBoundLogger) -> PipelineState:
        pipeline = self.inbox(job.inbox).pipeline
        state = self._load_state(job)
        for index in range(job.step, len(pipeline)):
            if state.finished:
                break
            spec = pipeline[index]
            progress.step, progress.fraction = step_label(spec), 0.0
            result = await self._run_step(job, index, spec, state, progress, log)
            state.merge(result)
            await asyncio.to_thread(self._save_state, job, state)
            job = self.journal.update(job.id, self.clock(), step=index + 1, attempts=0)
        return state

    async def _run_step(self, job: Job, index: int, spec: StepSpec, state: PipelineState,
                        progress: Progress, log: FilteringBoundLogger) -> StepResult:
        label = step_label(spec)
        step_log = log.bind(step=label)
        ctx = self._context(job, index, label, state, progress, step_log)
        started = time.monotonic()
        step_log.info("step_started")
        try:
            async with asyncio.timeout(self.settings.daemon.step_timeout):
                result = await self.steps.get(spec).run(ctx)
        except TimeoutError as exc:
            raise StepTimeout(f"{label} ran past step_timeout", reason="timeout") from exc
        elapsed = time.monotonic() - started
        metrics.STEP_DURATION.labels(step=label).observe(elapsed)
        result.facts.setdefault("timings", {**state.facts.get("timings", {}), label: elapsed})
        step_log.info("step_done", seconds=round(elapsed, 3))
        return result

    def _context(self, job: Job, index: int, label: str, state: PipelineState,
                 progress: Progress, log: FilteringBoundLogger) -> StepContext:
        workdir = self._job_dir(job.id) / f"{index}-{label}"
        if workdir.exists():
            shutil.rmtree(workdir)  # left by an attempt that did not finish
        workdir.mkdir(parents=True)
        source = Path(job.claimed_path or "")
        daemon = self.settings.daemon

        def report(fraction: float) -> None:
            progress.fraction = max(0.0, min(1.0, fraction))

        return StepContext(
            job=JobInfo(job.id, job.inbox, job.rel_path, job.sha256 or "", job.size),
            input=Path(state.media) if state.media else source, source=source,
            workdir=workdir, facts=dict(state.facts),
            artifacts={name: Path(p) for name, p in state.artifacts.items()},
            settings=self.settings, formats=self.inbox(job.inbox).formats,
            limits=ProcessLimits(daemon.step_timeout, daemon.stall_seconds,
                                 daemon.memory_limit_mb),
            log=log, progress=report,
        )

    def _job_dir(self, job_id: int) -> Path:
        return self.work_root / str(job_id)

    def _load_state(self, job: Job) -> PipelineState:
        path = self._job_dir(job.id) / "state.json"
        if job.step == 0 or not path.exists():
            return PipelineState()
        return PipelineState(**json.loads(path.read_text()))

    def _save_state(self, job: Job, state: PipelineState) -> None:
        write_atomic(self._job_dir(job.id) / "state.json",
                     json.dumps(state.__dict__, sort_keys=True).encode())

    # --- outputs ----------------------------------------------------------------------------

    def publish(self, job: Job, state: PipelineState) -> None:
        """Copy every artifact into outputs/ (and spawned files into the inbox), atomically.

        Destinations are chosen once and kept in the journal, so a repeat after a crash
        rewrites the same files instead of adding numbered copies.
        """
        plan = job.outputs
        if plan is None:
            plan = self._plan_outputs(job, state)
            self.journal.update(job.id, self.clock(), outputs=plan)
        sources = {**state.artifacts,
                   **{SPAWN_PREFIX + str(i): p for i, p in enumerate(state.spawn)}}
        for key, dest in plan.items():
            copy_atomic(Path(sources[key]), Path(dest))

    def _plan_outputs(self, job: Job, state: PipelineState) -> dict[str, str]:
        folders = self.folders[job.inbox]
        subdir = PurePosixPath(job.rel_path).parent
        taken: set[Path] = set()
        plan: dict[str, str] = {}
        for name in sorted(state.artifacts):
            dest = unique_path(folders.outputs, str(subdir / name), taken)
            taken.add(dest)
            plan[name] = str(dest)
        for index, spawned in enumerate(state.spawn):
            dest = unique_path(folders.inbox, str(subdir / Path(spawned).name), taken)
            taken.add(dest)
            plan[SPAWN_PREFIX + str(index)] = str(dest)
        return plan

    # --- the end of a job -------------------------------------------------------------------

    def finish(self, job: Job, outcome: JobState, error: dict[str, Any] | None,
               log: FilteringBoundLogger) -> Job:
        """Choose where the original goes, write that down, then move it there."""
        final = self.destination(job, outcome)
        job = self.journal.update(job.id, self.clock(), final_path=str(final), outcome=outcome,
                                  error=error)
        if outcome is JobState.FAILED:
            self._withdraw_outputs(job)
        return self.finalize(job, log)

    def _withdraw_outputs(self, job: Job) -> None:
        """A file that failed keeps no outputs: remove any that a cut-short publish wrote."""
        for key, dest in (job.outputs or {}).items():
            if not key.startswith(SPAWN_PREFIX):
                Path(dest).unlink(missing_ok=True)

    def destination(self, job: Job, outcome: JobState) -> Path:
        folders = self.folders[job.inbox]
        base = folders.failed if outcome is JobState.FAILED else folders.done
        return unique_path(base, job.rel_path)

    def finalize(self, job: Job, log: FilteringBoundLogger) -> Job:
        """Complete a prepared move; safe to repeat at any point after a crash."""
        assert job.final_path is not None and job.outcome is not None
        outcome = JobState(job.outcome)
        self.place_original(job, Path(job.final_path), outcome)
        job = self.journal.update(job.id, self.clock(), state=outcome, finished=self.clock())
        shutil.rmtree(self._job_dir(job.id), ignore_errors=True)
        metrics.JOBS_COMPLETED.labels(inbox=job.inbox, outcome=outcome.value).inc()
        log.info("job_" + outcome.value, moved_to=job.final_path)
        return job

    def place_original(self, job: Job, final: Path, outcome: JobState) -> None:
        """Move the original to final (and its error sidecar beside it on failure)."""
        if outcome is JobState.FAILED:
            write_atomic(sidecar_path(final), sidecar(job))
        src = self.source(job)
        if os.path.lexists(src) and not os.path.lexists(final):
            move(src, final)
            folders = self.folders[job.inbox]
            remove_empty_parents(src, folders.processing if job.claimed_path else folders.inbox)

    def _finalize_again(self, job: Job, log: FilteringBoundLogger) -> Outcome:
        """Complete a move prepared before a crash; if it fails again, try later."""
        try:
            return Outcome(self.finalize(job, log).state.value)
        except OSError as exc:
            delay = compute_backoff(job.attempts + 1, factor=self.settings.daemon.retry_backoff,
                                    max_backoff=self.settings.daemon.retry_backoff_max)
            self.journal.update(job.id, self.clock(), attempts=job.attempts + 1,
                                not_before=self.clock() + delay)
            log.error("finalize_failed", error=str(exc), retry_in=round(delay, 1))
            return Outcome.RETRY

    def _count_done(self, job: Job, state: PipelineState, seconds: float) -> None:
        metrics.JOB_DURATION.labels(inbox=job.inbox).observe(seconds)
        metrics.BYTES_PROCESSED.labels(inbox=job.inbox).inc(job.size)
        duration = state.facts.get("duration")
        if isinstance(duration, int | float):
            metrics.MEDIA_SECONDS.labels(inbox=job.inbox).inc(duration)
        metrics.LAST_SUCCESS.labels(inbox=job.inbox).set(self.clock())

    # --- failures ---------------------------------------------------------------------------

    def handle_error(self, job: Job, exc: Exception, step: str,
                     log: FilteringBoundLogger) -> Outcome:
        job = self.journal.get(job.id)
        category = classify_exception(exc)
        info = error_info(job, exc, category, step, self.clock())
        if isinstance(exc, BackendFatal):
            self.gate.pause(exc.backend, info["message"])
            self.journal.update(job.id, self.clock(), state=JobState.WAITING,
                                waiting_on=exc.backend, error=info)
            log.error("backend_paused", backend=exc.backend, step=step, error=info["message"])
            return Outcome.WAITING
        if category is Category.RETRY and job.attempts < self.settings.daemon.max_retries:
            return self._retry(job, exc, info, step, log)
        log.error("job_failed", step=step, category=category.value, error=info["message"])
        self.finish(job, JobState.FAILED, info, log)
        return Outcome.FAILED

    def _retry(self, job: Job, exc: Exception, info: dict[str, Any], step: str,
               log: FilteringBoundLogger) -> Outcome:
        daemon = self.settings.daemon
        delay = exc.defer if isinstance(exc, Retry) and exc.defer is not None else None
        if delay is None:
            delay = compute_backoff(job.attempts + 1, factor=daemon.retry_backoff,
                                    max_backoff=daemon.retry_backoff_max)
        self.journal.update(job.id, self.clock(), state=JobState.QUEUED,
                            attempts=job.attempts + 1, not_before=self.clock() + delay,
                            priority=job.priority + 1, error=info)
        metrics.JOB_RETRIES.labels(inbox=job.inbox, step=step, reason=info["reason"]).inc()
        log.warning("job_retry", step=step, reason=info["reason"], error=info["message"],
                    retry_in=round(delay, 1), attempt=job.attempts + 1)
        return Outcome.RETRY

    def _interrupt(self, job_id: int, log: FilteringBoundLogger) -> None:
        job = self.journal.get(job_id)
        if job.state is JobState.RUNNING:
            self.journal.update(job_id, self.clock(), state=JobState.QUEUED)
            log.info("job_interrupted", step_index=job.step)


def error_info(job: Job, exc: BaseException, category: Category, step: str,
               now: float) -> dict[str, Any]:
    """What a failure sidecar and the journal say about an error; secrets redacted."""
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return {
        "category": category.value,
        "reason": getattr(exc, "reason", type(exc).__name__),
        "message": redact_text(message),
        "step": step,
        "attempts": job.attempts + 1,
        "at": _iso(now),
    }


def sidecar(job: Job) -> bytes:
    error: Mapping[str, Any] = job.error or {}
    body = {
        "file": job.rel_path, "inbox": job.inbox, "job_id": job.id, "sha256": job.sha256,
        "size": job.size, **error,
        "first_seen": _iso(job.created), "started": _iso(job.started),
        "failed_at": error.get("at") or _iso(job.updated),
    }
    body.pop("at", None)
    return (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode()


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None
