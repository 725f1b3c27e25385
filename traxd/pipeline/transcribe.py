"""The `transcribe` step: chunks of 16 kHz audio -> one Transcript -> txt, srt, vtt, json.

Two backends behind one interface: `local` (faster-whisper in model processes owned by
the daemon) and `openai` (any OpenAI-compatible transcription API).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib.util
import json
import math
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import openai
from openai import AsyncOpenAI

from traxd.config import Settings, TranscribeSettings
from traxd.errors import BackendFatal, Permanent
from traxd.folders import write_atomic
from traxd.logs import get_logger
from traxd.pipeline.base import BESIDE, StepContext, StepResult
from traxd.pipeline.ffmpeg import (
    UPLOAD_LIMIT_BYTES,
    Chunk,
    ChunkTarget,
    LazyTools,
    prepare_audio,
)
from traxd.pipeline.formats import (
    WARNINGS_FACT,
    Segment,
    SourceInfo,
    Transcript,
    WriteOptions,
    file_warning,
    hallucination,
    quality_warnings,
    write_formats,
    write_warnings,
)
from traxd.pipeline.openai_api import OpenAIEndpoint, UnusableAnswer, excerpt
from traxd.pipeline.plan import local_plan, transcribe_target
from traxd.pipeline.stitch import merge_chunks, split_at_silences
from traxd.pipeline.tasks import gather_all
from traxd.pipeline.whisper_pool import WhisperPool, WorkerSpec, model_path

OPENAI_DEFAULT_MODEL = "whisper-1"
ANSWERS = "transcribe-answers"  # in the job's folder: API answers per chunk, kept for retries
PREPARE_SHARE = 0.1  # of the step's progress, when it has to convert the audio itself


class Backend(Protocol):
    name: str

    async def transcribe(self, audio: Path, ctx: StepContext,
                         settings: TranscribeSettings | None = None) -> Transcript:
        """Transcribe one piece of 16 kHz mono audio; timestamps relative to its start.
        `settings` (the inbox's; default the backend's own) give language and beam."""
        ...

    async def aclose(self) -> None: ...


def english_only(model: str) -> bool:
    """Whether a model only knows English (tiny.en, base.en, ...)."""
    return Path(model).name.endswith(".en")


def spoken_language(settings: TranscribeSettings) -> str | None:
    """The configured language; `en` for an English-only model; else None (detect)."""
    if settings.language:
        return settings.language
    return "en" if settings.backend == "local" and english_only(settings.model) else None


def subtitle_options(settings: TranscribeSettings) -> WriteOptions:
    return WriteOptions(settings.max_line_width, settings.max_line_count,
                        settings.word_timestamps)


# Settings that shape a backend itself (model processes, client); the rest (language,
# beam, layout) go with each request, so inboxes that differ only there share one.
BACKEND_KEYS = {
    "local": ("model", "device", "compute_type", "processes", "threads", "idle_unload_seconds"),
    "openai": ("model", "base_url", "api_key_env", "api_key_file", "timeout",
               "requests_per_minute", "max_concurrent"),
}


def backend_key(settings: TranscribeSettings) -> tuple[object, ...]:
    return (settings.backend, *(getattr(settings, k) for k in BACKEND_KEYS[settings.backend]))


# --- local: faster-whisper ----------------------------------------------------------------


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
            procs, threads = local_plan(self.settings)
            spec = WorkerSpec(model_path(self.settings.model), self.settings.model,
                              self.settings.device, self.settings.compute_type, threads)
            self._pool = WhisperPool(spec, procs, self.settings.idle_unload_seconds,
                                     get_logger(backend="local"))
        return self._pool

    def request(self, audio: Path, settings: TranscribeSettings | None = None) -> dict[str, Any]:
        """One file's request to a model process; `settings` (the inbox's) choose the
        language, beam and timings; the model is this backend's."""
        ts = settings or self.settings
        # The voice filter joins the speech it finds end to end; whisper's segment times on
        # that joined audio land on the wrong side of a removed pause (seconds off, and
        # varying from run to run). Word times are mapped back one by one, and segments
        # take theirs. Cues split at word boundaries need word times too.
        words = ts.vad_filter or ts.word_timestamps or subtitle_options(ts).splits
        batched = ts.long_audio_seconds > 0 and ts.vad_filter  # batches come from the VAD
        return {"audio": str(audio.absolute()), "language": spoken_language(ts),
                "task": ts.task, "beam_size": ts.beam_size, "vad_filter": ts.vad_filter,
                "batch_size": ts.batch_size if batched else 0,
                "long_audio_seconds": ts.long_audio_seconds,
                "word_timestamps": words}

    async def transcribe(self, audio: Path, ctx: StepContext,
                         settings: TranscribeSettings | None = None) -> Transcript:
        async with self.pool().worker() as worker:
            data = await worker.transcribe(self.request(audio, settings), ctx.limits,
                                           ctx.progress)
        if data.get("batched"):
            ctx.log.info("transcribed_batched", chunk=audio.name,
                         seconds=round(float(data["duration"]), 3))
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
    """A Transcript from verbose_json (segments) or plain json (one segment); anything
    else (an HTML error page with status 200, fields missing or null) is UnusableAnswer."""
    if isinstance(response, str):  # the client hands back the text of a non-JSON answer
        raise UnusableAnswer(f"not JSON: {excerpt(response)!r}")
    text = getattr(response, "text", None)
    if not isinstance(text, str):
        raise UnusableAnswer("no text in the answer")
    language = getattr(response, "language", None)
    duration = _seconds(getattr(response, "duration", None) or 0.0, "duration")
    raw_segments = getattr(response, "segments", None) or ()
    if not isinstance(raw_segments, list | tuple):
        raise UnusableAnswer("segments is not a list")
    segments = tuple(_segment(i, s) for i, s in enumerate(raw_segments))
    if not segments and text.strip():
        segments = (Segment(0.0, duration, text.strip()),)
    return Transcript(segments, language if isinstance(language, str) else None, duration,
                      model)


def _segment(index: int, raw: object) -> Segment:
    start = _seconds(getattr(raw, "start", None), f"segment {index} start")
    end = _seconds(getattr(raw, "end", None), f"segment {index} end")
    text = getattr(raw, "text", None)
    if not isinstance(text, str):
        raise UnusableAnswer(f"segment {index} has no text")
    logprob, no_speech = getattr(raw, "avg_logprob", None), getattr(raw, "no_speech_prob", None)
    return Segment(start, max(start, end), text.strip(),
                   float(logprob) if isinstance(logprob, int | float) else None,
                   float(no_speech) if isinstance(no_speech, int | float) else None)


def _seconds(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value) or value < 0:
        raise UnusableAnswer(f"{what} is {value!r}, not a time in seconds")
    return float(value)


def check_upload_size(audio: Path) -> None:
    size = audio.stat().st_size
    if size > UPLOAD_LIMIT_BYTES:
        raise Permanent(f"{audio.name} is {size / 2**20:.1f} MB, over the 25 MB upload limit",
                        reason="too_large")


class OpenAIBackend:
    """POST /audio/transcriptions per chunk, under the provider's rate limit.

    Each chunk's transcript is kept beside the step's folder (ANSWERS), so that when one
    chunk fails and the job is tried again, the chunks already paid for are not sent again.
    """

    name = "openai"

    def __init__(self, settings: TranscribeSettings, stall_seconds: float | None = None) -> None:
        self.settings = settings
        self.model = OPENAI_DEFAULT_MODEL if settings.model == "tiny.en" else settings.model
        self.api = OpenAIEndpoint(
            backend="openai", base_url=settings.base_url, api_key_env=settings.api_key_env,
            api_key_file=settings.api_key_file,
            timeout=settings.timeout, requests_per_minute=settings.requests_per_minute,
            max_concurrent=settings.max_concurrent, stall_seconds=stall_seconds)
        self._verbose = True

    async def transcribe(self, audio: Path, ctx: StepContext,
                         settings: TranscribeSettings | None = None) -> Transcript:
        check_upload_size(audio)
        ts = settings or self.settings
        ask = Asking(ts.language, ts.task)
        kept = await asyncio.to_thread(self._kept_answer, audio, ctx.workdir, ask)
        if kept.is_file():
            ctx.log.info("chunk_answer_reused", chunk=audio.name)
            transcript = await asyncio.to_thread(Transcript.load, kept)
        else:
            transcript = await self._ask(audio, ctx, ask)
            await asyncio.to_thread(_keep, transcript, kept)
        ctx.progress(1.0)
        return transcript

    async def _ask(self, audio: Path, ctx: StepContext, ask: Asking) -> Transcript:
        try:
            return await self.api.call(self._request(audio, ask))
        except Permanent as exc:
            if not (self._verbose and _rejects_verbose(exc)):
                raise
            ctx.log.info("segments_unsupported", provider=self.api.provider, model=self.model)
            self._verbose = False
            return await self.api.call(self._request(audio, ask))

    def _kept_answer(self, audio: Path, workdir: Path, ask: Asking) -> Path:
        """Where the answer for this audio, from this provider and model, is kept."""
        key: list[object] = [self.api.base_url, self.model, ask.language]
        if ask.task != "transcribe":  # the names kept before translation existed stay valid
            key.append(ask.task)
        digest = hashlib.sha256(json.dumps(key).encode())
        with audio.open("rb") as data:
            digest.update(hashlib.file_digest(data, "sha256").digest())
        return workdir.parent / ANSWERS / f"{digest.hexdigest()}.json"

    def _request(self, audio: Path,
                 ask: Asking) -> Callable[[AsyncOpenAI], Awaitable[Transcript]]:
        verbose, model = self._verbose, self.model
        response_format: Literal["verbose_json", "json"] = "verbose_json" if verbose else "json"

        async def request(client: AsyncOpenAI) -> Transcript:
            result: object
            if ask.task == "translate":  # /audio/translations: English text, no language
                with warnings.catch_warnings():
                    # OpenAI deprecates it for its own whisper-1 (shut down 2027-02-26);
                    # the compatible servers (speaches, LocalAI, Groq) keep it.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    call = client.audio.translations.create(
                        file=audio, model=model, response_format=response_format)
                result = await call
            else:
                result = await client.audio.transcriptions.create(
                    file=audio, model=model, response_format=response_format,
                    timestamp_granularities=["segment"] if verbose else openai.omit,
                    language=ask.language or openai.omit)
            return parse_transcription(result, model)

        return request

    async def aclose(self) -> None:
        await self.api.aclose()


@dataclass(frozen=True)
class Asking:
    """What one request asks a transcription API for."""

    language: str | None
    task: str = "transcribe"


def make_backend(settings: TranscribeSettings, stall_seconds: float | None = None) -> Backend:
    if settings.backend == "openai":
        return OpenAIBackend(settings, stall_seconds)
    return LocalBackend(settings)


def _keep(transcript: Transcript, path: Path) -> None:
    write_atomic(path, json.dumps(transcript.to_dict(), ensure_ascii=False).encode())


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
        end = max(start, min(s.end, limit) if s.end > s.start else limit)
        words = tuple(dataclasses.replace(w, start=min(max(w.start, start), end),
                                          end=min(max(w.end, start), end)) for w in s.words)
        segments.append(dataclasses.replace(s, start=start, end=end, words=words))
    return dataclasses.replace(transcript, segments=tuple(segments), duration=limit)


def translated(transcript: Transcript, settings: TranscribeSettings,
               backend: str) -> Transcript:
    """A translation is English (subtitles are named `.en.srt`); what was spoken is kept:
    the configured language, else what the local model detected (an API's translation
    answer names its output's language, not the one spoken)."""
    spoken = settings.language or (transcript.language if backend == "local" else None)
    return dataclasses.replace(transcript, language="en", translated_from=spoken)


def beside(artifacts: Mapping[str, Path], stem: str, language: str | None) -> dict[str, Path]:
    """The srt and vtt again, to be placed beside the original as `<name>.<lang>.srt`."""
    tag = f".{language}" if language else ""
    return {f"{BESIDE}{tag}.{fmt}": artifacts[f"{stem}.{fmt}"] for fmt in ("srt", "vtt")
            if f"{stem}.{fmt}" in artifacts}


def _scaled(report: Callable[[float], None], span: float) -> Callable[[float], None]:
    return lambda fraction: report(span * fraction)


class TranscribeStep:
    """Transcribe the chunks preprocess made (or make them), merge, write the formats."""

    name = "transcribe"
    needs_workdir = True

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        self._given = backend
        self._backends: dict[tuple[object, ...], Backend] = {}
        self.tools = LazyTools()

    @property
    def backend(self) -> Backend:
        """The backend of the global [transcribe] section."""
        return self.backend_for(self.settings.transcribe)

    def backend_for(self, settings: TranscribeSettings) -> Backend:
        """The backend for one inbox's settings: one per model and its process settings,
        shared by every inbox that names the same (each request carries its language)."""
        if self._given is not None:
            return self._given
        key = backend_key(settings)
        if key not in self._backends:
            self._backends[key] = make_backend(settings, self.settings.daemon.stall_seconds)
        return self._backends[key]

    async def run(self, ctx: StepContext) -> StepResult:
        started = time.monotonic()
        ts = ctx.settings.transcribe  # the inbox's own, merged over [transcribe]
        backend = self.backend_for(ts)
        ctx = dataclasses.replace(ctx, log=ctx.log.bind(backend=backend.name))
        chunks, duration, start, warnings = await self._chunks(
            ctx, transcribe_target(ts, backend.name))
        progress = ChunkProgress(ctx.progress, [c.duration for c in chunks], start)
        parts = await self._transcribe_all(chunks, progress, ctx, backend)
        transcript = merge_chunks(parts, duration=duration)
        if transcript.language is None and (language := spoken_language(ts)):
            transcript = dataclasses.replace(transcript, language=language)
        if ts.task == "translate":
            transcript = translated(transcript, ts, backend.name)
        return self._publish(ctx, transcript, time.monotonic() - started, warnings)

    async def _chunks(
        self, ctx: StepContext, target: ChunkTarget,
    ) -> tuple[list[Chunk], float, float, list[dict[str, str]]]:
        """Chunks from the facts of preprocess when they suit the backend (`target`), else
        made here (no preprocess step before this one); the share of progress used so far;
        the warnings about the file so far."""
        warnings = [dict(w) for w in ctx.facts.get(WARNINGS_FACT) or ()]
        chunks = [Chunk.from_fact(f) for f in ctx.facts.get("chunks") or ()]
        if chunks and all(c.path.suffix == target.format.suffix and c.path.is_file()
                          for c in chunks):
            return chunks, float(ctx.facts["duration"]), 0.0, warnings
        folder = ctx.workdir / "audio"
        folder.mkdir(exist_ok=True)
        sub = dataclasses.replace(ctx, progress=_scaled(ctx.progress, PREPARE_SHARE))
        prepared = await prepare_audio(sub, folder, self.tools.get(), target)
        return (list(prepared.chunks), prepared.duration, PREPARE_SHARE,
                [*warnings, *prepared.warnings])

    async def _transcribe_all(self, chunks: Sequence[Chunk], progress: ChunkProgress,
                              ctx: StepContext,
                              backend: Backend) -> list[tuple[float, Transcript]]:
        """All chunks side by side; the backend's pool or rate limit bounds how many run."""
        results = await gather_all(
            backend.transcribe(chunk.path, dataclasses.replace(
                ctx, progress=progress.reporter(index)), ctx.settings.transcribe)
            for index, chunk in enumerate(chunks))
        return [(c.offset, fit(split_at_silences(t), c.duration))
                for c, t in zip(chunks, results, strict=True)]

    def _publish(self, ctx: StepContext, transcript: Transcript, elapsed: float,
                 file_warnings: list[dict[str, str]]) -> StepResult:
        out = ctx.workdir / "out"
        out.mkdir(exist_ok=True)
        data = transcript.save(ctx.workdir / "transcript.json")
        timings = {**dict(ctx.facts.get("timings") or {}), self.name: round(elapsed, 3)}
        invented = hallucination(transcript)
        if invented is not None:
            ctx.log.warning("hallucination_suspected", why=invented)
            file_warnings = [*file_warnings, file_warning(self.name, "hallucination", invented)]
        source = SourceInfo(ctx.job.filename, ctx.job.sha256, timings,
                            tuple(w["message"] for w in file_warnings))
        artifacts = write_formats(transcript, ctx.formats, out, ctx.job.stem, source,
                                  subtitle_options(ctx.settings.transcribe))
        if ctx.settings.transcribe.subtitles in ("beside", "library"):
            artifacts.update(beside(artifacts, ctx.job.stem, transcript.language))
        artifacts.update(write_warnings(out, ctx.job.stem, ctx.job.name, file_warnings))
        warnings = quality_warnings(transcript)
        if warnings:
            ctx.log.warning("low_confidence_segments", count=len(warnings),
                            segments=[w.segment for w in warnings[:20]])
        if not transcript.segments:
            ctx.log.warning("no_speech_found", duration=round(transcript.duration, 3))
        facts: dict[str, Any] = {
            "transcript": str(data), "duration": transcript.duration,
            "language": transcript.language, "model": transcript.model,
            "language_probability": transcript.language_probability,
            "segments": len(transcript.segments), "quality_warnings": len(warnings),
            "hallucination": invented is not None}
        if file_warnings:
            facts[WARNINGS_FACT] = file_warnings
        return StepResult(artifacts=artifacts, facts=facts)

    async def aclose(self) -> None:
        backends = [self._given] if self._given is not None else list(self._backends.values())
        self._backends = {}
        for backend in backends:
            await backend.aclose()
