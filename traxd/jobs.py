"""Running one job: claim, steps with checkpoints, publish outputs, move the original.

Claims and finishes go through batched stages (traxd.stages), which write the journal
before every move, so a crash at any point ends, after a restart, in one set of outputs
and the original in exactly one folder. Steps run behind the executor seam.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from structlog.typing import FilteringBoundLogger

from traxd import metrics
from traxd.config import Settings, StepSpec
from traxd.errors import BackendFatal, Category, Retry, classify_exception, compute_backoff
from traxd.eta import Throughput
from traxd.executor import Executor, StepReply, build_request
from traxd.folders import InboxFolders, append_lines, write_atomic
from traxd.journal import Job, JobState, Journal
from traxd.logs import Redactor, get_logger
from traxd.moves import SPAWN_PREFIX, Ending, Mover
from traxd.pipeline.base import RECORD_WHEN_DONE, JobInfo
from traxd.pipeline.formats import WARNINGS_FACT
from traxd.pipeline.registry import backend_of, step_label
from traxd.stages import ClaimStage, FinishStage

# Steps whose failure is a warning on the file, not its failure: what came before is kept;
# while such a step waits for its paused backend, what came before is published already.
OPTIONAL_STEPS = frozenset({"enhance", "mux"})


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
        # Told (backend, reason) when a backend is paused, (backend, None) when it resumes.
        self.on_change: Callable[[str, str | None], None] = _no_change

    def pause(self, backend: str, reason: str) -> None:
        first = backend not in self.paused
        self.paused[backend] = reason
        metrics.BACKEND_PAUSED.labels(backend=backend).set(1)
        if first:
            self.on_change(backend, reason)

    def resume(self, backend: str | None = None) -> list[str]:
        names = [name for name in self.paused if backend in (None, name)]
        for name in names:
            del self.paused[name]
            metrics.BACKEND_PAUSED.labels(backend=name).set(0)
            self.on_change(name, None)
        return names


def _no_change(_: str, __: str | None) -> None:
    return None


class JobSlot(Protocol):
    """A place in the worker pool: held while the steps run (traxd.pool.Slot)."""

    async def acquire(self) -> None: ...

    def release(self) -> None: ...


class NoSlot:
    """For a job run outside the pool (`traxd batch`, tests): there is nothing to wait for."""

    async def acquire(self) -> None:
        return None

    def release(self) -> None:
        return None


@dataclass
class Progress:
    """What a running job is doing, for `traxd status`."""

    step: str = "claim"
    fraction: float = 0.0
    started: float = field(default_factory=time.time)
    working: bool = False  # holds a worker slot: its steps run (claimed ahead until then)
    media_seconds: float | None = None  # the file's duration, once a step measured it


@dataclass
class PipelineState:
    """The result of the steps so far; saved after each step so a restart resumes there."""

    media: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    spawn: list[str] = field(default_factory=list)
    finished: bool = False

    def merge(self, reply: StepReply) -> None:
        self.media = reply.media if reply.media is not None else self.media
        self.facts.update(reply.facts)
        self.artifacts.update(reply.artifacts)
        self.spawn.extend(reply.spawn)
        self.finished = self.finished or reply.finish


@dataclass(frozen=True)
class JobEnd:
    """A job that reached done/, failed/ or was a duplicate: what reports and notifications
    say about it."""

    job_id: int
    inbox: str
    file: str
    outcome: str
    size: int
    seconds: float  # claim to end
    final_path: str | None = None
    media_seconds: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    warnings: tuple[dict[str, Any], ...] = ()  # file warnings: damage, guard, optional step
    segments: int = 0  # transcript segments, and of them those of low confidence
    low_confidence: int = 0

    @classmethod
    def of(cls, job: Job, outcome: Outcome, now: float,
           facts: Mapping[str, Any] | None = None) -> JobEnd:
        facts = facts or {}
        duration = facts.get("duration")
        timings = facts.get("timings")
        return cls(job.id, job.inbox, job.rel_path, outcome.value, job.size,
                   max(0.0, now - (job.started or now)), job.final_path,
                   float(duration) if isinstance(duration, int | float) else None,
                   {str(k): float(v) for k, v in timings.items()}
                   if isinstance(timings, Mapping) else {},
                   dict(job.error) if job.error else None,
                   tuple(dict(w) for w in facts.get(WARNINGS_FACT) or ()
                         if isinstance(w, Mapping)),
                   _count(facts.get("segments")), _count(facts.get("quality_warnings")))


def _seconds(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _no_listener(_: JobEnd) -> None:
    return None


class JobRunner:
    def __init__(self, settings: Settings, journal: Journal, executor: Executor,
                 gate: BackendGate, mover: Mover | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.journal = journal
        self.executor = executor
        self.gate = gate
        self.clock = clock
        self.mover = mover or Mover({})
        self.configure(settings)
        self.claims = ClaimStage(journal, self.mover)
        self.finishes = FinishStage(journal, self.mover, sidecar)
        self.progress: dict[int, Progress] = {}
        self.throughput: dict[str, Throughput] = {}  # per inbox, for the ETA in status
        self.on_end: Callable[[JobEnd], None] = _no_listener  # reports, notifications
        # An optional step whose backend is paused: the job waits for `traxd resume` (a
        # daemon), or is done without it, with a warning (`traxd batch`: no one resumes).
        self.optional_waits = True

    def configure(self, settings: Settings) -> None:
        self.settings = settings
        self.redactor = Redactor.of_environment(settings.key_variables,
                                               files=settings.key_files)
        for inbox in settings.inboxes:
            own = settings.for_inbox(inbox.name).transcribe
            library = own.library if own.subtitles == "library" else None
            self.mover.folders[inbox.name] = InboxFolders.of(inbox, settings.folders, library)

    @property
    def folders(self) -> dict[str, InboxFolders]:
        return self.mover.folders

    @property
    def work_root(self) -> Path:
        return self.settings.cluster.work_dir or self.settings.daemon.state_dir / "work"

    def _workdir(self, job_id: int) -> Path:
        return self.work_root / str(job_id)

    # --- the whole job ----------------------------------------------------------------------

    async def run(self, job: Job, slot: JobSlot | None = None) -> Outcome:
        """Run a job to its end. Its slot is taken once the file is claimed and given back
        when the steps are over, before the files are moved into place."""
        slot = slot or NoSlot()
        log = get_logger(inbox=job.inbox, file=job.rel_path, job_id=job.id)
        if job.final_path is not None:
            slot.release()
            return await self._finalize_again(job, log)
        self.progress[job.id] = progress = Progress()
        try:
            return await self._run(job, progress, log, slot)
        except asyncio.CancelledError:
            self._interrupt(job.id, log)
            raise
        finally:
            self.progress.pop(job.id, None)

    async def _run(self, job: Job, progress: Progress, log: FilteringBoundLogger,
                   slot: JobSlot) -> Outcome:
        started = self.clock()
        try:
            claimed = await self.claims.claim(job)
            if claimed is None:
                log.info("file_changed_while_queued")
                return Outcome.CHANGED
            progress.step = "waiting for a worker"
            await slot.acquire()
            progress.working = True
            log.info("job_started", attempt=claimed.attempts + 1, step_index=claimed.step)
            state = await self.run_steps(claimed, progress, log)
            slot.release()
            progress.step = "publish"
            done = await self._publish(claimed, state)
        except Exception as exc:
            return await self.handle_error(job, exc, progress.step, log)
        self.executor.recorded(job.id, len(self.settings.inbox(job.inbox).pipeline))
        self._count_done(done, state, self.clock() - started)
        self._ended(done, Outcome.DONE, state.facts)
        await self._record_done(state, log)
        return Outcome.DONE

    async def _record_done(self, state: PipelineState, log: FilteringBoundLogger) -> None:
        """Lines the steps asked to have written once the job is done (RECORD_WHEN_DONE)."""
        records = [(Path(r["file"]), str(r["line"]))
                   for r in state.facts.get(RECORD_WHEN_DONE) or ()]
        if not records:
            return
        try:
            await asyncio.to_thread(append_lines, records)
        except OSError as exc:  # the file is done; only its record is missing
            log.error("record_failed", error=str(exc), files=sorted({str(p) for p, _ in records}))

    async def _publish(self, job: Job, state: PipelineState) -> Job:
        try:
            return await self.finishes.finish(Ending(
                job, JobState.DONE, None, state.artifacts, state.spawn, self._workdir(job.id)))
        except Exception:
            job = self.journal.get(job.id)
            steps = len(self.settings.inbox(job.inbox).pipeline)
            if job.step < steps and job.final_path is None:  # keep the work for the retry
                await asyncio.to_thread(self._save_state, job, state)
                self.journal.step_done(job, steps)
            raise

    async def finish_duplicate(self, job: Job, original_id: int) -> Job:
        """A file whose content is done already: no steps; it gets copies of the outputs
        the original got (named after itself), and goes to done/."""
        self.journal.take(job)
        original = await asyncio.to_thread(self.journal.finished_job, original_id)
        copies = {} if original is None else await asyncio.to_thread(
            duplicate_outputs, original, job)
        get_logger(inbox=job.inbox, file=job.rel_path, job_id=job.id).info(
            "duplicate_found", original=original.rel_path if original else None,
            original_job=original_id, outputs=sorted(copies))
        done = await self.finishes.finish(Ending(job, JobState.DUPLICATE, artifacts=copies))
        facts = {"duplicate_of": original.rel_path} if original else {}
        self._ended(done, Outcome.DUPLICATE, facts)
        return done

    # --- steps ------------------------------------------------------------------------------

    async def run_steps(self, job: Job, progress: Progress,
                        log: FilteringBoundLogger) -> PipelineState:
        """Run the steps not yet done. Each finished step is saved, then recorded; with one
        step, only when its publish fails (a crash before then runs it again)."""
        pipeline = self.settings.inbox(job.inbox).pipeline
        checkpoints = len(pipeline) > 1
        state = await asyncio.to_thread(self._load_state, job) if job.step else None
        for index in range(job.step if state else 0, len(pipeline)):
            state = state or PipelineState()
            if state.finished:
                break
            spec = pipeline[index]
            progress.step, progress.fraction = step_label(spec), 0.0
            progress.media_seconds = _seconds(state.facts.get("duration"))
            self._check_backend(job, spec)
            state.merge(await self._run_step(job, index, spec, state, progress, log))
            if checkpoints:
                await asyncio.to_thread(self._save_state, job, state)
                job = self.journal.step_done(job, index + 1)
                self.executor.recorded(job.id, index + 1)
        return state or PipelineState()

    def _check_backend(self, job: Job, spec: StepSpec) -> None:
        """An optional step whose backend is paused is not tried: it would fail the same
        way (another request with a wrong key); its job waits, its outputs so far out."""
        if spec not in OPTIONAL_STEPS:
            return
        backend = backend_of(spec, self.settings.for_inbox(job.inbox))
        if backend is not None and (why := self.gate.paused.get(backend)) is not None:
            raise BackendFatal(why, backend=backend, reason="backend_paused")

    async def _run_step(self, job: Job, index: int, spec: StepSpec, state: PipelineState,
                        progress: Progress, log: FilteringBoundLogger) -> StepReply:
        def report(fraction: float) -> None:
            progress.fraction = max(0.0, min(1.0, fraction))

        request = build_request(
            JobInfo(job.id, job.inbox, job.rel_path, job.sha256 or "", job.size),
            step_index=index, step=spec, source=Path(job.claimed_path or ""),
            media=state.media, facts=state.facts, artifacts=state.artifacts,
            job_dir=self._workdir(job.id), needs_workdir=self.executor.needs_workdir(spec),
            settings=self.settings, attempt=job.attempts)
        reply = await self.executor.run(request, log=log, progress=report)  # it binds the step
        if reply.error is not None:
            raise reply.error.to_exception()
        return reply

    def _load_state(self, job: Job) -> PipelineState | None:
        """The checkpoint of the steps done; None (start over) when there is none."""
        path = self._workdir(job.id) / "state.json"
        if not path.exists():
            return None
        return PipelineState(**json.loads(path.read_text()))

    def _save_state(self, job: Job, state: PipelineState) -> None:
        write_atomic(self._workdir(job.id) / "state.json",
                     json.dumps(state.__dict__, sort_keys=True).encode())

    # --- the end of a job -------------------------------------------------------------------

    async def _finalize_again(self, job: Job, log: FilteringBoundLogger) -> Outcome:
        """Complete a move prepared before a crash; if it fails again, try later."""
        assert job.outcome is not None
        try:
            done = await self.finishes.finish(Ending(
                job, JobState(job.outcome), job.error, workdir=self._workdir(job.id)))
        except OSError as exc:
            return self._postpone_final(job, exc, log)
        return Outcome(done.state.value)

    def _postpone_final(self, job: Job, exc: Exception, log: FilteringBoundLogger) -> Outcome:
        delay = compute_backoff(job.attempts + 1, factor=self.settings.daemon.retry_backoff,
                                max_backoff=self.settings.daemon.retry_backoff_max)
        self.journal.retry(job, self.clock() + delay, lower_priority=False)
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

    async def handle_error(self, job: Job, exc: Exception, step: str,
                           log: FilteringBoundLogger) -> Outcome:
        job = self.journal.get(job.id)
        if job.final_path is not None:  # the end was written down; only its moves failed
            return self._postpone_final(job, exc, log)
        category = classify_exception(exc)
        info = error_info(job, exc, category, step, self.clock(), self.redactor)
        if isinstance(exc, BackendFatal) and job.state is JobState.RUNNING:
            return await self._wait_for_backend(job, exc, info, step, log)
        if category is Category.INTERNAL:
            metrics.INTERNAL_ERRORS.labels(step=step).inc()
        retryable = category in (Category.RETRY, Category.INTERNAL)
        if retryable and job.attempts < self.settings.daemon.max_retries:
            return self._retry(job, exc, info, step, log)
        if step in OPTIONAL_STEPS and (kept := await self._publish_without(job, info, log)):
            return kept
        log.error("job_failed", step=step, category=category.value, error=info["message"])
        failed = await self.finishes.finish(Ending(job, JobState.FAILED, info,
                                                   workdir=self._workdir(job.id)))
        self._ended(failed, Outcome.FAILED)
        return Outcome.FAILED

    async def _wait_for_backend(self, job: Job, exc: BackendFatal, info: dict[str, Any],
                                step: str, log: FilteringBoundLogger) -> Outcome:
        """The backend is paused and the job waits for it; before an optional step, what
        the steps before made is published now (or, with no one to resume, the file is done
        without the step, with a warning)."""
        first = exc.backend not in self.gate.paused
        self.gate.pause(exc.backend, info["message"])
        optional = step in OPTIONAL_STEPS
        if optional and not self.optional_waits and (
                kept := await self._publish_without(job, info, log)):
            return kept
        if first:
            log.error("backend_paused", backend=exc.backend, step=step, error=info["message"])
        if optional and self.optional_waits:
            await self._publish_so_far(job, step, log)
        self.journal.hold(self.journal.get(job.id), exc.backend, info)
        log.info("job_waiting", backend=exc.backend, step=step)
        return Outcome.WAITING

    async def _publish_so_far(self, job: Job, step: str, log: FilteringBoundLogger) -> None:
        """Put the outputs of the steps done into outputs/ while `step` waits; the final
        publish adds what the rest make. A failure here only leaves them for the end."""
        state = await asyncio.to_thread(self._load_state, job) if job.step else None
        if state is None or not state.artifacts:
            return
        try:
            await self.finishes.finish(Ending(job, JobState.DONE, None, state.artifacts,
                                              workdir=self._workdir(job.id), partial=True))
        except (OSError, KeyError) as exc:
            log.warning("publish_before_wait_failed", error=str(exc), waiting_for=step)
            return
        log.info("outputs_published", waiting_for=step, outputs=sorted(state.artifacts))

    def _ended(self, job: Job, outcome: Outcome, facts: Mapping[str, Any] | None = None,
               warning: dict[str, Any] | None = None) -> None:
        end = JobEnd.of(job, outcome, self.clock(), facts)
        if warning is not None:
            end = dataclasses.replace(end, warnings=(*end.warnings, warning))
        if outcome is Outcome.DONE:
            self.throughput.setdefault(job.inbox, Throughput(self.clock)).finished(
                end.media_seconds)
        try:
            self.on_end(end)
        except Exception:  # a listener's bug never fails a finished job
            get_logger(component="jobs").exception("job_end_listener_failed", job_id=job.id)

    async def _publish_without(self, job: Job, info: dict[str, Any],
                               log: FilteringBoundLogger) -> Outcome | None:
        """An optional step failed for good: what the steps before it made is published,
        with a warnings file beside it, and the file is done. None when nothing was made."""
        state = await asyncio.to_thread(self._load_state, job) if job.step else None
        if state is None or not state.artifacts:
            return None
        stem = PurePosixPath(job.rel_path).stem
        note = self._workdir(job.id) / "warnings" / f"{stem}.warnings.json"
        earlier = [dict(w) for w in state.facts.get(WARNINGS_FACT) or ()]  # damage, guard, ...
        body = {"file": job.rel_path, "warnings": [*earlier, {
            k: info[k] for k in ("step", "category", "reason", "message", "attempts")}]}
        await asyncio.to_thread(write_atomic, note, (json.dumps(body, indent=2) + "\n").encode())
        log.warning("optional_step_failed", step=info["step"], error=info["message"],
                    published=sorted(state.artifacts))
        done = await self.finishes.finish(Ending(
            job, JobState.DONE, None, {**state.artifacts, note.name: str(note)}, state.spawn,
            self._workdir(job.id)))
        self._ended(done, Outcome.DONE, state.facts, warning=info)
        await self._record_done(state, log)
        return Outcome.DONE

    def _retry(self, job: Job, exc: Exception, info: dict[str, Any], step: str,
               log: FilteringBoundLogger) -> Outcome:
        daemon = self.settings.daemon
        if isinstance(exc, Retry) and exc.defer is not None:  # Retry-After, within bounds
            delay = min(exc.defer, daemon.retry_backoff_max)
        else:
            delay = compute_backoff(job.attempts + 1, factor=daemon.retry_backoff,
                                    max_backoff=daemon.retry_backoff_max)
        self.journal.retry(job, self.clock() + delay, info)
        metrics.JOB_RETRIES.labels(inbox=job.inbox, step=step, reason=info["reason"]).inc()
        log.warning("job_retry", step=step, reason=info["reason"], error=info["message"],
                    retry_in=round(delay, 1), attempt=job.attempts + 1)
        return Outcome.RETRY

    def _interrupt(self, job_id: int, log: FilteringBoundLogger) -> None:
        if job_id in self.journal and self.journal.get(job_id).state is JobState.RUNNING:
            job = self.journal.interrupt(self.journal.get(job_id))
            log.info("job_interrupted", step_index=job.step)

    async def close(self) -> None:
        await self.claims.close()
        await self.finishes.close()
        await self.executor.aclose()


def duplicate_outputs(original: Job, duplicate: Job) -> dict[str, str]:
    """The original's published outputs that are still there, named for the duplicate
    (`talk.txt` of talk.mp3 becomes `talk-copy.txt` for talk-copy.mp3)."""
    old, new = PurePosixPath(original.rel_path).stem, PurePosixPath(duplicate.rel_path).stem
    copies: dict[str, str] = {}
    for name, dest in (original.outputs or {}).items():
        if name.startswith(SPAWN_PREFIX) or not Path(dest).is_file():
            continue
        copies[new + name[len(old):] if name.startswith(old) else name] = dest
    return copies


def error_info(job: Job, exc: BaseException, category: Category, step: str,
               now: float, redactor: Redactor) -> dict[str, Any]:
    """What a failure sidecar and the journal say about an error; secrets redacted."""
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return {
        "category": category.value,
        "reason": getattr(exc, "reason", type(exc).__name__),
        "message": redactor.text(message),
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
    try:
        return (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:  # a name that is not UTF-8: escaped, so the JSON stays valid
        return (json.dumps(body, indent=2) + "\n").encode()


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None
