"""The step executor seam: plain requests in, plain replies out, errors classified."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import io
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.typing import FilteringBoundLogger

from tests.helpers import with_pipeline
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
)
from traxd.executor import (
    ErrorReply,
    LocalExecutor,
    StepReply,
    StepRequest,
    build_request,
    step_settings,
)
from traxd.metrics import REGISTRY
from traxd.pipeline.base import NO_WORKDIR, JobInfo, StepContext, StepResult
from traxd.pipeline.ffmpeg import MP3
from traxd.pipeline.registry import StepRegistry

COMMAND: StepSpec = ("ffmpeg", "-i", "{input}", "{output_dir}/{stem}.opus")


@dataclass
class ScriptedStep:
    """Writes <stem>.<name> into its folder; raises the scripted error first, if any."""

    name: str
    error: BaseException | None = None
    seen: list[StepContext] = field(default_factory=list)

    async def run(self, ctx: StepContext) -> StepResult:
        self.seen.append(ctx)
        if self.error is not None:
            raise self.error
        out = ctx.workdir / f"{ctx.job.stem}.{self.name}"
        out.write_text(f"{self.name} of {ctx.input.name}")
        return StepResult(artifacts={out.name: out}, media=out, facts={"duration": 2.5},
                          spawn=[out], finish=True)

    async def aclose(self) -> None:
        return None


class NoopStep:
    """An in-process step that writes nothing and asks for no folder."""

    name = "noop"
    needs_workdir = False

    def __init__(self) -> None:
        self.workdirs: list[Path] = []

    async def run(self, ctx: StepContext) -> StepResult:
        self.workdirs.append(ctx.workdir)
        return StepResult(facts={"noop": True})

    async def aclose(self) -> None:
        return None


class BlockingStep:
    """Waits until cancelled, or until it is let go."""

    name = "block"

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def run(self, ctx: StepContext) -> StepResult:
        self.started.set()
        await self.release.wait()
        return StepResult()

    async def aclose(self) -> None:
        return None


def json_logger(out: io.StringIO) -> FilteringBoundLogger:
    """A logger that writes JSON lines, tracebacks included, into `out`."""
    logger: FilteringBoundLogger = structlog.wrap_logger(
        structlog.PrintLogger(out),
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        processors=[structlog.processors.add_log_level, structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer()])
    return logger


def events(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


class Rig:
    """A LocalExecutor over a registry holding the given steps, for one file in tmp_path."""

    def __init__(self, settings: Settings, tmp_path: Path, *steps: Any) -> None:
        self.settings = with_pipeline(settings, *(s.name for s in steps))
        self.registry = StepRegistry(self.settings)
        for step in steps:
            self.registry.register(step.name, step)
        self.executor = LocalExecutor(self.settings, self.registry)
        self.source = tmp_path / "box" / "processing" / "talks" / "talk.mp3"
        self.source.parent.mkdir(parents=True)
        self.source.write_bytes(b"media")
        self.job_dir = tmp_path / "work" / "7"
        self.out = io.StringIO()
        self.progress: list[float] = []

    def request(self, spec: StepSpec, index: int = 0, **facts: Any) -> StepRequest:
        job = JobInfo(7, "main", "talks/talk.mp3", "ab" * 32, 5)
        return build_request(
            job, step_index=index, step=spec, source=self.source, media=None, facts=facts,
            artifacts={}, job_dir=self.job_dir, needs_workdir=self.executor.needs_workdir(spec),
            settings=self.settings)

    async def run(self, request: StepRequest) -> StepReply:
        reply = await self.executor.run(request, log=json_logger(self.out),
                                        progress=self.progress.append)
        # what crosses a process or machine boundary is the JSON text
        return StepReply.from_json(json.loads(json.dumps(reply.to_json())))


@pytest.fixture
async def closing() -> AsyncIterator[list[LocalExecutor]]:
    executors: list[LocalExecutor] = []
    yield executors
    for executor in executors:
        await executor.aclose()


def round_trip(request: StepRequest) -> StepRequest:
    return StepRequest.from_json(json.loads(json.dumps(request.to_json())))


# --- requests -----------------------------------------------------------------------------


def test_requests_survive_a_json_round_trip(settings: Settings, tmp_path: Path) -> None:
    # Given a pipeline with every kind of step, and facts from earlier steps
    settings = with_pipeline(settings, "download", "preprocess", "transcribe", "enhance",
                             COMMAND)
    job = JobInfo(7, "main", "talks/talk.mp3", "ab" * 32, 5)
    facts = {"duration": 2.5, "chunks": [{"path": "/w/a.wav", "offset": 0.0, "duration": 2.5}],
             "timings": {"preprocess": 0.5}}
    for index, spec in enumerate(settings.inboxes[0].pipeline):
        # When a request is built for each step and goes through JSON text
        request = build_request(
            job, step_index=index, step=spec, source=tmp_path / "talk.mp3",
            media=tmp_path / "audio.wav", facts=facts, artifacts={"talk.txt": tmp_path / "t"},
            job_dir=tmp_path / "work" / "7", needs_workdir=True, settings=settings)
        # Then it comes back equal, the command's argv as a tuple again
        assert round_trip(request) == request
        assert round_trip(request).step == spec
    assert request.workdir == str(tmp_path / "work" / "7" / "4-command")
    assert request.input == str(tmp_path / "audio.wav")
    assert request.limits.timeout == settings.daemon.step_timeout


def test_each_step_gets_its_own_settings_only(settings: Settings) -> None:
    # Given the openai backend with 3-hour chunks (longer than one 25 MB upload holds)
    settings = dataclasses.replace(settings, transcribe=dataclasses.replace(
        settings.transcribe, backend="openai", chunk_seconds=10800.0))
    # When preprocess comes before transcribe, it gets mp3 chunks that fit one upload
    before = step_settings("preprocess", settings, ["transcribe"])
    # (one piece: cutting per model process is the local backend's)
    assert before == {"chunk_format": "mp3", "chunk_seconds": MP3.max_upload_seconds,
                      "chunk_pieces": 1, "chunk_piece_seconds": 0.0}
    # And with no transcription after it, the whole audio as one wav
    assert step_settings("preprocess", settings, [COMMAND]) == {
        "chunk_format": "wav", "chunk_seconds": None, "chunk_pieces": 1,
        "chunk_piece_seconds": 0.0}
    # And transcribe gets its own section; command steps and plug-ins get nothing
    assert step_settings("transcribe", settings, [])["backend"] == "openai"
    assert step_settings("enhance", settings, [])["model"] == settings.enhance.model
    assert step_settings(COMMAND, settings, []) == step_settings("noop", settings, []) == {}


def test_replies_survive_a_json_round_trip() -> None:
    reply = StepReply(artifacts={"a.txt": "/w/a.txt"}, media="/w/a.wav",
                      facts={"duration": 1.0, "chunks": [{"offset": 0.0}]}, spawn=["/w/b.url"],
                      finish=True)
    failed = StepReply.failed(Retry("busy", reason="http", defer=7.0))
    for original in (reply, failed):
        assert StepReply.from_json(json.loads(json.dumps(original.to_json()))) == original


# --- running ------------------------------------------------------------------------------


async def test_a_steps_artifacts_and_facts_come_back(
        settings: Settings, tmp_path: Path, closing: list[LocalExecutor]) -> None:
    # Given a scripted step, and a folder left behind by an attempt that was cut short
    rig = Rig(settings, tmp_path, ScriptedStep("a"))
    closing.append(rig.executor)
    request = rig.request("a", timings={"earlier": 1.0})
    assert request.workdir is not None
    leftover = Path(request.workdir) / "half-written.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("x")
    counted = REGISTRY.get_sample_value("traxd_step_duration_seconds_count", {"step": "a"}) or 0
    # When the executor runs it
    reply = await rig.run(request)
    # Then the step's outputs and facts come back, with its timing added to the earlier ones
    out = Path(request.workdir) / "talk.a"
    assert reply.error is None
    assert reply.artifacts == {"talk.a": str(out)} and out.read_text() == "a of talk.mp3"
    assert (reply.media, reply.spawn, reply.finish) == (str(out), [str(out)], True)
    assert reply.facts["duration"] == 2.5
    assert set(reply.facts["timings"]) == {"earlier", "a"}
    assert reply.result().artifacts == {"talk.a": out}
    # And it ran in an emptied folder of its own, logged, and measured
    assert not leftover.exists()
    assert [(e["event"], e["step"]) for e in events(rig.out)] == [
        ("step_started", "a"), ("step_done", "a")]
    assert REGISTRY.get_sample_value("traxd_step_duration_seconds_count",
                                     {"step": "a"}) == counted + 1


@pytest.mark.parametrize("error", [
    Retry("HTTP 503 from the server", reason="http", defer=7.0),
    StepTimeout("transcribe made no progress for 600 s", reason="stall"),
    ResourceExceeded("model process over the 50 MB limit", reason="memory"),
    Permanent("cannot decode talk.mp3", reason="undecodable"),
    BackendFatal("answered 401: invalid key", backend="openai", reason="auth"),
], ids=lambda e: type(e).__name__)
async def test_each_error_comes_back_classified_and_raises_again(
        settings: Settings, tmp_path: Path, closing: list[LocalExecutor],
        error: TraxdError) -> None:
    # Given a step that fails with one of traxd's own errors
    rig = Rig(settings, tmp_path, ScriptedStep("a", error))
    closing.append(rig.executor)
    # When it runs
    reply = await rig.run(rig.request("a"))
    # Then the reply holds the error, classified
    assert reply.error is not None
    assert reply.error.category is error.category
    assert (reply.error.reason, reply.error.message) == (error.reason, error.message)
    # And on the daemon's side it raises again as the same class, with what the runner uses
    with pytest.raises(type(error)) as raised:
        reply.result()
    assert type(raised.value) is type(error)
    assert (raised.value.message, raised.value.reason) == (error.message, error.reason)
    assert getattr(raised.value, "defer", None) == getattr(error, "defer", None)
    assert getattr(raised.value, "backend", None) == getattr(error, "backend", None)


async def test_secrets_in_an_error_message_are_redacted(
        settings: Settings, tmp_path: Path, closing: list[LocalExecutor]) -> None:
    rig = Rig(settings, tmp_path, ScriptedStep("a", Permanent("bad key sk-live-abcdefghijk")))
    closing.append(rig.executor)
    reply = await rig.run(rig.request("a"))
    assert reply.error is not None and reply.error.message == "bad key [redacted]"


async def test_an_unexpected_exception_is_classified_and_its_traceback_logged(
        settings: Settings, tmp_path: Path, closing: list[LocalExecutor]) -> None:
    # Given a step with a bug
    rig = Rig(settings, tmp_path, ScriptedStep("a", TypeError("'NoneType' is not iterable")))
    closing.append(rig.executor)
    # When it runs
    reply = await rig.run(rig.request("a"))
    # Then it comes back as an internal error named after the exception
    assert reply.error == ErrorReply(Category.INTERNAL, "InternalError", "TypeError",
                                     "'NoneType' is not iterable")
    with pytest.raises(InternalError, match="'NoneType' is not iterable"):
        reply.result()
    # And the traceback is in the log, at error level, with the step
    [logged] = [e for e in events(rig.out) if e["event"] == "step_error"]
    assert logged["level"] == "error" and logged["step"] == "a"
    assert "Traceback" in logged["exception"] and "TypeError" in logged["exception"]


async def test_transient_os_errors_are_retried(
        settings: Settings, tmp_path: Path, closing: list[LocalExecutor]) -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    rig = Rig(settings, tmp_path, ScriptedStep("a", full))
    closing.append(rig.executor)
    reply = await rig.run(rig.request("a"))
    assert reply.error is not None and reply.error.category is Category.RETRY
    with pytest.raises(Retry, match="No space left on device"):
        reply.result()


async def test_a_step_past_its_time_limit_is_a_step_timeout(
        settings: Settings, tmp_path: Path, closing: list[LocalExecutor]) -> None:
    # Given a step that never finishes and a 50 ms limit
    block = BlockingStep()
    rig = Rig(settings, tmp_path, block)
    closing.append(rig.executor)
    request = rig.request("block")
    request = dataclasses.replace(request, limits=dataclasses.replace(request.limits,
                                                                      timeout=0.05))
    # When it runs, then it comes back as a timeout, to be retried
    reply = await rig.run(request)
    assert reply.error is not None and reply.error.kind == "StepTimeout"
    with pytest.raises(StepTimeout, match="block ran past step_timeout"):
        reply.result()


async def test_a_step_that_needs_no_folder_gets_none(
        settings: Settings, tmp_path: Path, closing: list[LocalExecutor]) -> None:
    # Given an in-process no-op step registered by name (as a benchmark does)
    noop = NoopStep()
    rig = Rig(settings, tmp_path, noop)
    closing.append(rig.executor)
    # When a request is built and run for it
    request = rig.request("noop")
    reply = await rig.run(request)
    # Then it names no folder, none is made, and the step's facts come back
    assert request.workdir is None
    assert not rig.job_dir.exists()
    assert noop.workdirs == [NO_WORKDIR]
    assert reply.error is None and reply.facts["noop"] is True


def test_builtin_steps_keep_their_folders(settings: Settings) -> None:
    registry = StepRegistry(settings)
    for spec in ("download", "preprocess", "transcribe", "enhance", COMMAND):
        assert registry.needs_workdir(spec)


async def test_cancellation_propagates(
        settings: Settings, tmp_path: Path, closing: list[LocalExecutor]) -> None:
    # Given a step under way
    block = BlockingStep()
    rig = Rig(settings, tmp_path, block)
    closing.append(rig.executor)
    task = asyncio.create_task(rig.run(rig.request("block")))
    await block.started.wait()
    # When it is cancelled (shutdown), then the cancellation is not turned into a reply
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [e["event"] for e in events(rig.out)] == ["step_started"]
