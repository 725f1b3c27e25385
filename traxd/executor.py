"""The step executor seam: a step's work goes out as a plain request and comes back as a reply.

A `StepRequest` holds what one step needs as JSON-able data (the job, input and output
locations, facts, that step's own settings, limits); a `StepReply` holds its outputs and
facts, or a classified error. The logger and the progress callback stay on the daemon's
side. `build_request` is the one place that decides what each step gets; `LocalExecutor`
runs requests in this process (and its model processes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from structlog.typing import FilteringBoundLogger

from traxd import metrics
from traxd.config import Settings, StepSpec
from traxd.errors import (
    BackendFatal,
    Category,
    InternalError,
    Permanent,
    ResourceExceeded,
    Retry,
    StepTimeout,
    TraxdError,
    classify_exception,
)
from traxd.logs import redact_text
from traxd.pipeline.base import NO_WORKDIR, JobInfo, Step, StepContext, StepResult
from traxd.pipeline.ffmpeg import ChunkTarget
from traxd.pipeline.plan import transcribe_target
from traxd.pipeline.registry import StepRegistry, step_label
from traxd.procs import ProcessLimits

Progress = Callable[[float], None]
ROOM = 1 << 20  # bytes: less free space than this after a failed step means the disk is full

# The traxd.errors classes a reply can name, and what each category falls back to.
ERROR_CLASSES: dict[str, type[TraxdError]] = {
    cls.__name__: cls for cls in (Retry, StepTimeout, ResourceExceeded, Permanent, BackendFatal,
                                  InternalError)
}
_BY_CATEGORY: dict[Category, type[TraxdError]] = {
    Category.RETRY: Retry, Category.PERMANENT: Permanent, Category.FATAL: BackendFatal,
    Category.INTERNAL: InternalError,
}


@dataclass(frozen=True)
class StepRequest:
    """Everything one step of one job needs, as JSON-able values."""

    job_id: int
    inbox: str
    name: str  # path relative to the inbox, e.g. "talks/intro.mp3"
    sha256: str
    size: int
    step_index: int
    step: StepSpec
    input: str  # the media this step works on: the original, or an earlier step's media
    source: str  # the original file, claimed into processing/
    workdir: str | None  # this step's own folder (emptied before it runs); None: it has none
    facts: dict[str, Any]
    artifacts: dict[str, str]  # outputs of earlier steps: output file name -> file
    formats: tuple[str, ...]
    settings: dict[str, Any]  # this step's own settings
    limits: ProcessLimits
    attempt: int = 0  # the job's attempt at this step (a retry is a new attempt)

    @property
    def label(self) -> str:
        return step_label(self.step)

    @property
    def job(self) -> JobInfo:
        return JobInfo(self.job_id, self.inbox, self.name, self.sha256, self.size)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["step"] = self.step if isinstance(self.step, str) else list(self.step)
        data["formats"] = list(self.formats)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StepRequest:
        step = data["step"]
        return cls(**{
            **data,
            "step": step if isinstance(step, str) else tuple(step),
            "formats": tuple(data["formats"]),
            "limits": ProcessLimits(**data["limits"]),
        })


@dataclass(frozen=True)
class ErrorReply:
    """A step's failure, classified, in a form that can travel and be raised again."""

    category: Category
    kind: str  # the traxd.errors class to raise again (Retry, StepTimeout, Permanent, ...)
    reason: str
    message: str  # secrets redacted
    backend: str | None = None  # the backend a fatal error pauses
    defer: float | None = None  # seconds before a retry (Retry-After), when the step said

    @classmethod
    def of(cls, exc: BaseException) -> ErrorReply:
        category = classify_exception(exc)
        if isinstance(exc, TraxdError):
            message, reason = exc.message, exc.reason
        else:
            message, reason = str(exc), type(exc).__name__
        return cls(
            category=category,
            kind=next((c.__name__ for c in type(exc).__mro__ if c in ERROR_CLASSES.values()),
                      _BY_CATEGORY[category].__name__),
            reason=reason, message=redact_text(message or type(exc).__name__),
            backend=exc.backend if isinstance(exc, BackendFatal) else None,
            defer=exc.defer if isinstance(exc, Retry) else None,
        )

    def to_exception(self) -> TraxdError:
        """The traxd.errors exception this reply stands for, to raise on the daemon's side."""
        cls = ERROR_CLASSES.get(self.kind, _BY_CATEGORY[self.category])
        if issubclass(cls, BackendFatal):
            return cls(self.message, backend=self.backend or "unknown", reason=self.reason)
        if issubclass(cls, Retry):
            return cls(self.message, reason=self.reason, defer=self.defer)
        return cls(self.message, reason=self.reason)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "category": self.category.value}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ErrorReply:
        return cls(**{**data, "category": Category(data["category"])})


@dataclass(frozen=True)
class StepReply:
    """What a step gave back (as StepResult, with paths as strings), or its error."""

    artifacts: dict[str, str] = field(default_factory=dict)
    media: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    spawn: list[str] = field(default_factory=list)
    finish: bool = False
    error: ErrorReply | None = None

    @classmethod
    def of(cls, result: StepResult) -> StepReply:
        return cls(
            artifacts={name: str(path) for name, path in result.artifacts.items()},
            media=None if result.media is None else str(result.media),
            facts=_plain(result.facts), spawn=[str(path) for path in result.spawn],
            finish=result.finish)

    @classmethod
    def failed(cls, exc: BaseException) -> StepReply:
        return cls(error=ErrorReply.of(exc))

    def result(self) -> StepResult:
        """The step's result; raises the traxd.errors exception when the step failed."""
        if self.error is not None:
            raise self.error.to_exception()
        return StepResult(
            artifacts={name: Path(path) for name, path in self.artifacts.items()},
            media=None if self.media is None else Path(self.media), facts=dict(self.facts),
            spawn=[Path(path) for path in self.spawn], finish=self.finish)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["error"] = None if self.error is None else self.error.to_json()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StepReply:
        error = data.get("error")
        return cls(**{**data, "error": None if error is None else ErrorReply.from_json(error)})


# --- what each step gets ------------------------------------------------------------------


def build_request(
    job: JobInfo, *, step_index: int, step: StepSpec, source: Path,
    media: str | Path | None, facts: Mapping[str, Any], artifacts: Mapping[str, str | Path],
    job_dir: Path, needs_workdir: bool, settings: Settings, attempt: int = 0,
) -> StepRequest:
    """The request for step `step_index` of the job's inbox pipeline.

    `media` is the current media (None: the original at `source`); the step's folder is
    `job_dir/<index>-<label>` when it needs one (see StepRegistry.needs_workdir).
    """
    inbox = settings.inbox(job.inbox)
    daemon = settings.daemon
    label = step_label(step)
    return StepRequest(
        job_id=job.job_id, inbox=job.inbox, name=job.name, sha256=job.sha256, size=job.size,
        step_index=step_index, step=step, input=str(media or source), source=str(source),
        workdir=str(job_dir / f"{step_index}-{label}") if needs_workdir else None,
        facts=_plain(facts), artifacts={name: str(path) for name, path in artifacts.items()},
        formats=inbox.formats,
        settings=step_settings(step, settings.for_inbox(job.inbox),
                               inbox.pipeline[step_index + 1:]),
        limits=ProcessLimits(daemon.step_timeout, daemon.stall_seconds, daemon.memory_limit_mb),
        attempt=attempt,
    )


def step_settings(step: StepSpec, settings: Settings, later: Sequence[StepSpec]) -> dict[str, Any]:
    """The settings one step gets: its own section (the inbox's, when `settings` are
    those `for_inbox`), or what the daemon derives for it from the steps after it
    (`later`). Command steps and plug-ins get none."""
    if step == "preprocess":
        return preprocess_settings(settings, later)
    if step in ("transcribe", "enhance", "download"):
        own: dict[str, Any] = _plain(dataclasses.asdict(getattr(settings, str(step))))
        return own
    return {}


def preprocess_settings(settings: Settings, later: Sequence[StepSpec]) -> dict[str, Any]:
    """Chunks in the format and length that the transcription after preprocess takes; with
    no transcription after it, the whole audio as one wav."""
    if "transcribe" in later:
        return transcribe_target(settings.transcribe).to_settings()
    return ChunkTarget(seconds=None).to_settings()


def _plain(value: Any) -> Any:
    """A copy in JSON's own types: paths as strings, tuples as lists."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


# --- executors ----------------------------------------------------------------------------


class Executor(Protocol):
    """Runs step requests: in this process (LocalExecutor) or on workers (cluster)."""

    def needs_workdir(self, spec: StepSpec) -> bool: ...

    async def run(self, request: StepRequest, *, log: FilteringBoundLogger,
                  progress: Progress) -> StepReply:
        """The step's reply; failures come back in it, never raised (cancellation excepted)."""
        ...

    def recorded(self, job_id: int, steps: int) -> None:
        """The journal holds the results of the job's first `steps` steps."""
        ...

    def status(self) -> dict[str, Any] | None:
        """What `traxd status` shows about where steps run (None: in this process)."""
        ...

    def backend_changed(self, backend: str, reason: str | None) -> None:
        """A backend was paused (with the reason) or resumed (None)."""
        ...

    async def aclose(self) -> None: ...


# --- running in this process --------------------------------------------------------------


class LocalExecutor:
    """Runs steps in this process, with the steps of one registry (built once per daemon)."""

    def __init__(self, settings: Settings, steps: StepRegistry) -> None:
        self.settings = settings
        self.steps = steps

    def needs_workdir(self, spec: StepSpec) -> bool:
        return self.steps.needs_workdir(spec)

    def recorded(self, job_id: int, steps: int) -> None:
        return None

    def status(self) -> dict[str, Any] | None:
        return None

    def backend_changed(self, backend: str, reason: str | None) -> None:
        return None

    async def run(self, request: StepRequest, *, log: FilteringBoundLogger,
                  progress: Progress) -> StepReply:
        """Run one step; every failure comes back as a classified error, never raised
        (cancellation excepted)."""
        log = log.bind(step=request.label)
        try:
            step = self.steps.get(request.step)
            ctx = await self._context(request, log, progress)
            result = await self._run_step(step, ctx, request, log)
        except Permanent as exc:
            return StepReply.failed(await _short_of_room(request, exc))
        except TraxdError as exc:
            return StepReply.failed(exc)
        except Exception as exc:
            log.exception("step_error", error=repr(exc))
            return StepReply.failed(exc)
        return StepReply.of(result)

    async def _context(self, request: StepRequest, log: FilteringBoundLogger,
                       progress: Progress) -> StepContext:
        workdir = NO_WORKDIR
        if request.workdir is not None:
            workdir = Path(request.workdir)
            await asyncio.to_thread(_empty_folder, workdir)
        return StepContext(
            job=request.job, input=Path(request.input), source=Path(request.source),
            workdir=workdir, facts=dict(request.facts),
            artifacts={name: Path(path) for name, path in request.artifacts.items()},
            settings=self.settings.for_inbox(request.inbox), formats=request.formats,
            limits=request.limits,
            log=log, progress=progress, step_settings=request.settings)

    async def _run_step(self, step: Step, ctx: StepContext, request: StepRequest,
                        log: FilteringBoundLogger) -> StepResult:
        label = request.label
        started = time.monotonic()
        log.info("step_started")
        deadline = asyncio.timeout(request.limits.timeout)
        try:
            async with deadline:
                result = await step.run(ctx)
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            raise StepTimeout(f"{label} ran past step_timeout", reason="timeout") from exc
        elapsed = time.monotonic() - started
        metrics.STEP_DURATION.labels(step=label).observe(elapsed)
        result.facts.setdefault("timings", {**request.facts.get("timings", {}), label: elapsed})
        log.info("step_done", seconds=round(elapsed, 3))
        return result

    async def aclose(self) -> None:
        await self.steps.aclose()


async def _short_of_room(request: StepRequest, exc: Permanent) -> TraxdError:
    """A step that failed while its folder's disk is full failed for want of room, not
    because of its input (a program cannot say which): that is worth a retry."""
    if request.workdir is None or await asyncio.to_thread(_room, Path(request.workdir)) > ROOM:
        return exc
    return Retry(f"the disk of {request.workdir} is full: {exc.message}", reason="disk_full")


def _room(folder: Path) -> int:
    """Bytes free to this user on the disk of `folder`; a large number when unknown."""
    try:
        info = os.statvfs(folder)
    except OSError:
        return 1 << 62
    return info.f_bavail * info.f_frsize


def _empty_folder(path: Path) -> None:
    """A new folder; one left by an attempt that was cut short is emptied first."""
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        shutil.rmtree(path)
        path.mkdir()
