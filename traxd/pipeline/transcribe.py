"""The `transcribe` step: chunks of 16 kHz audio -> one Transcript -> txt, srt, vtt, json.

Two backends behind one interface: `local` (faster-whisper in model processes owned by
the daemon) and `openai` (any OpenAI-compatible transcription API).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import openai
from openai import AsyncOpenAI

from traxd.config import Settings, TranscribeSettings
from traxd.errors import BackendFatal, Permanent
from traxd.logs import get_logger
from traxd.pipeline.base import StepContext, StepResult
from traxd.pipeline.ffmpeg import (
    UPLOAD_LIMIT_BYTES,
    Chunk,
    ChunkTarget,
    LazyTools,
    chunk_target,
    prepare_audio,
)
from traxd.pipeline.formats import (
    Segment,
    SourceInfo,
    Transcript,
    merge,
    quality_warnings,
    write_formats,
)
from traxd.pipeline.openai_api import OpenAIEndpoint
from traxd.pipeline.tasks import gather_all
from traxd.pipeline.whisper_pool import WhisperPool, WorkerSpec, model_path

OPENAI_DEFAULT_MODEL = "whisper-1"
MAX_AUTO_PROCESSES = 4  # each holds a copy of the model
PREPARE_SHARE = 0.1  # of the step's progress, when it has to convert the audio itself


class Backend(Protocol):
    name: str

    async def transcribe(self, audio: Path, ctx: StepContext) -> Transcript:
        """Transcribe one piece of 16 kHz mono audio; timestamps relative to its start."""
        ...

    async def aclose(self) -> None: ...


# --- local: faster-whisper ----------------------------------------------------------------


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def has_nvidia_gpu() -> bool:
    return Path("/proc/driver/nvidia/version").exists()


def plan_workers(processes: int, threads: int, cores: int, gpu: bool) -> tuple[int, int]:
    """(model processes, threads each); 0 means choose.

    One process per GPU. On CPUs, files and chunks side by side in single-threaded
    processes beat one process using all cores for one file at a time (bench/transcribe.py:
    +20 % on 2 cores), up to MAX_AUTO_PROCESSES model copies; more cores go to threads.
    """
    if gpu:
        procs = processes or 1
        return procs, threads or max(1, min(4, cores // procs))
    procs = processes or max(1, min(cores, MAX_AUTO_PROCESSES))
    return procs, threads or max(1, cores // procs)


class LocalBackend:
    """faster-whisper in model processes, started on first use and reused."""

    name = "local"

    def __init__(self, settings: TranscribeSettings) -> None:
        self.settings = settings
        self._pool: WhisperPool | None = None

    def pool(self) -> WhisperPool:
        if self._pool is None:
            if importlib.util.find_spec("faster_whisper") is None:
                raise BackendFatal("the local backend needs faster-whisper: "
                                   "pip install 'traxd[local]'", backend="local", reason="model")
            gpu = self.settings.device == "cuda" or (
                self.settings.device == "auto" and has_nvidia_gpu())
            procs, threads = plan_workers(self.settings.processes, self.settings.threads,
                                          usable_cores(), gpu)
            spec = WorkerSpec(model_path(self.settings.model), self.settings.model,
                              self.settings.device, self.settings.compute_type, threads)
            self._pool = WhisperPool(spec, procs, self.settings.idle_unload_seconds,
                                     get_logger(backend="local"))
        return self._pool

    def request(self, audio: Path) -> dict[str, Any]:
        return {"audio": str(audio.absolute()), "language": self.settings.language,
                "beam_size": self.settings.beam_size, "vad_filter": self.settings.vad_filter}

    async def transcribe(self, audio: Path, ctx: StepContext) -> Transcript:
        async with self.pool().worker() as worker:
            data = await worker.transcribe(self.request(audio), ctx.limits, ctx.progress)
        ctx.progress(1.0)
        return Transcript.from_dict(data)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()


# --- openai: any OpenAI-compatible server -------------------------------------------------


def _rejects_verbose(exc: Permanent) -> bool:
    """A 400 that says the server cannot give segments (verbose_json, granularities)."""
    cause = exc.__cause__
    return (isinstance(cause, openai.BadRequestError)
            and any(w in str(cause).lower() for w in ("response_format", "verbose_json",
                                                      "timestamp_granularities")))


def parse_transcription(response: object, model: str) -> Transcript:
    """A Transcript from verbose_json (segments) or plain json/text (one segment)."""
    if isinstance(response, str):
        text, raw_segments, language, duration = response, None, None, 0.0
    else:
        text = str(getattr(response, "text", "") or "")
        raw_segments = getattr(response, "segments", None)
        language = getattr(response, "language", None)
        duration = float(getattr(response, "duration", 0.0) or 0.0)
    if raw_segments:
        segments = tuple(Segment(float(s.start), float(s.end), str(s.text).strip(),
                                 getattr(s, "avg_logprob", None),
                                 getattr(s, "no_speech_prob", None)) for s in raw_segments)
    else:
        segments = (Segment(0.0, duration, text.strip()),) if text.strip() else ()
    return Transcript(segments, language, duration, model)


def check_upload_size(audio: Path) -> None:
    size = audio.stat().st_size
    if size > UPLOAD_LIMIT_BYTES:
        raise Permanent(f"{audio.name} is {size / 2**20:.1f} MB, over the 25 MB upload limit",
                        reason="too_large")


class OpenAIBackend:
    """POST /audio/transcriptions per chunk, under the provider's rate limit."""

    name = "openai"

    def __init__(self, settings: TranscribeSettings) -> None:
        self.settings = settings
        self.model = OPENAI_DEFAULT_MODEL if settings.model == "tiny.en" else settings.model
        self.api = OpenAIEndpoint(
            backend="openai", base_url=settings.base_url, api_key_env=settings.api_key_env,
            timeout=settings.timeout, requests_per_minute=settings.requests_per_minute,
            max_concurrent=settings.max_concurrent)
        self._verbose = True

    async def transcribe(self, audio: Path, ctx: StepContext) -> Transcript:
        check_upload_size(audio)
        try:
            response = await self.api.call(self._request(audio))
        except Permanent as exc:
            if not (self._verbose and _rejects_verbose(exc)):
                raise
            ctx.log.info("segments_unsupported", provider=self.api.provider, model=self.model)
            self._verbose = False
            response = await self.api.call(self._request(audio))
        ctx.progress(1.0)
        return parse_transcription(response, self.model)

    def _request(self, audio: Path) -> Callable[[AsyncOpenAI], Awaitable[object]]:
        verbose, language = self._verbose, self.settings.language

        async def request(client: AsyncOpenAI) -> object:
            result: object = await client.audio.transcriptions.create(
                file=audio, model=self.model,
                response_format="verbose_json" if verbose else "json",
                timestamp_granularities=["segment"] if verbose else openai.omit,
                language=language or openai.omit)
            return result

        return request

    async def aclose(self) -> None:
        await self.api.aclose()


def make_backend(settings: TranscribeSettings) -> Backend:
    if settings.backend == "openai":
        return OpenAIBackend(settings)
    return LocalBackend(settings)


# --- the step -----------------------------------------------------------------------------


class ChunkProgress:
    """Progress of the whole from the progress of chunks transcribed side by side."""

    def __init__(self, report: Callable[[float], None], weights: Sequence[float],
                 start: float = 0.0) -> None:
        total = sum(weights) or 1.0
        self.report, self.start = report, start
        self.weights = [w / total for w in weights]
        self.done = [0.0] * len(weights)

    def reporter(self, index: int) -> Callable[[float], None]:
        def update(fraction: float) -> None:
            self.done[index] = max(self.done[index], min(1.0, fraction))
            share = sum(w * d for w, d in zip(self.weights, self.done, strict=True))
            self.report(self.start + (1.0 - self.start) * share)

        return update


def fit(transcript: Transcript, limit: float) -> Transcript:
    """Segments inside [0, limit]; a segment with no length (plain text) spans the chunk."""
    segments = []
    for s in transcript.segments:
        start = min(max(s.start, 0.0), limit)
        end = min(s.end, limit) if s.end > s.start else limit
        segments.append(dataclasses.replace(s, start=start, end=max(start, end)))
    return dataclasses.replace(transcript, segments=tuple(segments))


def _scaled(report: Callable[[float], None], span: float) -> Callable[[float], None]:
    return lambda fraction: report(span * fraction)


class TranscribeStep:
    """Transcribe the chunks preprocess made (or make them), merge, write the formats."""

    name = "transcribe"
    needs_workdir = True

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.backend = backend or make_backend(settings.transcribe)
        self.tools = LazyTools()

    @property
    def target(self) -> ChunkTarget:
        """The chunks this step's backend takes."""
        return chunk_target(self.backend.name, self.settings.transcribe.chunk_seconds)

    async def run(self, ctx: StepContext) -> StepResult:
        started = time.monotonic()
        ctx = dataclasses.replace(ctx, log=ctx.log.bind(backend=self.backend.name))
        chunks, duration, start = await self._chunks(ctx)
        progress = ChunkProgress(ctx.progress, [c.duration for c in chunks], start)
        parts = await self._transcribe_all(chunks, progress, ctx)
        transcript = merge(parts, duration=duration)
        if transcript.language is None and self.settings.transcribe.language:
            transcript = dataclasses.replace(transcript,
                                             language=self.settings.transcribe.language)
        return self._publish(ctx, transcript, time.monotonic() - started)

    async def _chunks(self, ctx: StepContext) -> tuple[list[Chunk], float, float]:
        """Chunks from the facts of preprocess when they suit the backend, else made here
        (no preprocess step before this one); the share of progress used so far."""
        target = self.target
        chunks = [Chunk.from_fact(f) for f in ctx.facts.get("chunks") or ()]
        if chunks and all(c.path.suffix == target.format.suffix and c.path.is_file()
                          for c in chunks):
            return chunks, float(ctx.facts["duration"]), 0.0
        folder = ctx.workdir / "audio"
        folder.mkdir(exist_ok=True)
        sub = dataclasses.replace(ctx, progress=_scaled(ctx.progress, PREPARE_SHARE))
        prepared = await prepare_audio(sub, folder, self.tools.get(), target)
        return list(prepared.chunks), prepared.duration, PREPARE_SHARE

    async def _transcribe_all(self, chunks: Sequence[Chunk], progress: ChunkProgress,
                              ctx: StepContext) -> list[tuple[float, Transcript]]:
        """All chunks side by side; the backend's pool or rate limit bounds how many run."""
        results = await gather_all(
            self.backend.transcribe(chunk.path, dataclasses.replace(
                ctx, progress=progress.reporter(index)))
            for index, chunk in enumerate(chunks))
        return [(c.offset, fit(t, c.duration)) for c, t in zip(chunks, results, strict=True)]

    def _publish(self, ctx: StepContext, transcript: Transcript, elapsed: float) -> StepResult:
        out = ctx.workdir / "out"
        out.mkdir(exist_ok=True)
        data = transcript.save(ctx.workdir / "transcript.json")
        timings = {**dict(ctx.facts.get("timings") or {}), self.name: round(elapsed, 3)}
        source = SourceInfo(ctx.job.filename, ctx.job.sha256, timings)
        artifacts = write_formats(transcript, ctx.formats, out, ctx.job.stem, source)
        warnings = quality_warnings(transcript)
        if warnings:
            ctx.log.warning("low_confidence_segments", count=len(warnings),
                            segments=[w.segment for w in warnings[:20]])
        if not transcript.segments:
            ctx.log.warning("no_speech_found", duration=round(transcript.duration, 3))
        facts: dict[str, Any] = {
            "transcript": str(data), "duration": transcript.duration,
            "language": transcript.language, "model": transcript.model,
            "segments": len(transcript.segments), "quality_warnings": len(warnings)}
        return StepResult(artifacts=artifacts, facts=facts)

    async def aclose(self) -> None:
        await self.backend.aclose()
