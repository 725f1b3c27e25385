"""The openai backend through the real `openai` client against a real local HTTP server."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from traxd.config import Settings
from traxd.errors import BackendFatal, Permanent, Retry
from traxd.executor import preprocess_settings
from traxd.metrics import REGISTRY
from traxd.pipeline.ffmpeg import PreprocessStep
from traxd.pipeline.formats import Segment, Transcript
from traxd.pipeline.transcribe import TranscribeStep
from traxd.ratelimit import MAX_HOLD, RateLimiter

from .conftest import ContextFactory, Media, with_changes
from .helpers import ffprobe_stream
from .openai_server import FakeOpenAI, Reply, Request, dribble, error, html_page, verbose_json


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI().running() as running:
        yield running


def openai_settings(tmp_path: Path, server: FakeOpenAI, key_env: str, **extra: object) -> Settings:
    return with_changes(Settings(), daemon={"state_dir": tmp_path}, transcribe={
        "backend": "openai", "base_url": server.base_url, "api_key_env": key_env,
        "chunk_seconds": 8.0, **extra})


def requests_counted(status: str) -> float:
    value = REGISTRY.get_sample_value("traxd_api_requests_total",
                                      {"provider": "127.0.0.1", "status": status})
    return value or 0.0


async def test_chunks_are_uploaded_and_timestamps_shifted(
        media: Media, make_ctx: ContextFactory, server: FakeOpenAI, api_key: str,
        tmp_path: Path) -> None:
    # Given ~20 s of speech preprocessed into 8 s chunks for the openai backend
    settings = openai_settings(tmp_path, server, api_key)
    ctx, _ = make_ctx(media.long_wav, settings=settings, formats=("json", "srt"),
                      step_settings=preprocess_settings(settings, ["transcribe"]))
    prepared = await PreprocessStep(settings).run(ctx)
    offsets = [c["offset"] for c in prepared.facts["chunks"]]
    ctx, progress = make_ctx(media.long_wav, settings=settings, facts=prepared.facts,
                             formats=("json", "srt"))
    counted = requests_counted("200")
    step = TranscribeStep(settings)
    # When they are transcribed
    try:
        result = await step.run(ctx)
    finally:
        await step.aclose()
    # Then one verbose_json request per chunk went out, with the key, model and an mp3
    assert len(server.requests) == len(offsets) >= 3
    for request in server.requests:
        assert request.path == "/v1/audio/transcriptions"
        assert request.headers["authorization"] == "Bearer sk-test-" + "x" * 24
        assert request.fields["model"] == "whisper-1"
        assert request.fields["response_format"] == "verbose_json"
        upload = tmp_path / "upload.mp3"
        upload.write_bytes(request.files["file"])
        assert ffprobe_stream(upload)["sample_rate"] == "16000"
    # And each chunk's segments (0.5 s and 2.0 s into it) are shifted by the chunk's offset
    starts = [s.start for s in _segments(result.facts["transcript"])]
    assert starts == pytest.approx([o + d for o in offsets for d in (0.5, 2.0)])
    assert requests_counted("200") == counted + len(offsets)
    assert result.facts["model"] == "whisper-1" and progress[-1] == pytest.approx(1.0)


def _segments(path: str) -> list[Segment]:
    return list(Transcript.load(Path(path)).segments)


async def transcribe_once(media: Media, make_ctx: ContextFactory, settings: Settings) -> None:
    step = TranscribeStep(settings)
    ctx, _ = make_ctx(media.speech_wav, settings=settings)
    try:
        await step.run(ctx)
    finally:
        await step.aclose()


@pytest.mark.parametrize(("reply", "expected", "kind"), [
    (error(500, "boom"), "answered 500", Retry),
    (error(503, "busy"), "answered 503", Retry),
    (error(400, "bad file"), "answered 400: bad file", Permanent),
    (error(404, "no such model"), "answered 404", Permanent),
    (error(422, "unprocessable"), "answered 422", Permanent),
    (error(401, "invalid key sk-live-abcdefghijk"), r"answered 401: invalid key \[redacted\]",
     BackendFatal),
    (error(403, "forbidden"), "answered 403", BackendFatal),
])
async def test_http_errors_are_classified(
        media: Media, make_ctx: ContextFactory, server: FakeOpenAI, api_key: str,
        tmp_path: Path, reply: Reply, expected: str, kind: type[Exception]) -> None:
    server.script.append(reply)
    counted = requests_counted(str(reply.status))
    with pytest.raises(kind, match=expected) as caught:
        await transcribe_once(media, make_ctx, openai_settings(tmp_path, server, api_key))
    if isinstance(caught.value, BackendFatal):
        assert caught.value.backend == "openai"
    assert requests_counted(str(reply.status)) == counted + 1


async def test_missing_key_is_backend_fatal(media: Media, make_ctx: ContextFactory,
                                            server: FakeOpenAI, tmp_path: Path) -> None:
    settings = openai_settings(tmp_path, server, "TRAXD_TEST_NO_SUCH_KEY")
    with pytest.raises(BackendFatal, match="TRAXD_TEST_NO_SUCH_KEY") as caught:
        await transcribe_once(media, make_ctx, settings)
    assert caught.value.backend == "openai" and server.requests == []


async def test_a_key_file_is_read_again_after_the_backend_was_paused(
        media: Media, make_ctx: ContextFactory, server: FakeOpenAI, tmp_path: Path) -> None:
    # Given the key named as a file that is not there yet
    key_file = tmp_path / "openai.key"
    settings = openai_settings(tmp_path, server, "TRAXD_TEST_NO_SUCH_KEY",
                               api_key_file=key_file)
    step = TranscribeStep(settings)
    ctx, _ = make_ctx(media.speech_wav, settings=settings)
    try:
        # When the step runs, it pauses the backend, saying where the key goes
        with pytest.raises(BackendFatal, match=f"put the key in {key_file}.*traxd resume"):
            await step.run(ctx)
        # When a wrong key is put there, the provider's 401 pauses it again
        key_file.write_text("sk-wrong-1234567890\n")
        server.script.append(error(401, "invalid key"))
        with pytest.raises(BackendFatal, match="answered 401"):
            await step.run(ctx)
        # Then the right key put there is read on the next run (as after `traxd resume`)
        key_file.write_text("sk-right-1234567890\n")
        await step.run(ctx)
    finally:
        await step.aclose()
    assert [r.headers["authorization"] for r in server.requests] == [
        "Bearer sk-wrong-1234567890", "Bearer sk-right-1234567890"]


async def test_unreachable_server_is_a_retry(media: Media, make_ctx: ContextFactory,
                                             api_key: str, tmp_path: Path) -> None:
    with FakeOpenAI().running() as gone:
        settings = openai_settings(tmp_path, gone, api_key)
    counted = requests_counted("error")
    with pytest.raises(Retry, match="cannot connect"):
        await transcribe_once(media, make_ctx, settings)
    assert requests_counted("error") == counted + 1


async def test_server_without_segments_falls_back_to_plain_text(
        media: Media, make_ctx: ContextFactory, server: FakeOpenAI, api_key: str,
        tmp_path: Path) -> None:
    # Given a server that rejects verbose_json and answers plain json
    server.script.append(error(400, "response_format 'verbose_json' is not supported"))
    server.transcribe = lambda request: Reply(200, {"text": " Hello from the server. "})
    settings = openai_settings(tmp_path, server, api_key, language="en")
    step = TranscribeStep(settings)
    ctx, _ = make_ctx(media.speech_wav, settings=settings, formats=("txt",))
    try:
        result = await step.run(ctx)
    finally:
        await step.aclose()
    # Then it asked again for plain json and made one segment spanning the audio
    assert [r.fields.get("response_format") for r in server.requests] == ["verbose_json", "json"]
    assert server.requests[1].fields["language"] == "en"
    (segment,) = _segments(result.facts["transcript"])
    assert segment.text == "Hello from the server."
    assert segment.end == pytest.approx(result.facts["duration"])
    assert result.artifacts["speech.txt"].read_text() == "Hello from the server.\n"


# --- the rate limiter ---------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_limiter_spaces_requests_per_minute() -> None:
    clock = FakeClock()
    limiter = RateLimiter(2, 10, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        async with limiter.slot():
            clock.now += 1.0
    # the third request waits until the first is a minute old
    assert clock.slept == [pytest.approx(58.0)]


async def test_limiter_hold_pauses_everyone() -> None:
    clock = FakeClock()
    limiter = RateLimiter(0, 10, clock=clock, sleep=clock.sleep)
    limiter.hold(7.0)
    async with limiter.slot():
        pass
    assert clock.slept == [7.0]


async def test_a_day_long_retry_after_holds_the_provider_only_briefly() -> None:
    # Given a provider answering 429 with Retry-After: 86400
    clock = FakeClock()
    limiter = RateLimiter(0, 10, clock=clock, sleep=clock.sleep)
    # When the limiter is told to hold
    held = limiter.hold(86400.0)
    async with limiter.slot():
        pass
    # Then every other job waits at most MAX_HOLD, not a day
    assert held == MAX_HOLD
    assert clock.slept == [MAX_HOLD]


async def test_limiter_bounds_requests_in_flight() -> None:
    limiter = RateLimiter(0, 2)
    inside = 0
    most = 0
    release = asyncio.Event()
    two_in = asyncio.Event()

    async def request() -> None:
        nonlocal inside, most
        async with limiter.slot():
            inside += 1
            most = max(most, inside)
            if inside == 2:
                two_in.set()
            await release.wait()
            inside -= 1

    tasks = [asyncio.create_task(request()) for _ in range(5)]
    await two_in.wait()
    release.set()
    await asyncio.gather(*tasks)
    assert most == 2


# --- answers that are not transcripts (issue 13, item 8) ----------------------------------


def null_start(request: Request) -> Reply:
    reply = verbose_json(request)
    reply.body["segments"][1]["start"] = None
    return reply


@pytest.mark.parametrize(("reply", "expected"), [
    (html_page(), r"127\.0\.0\.1: unusable answer: not JSON: '<html><body><h1>502 Bad Gateway"),
    (Reply(200, '{"text": "cut off', content_type="application/json"),
     r"127\.0\.0\.1: unusable answer: invalid JSON"),
    (Reply(200, {"segments": []}), r"127\.0\.0\.1: unusable answer: no text"),
    (None, r"127\.0\.0\.1: unusable answer: segment 1 start is None, not a time"),
])
async def test_an_answer_that_is_no_transcript_is_a_provider_retry(
        media: Media, make_ctx: ContextFactory, server: FakeOpenAI, api_key: str,
        tmp_path: Path, reply: Reply | None, expected: str) -> None:
    # Given a server answering 200 with an HTML page, broken JSON, or a segment without time
    if reply is None:
        server.transcribe = null_start
    else:
        server.script.append(reply)
    settings = openai_settings(tmp_path, server, api_key)
    step = TranscribeStep(settings)
    ctx, _ = make_ctx(media.speech_wav, settings=settings)
    counted = requests_counted("invalid")
    # When the speech is transcribed
    try:
        with pytest.raises(Retry, match=expected) as caught:
            await step.run(ctx)
    finally:
        await step.aclose()
    # Then it is a retryable provider error, and nothing was written as a transcript
    assert caught.value.reason == "bad_response"
    assert not (ctx.workdir / "out").exists() and not (ctx.workdir / "transcript.json").exists()
    assert requests_counted("invalid") == counted + 1


# --- requests that never end (issue 13, item 5) -------------------------------------------


async def test_a_dribbling_answer_ends_at_the_request_deadline(
        media: Media, make_ctx: ContextFactory, server: FakeOpenAI, api_key: str,
        tmp_path: Path) -> None:
    # Given a server sending a byte every 0.5 s (no read ever waits long) and a 2 s timeout
    server.script.append(dribble(0.5))
    settings = openai_settings(tmp_path, server, api_key, timeout=2.0)
    started = time.monotonic()
    # When a chunk is transcribed
    with pytest.raises(Retry, match=r"127\.0\.0\.1: no complete answer within 2 s") as caught:
        await transcribe_once(media, make_ctx, settings)
    # Then the whole request ended at its deadline, not when the server finished (200 s)
    assert time.monotonic() - started < 30
    assert caught.value.reason == "timeout"


async def test_a_silent_server_is_a_stall_after_stall_seconds(
        media: Media, make_ctx: ContextFactory, server: FakeOpenAI, api_key: str,
        tmp_path: Path) -> None:
    # Given a server that sends its headers and then nothing, a 10 min request timeout, and
    # stall_seconds of 1 s
    server.script.append(Reply(200, {"text": "late"}, pause=120))
    settings = with_changes(openai_settings(tmp_path, server, api_key),
                            daemon={"state_dir": tmp_path, "stall_seconds": 1.0})
    started = time.monotonic()
    # When a chunk is transcribed
    with pytest.raises(Retry, match=r"127\.0\.0\.1: request stalled: nothing received for 1 s"):
        await transcribe_once(media, make_ctx, settings)
    # Then it is stopped as stalled long before the request timeout
    assert time.monotonic() - started < 30


# --- rate limits and chunks already done (issue 13, item 7) -------------------------------


def fails_once(at: int, failure: Reply) -> Callable[[Request], Reply]:
    """Answers normally, except `failure` for the at-th upload (1-based)."""
    count = itertools.count(1)

    def answer(request: Request) -> Reply:
        return failure if next(count) == at else verbose_json(request)

    return answer


def uploads_per_chunk(server: FakeOpenAI) -> list[int]:
    return sorted(Counter(hashlib.sha256(r.files["file"]).hexdigest()
                          for r in server.requests).values())


async def three_chunks(media: Media, make_ctx: ContextFactory, settings: Settings
                       ) -> dict[str, Any]:
    ctx, _ = make_ctx(media.long_wav, settings=settings,
                      step_settings=preprocess_settings(settings, ["transcribe"]))
    prepared = await PreprocessStep(settings).run(ctx)
    assert len(prepared.facts["chunks"]) == 3
    return prepared.facts


async def test_a_429_is_waited_out_and_only_its_chunk_is_sent_again(
        media: Media, make_ctx: ContextFactory, server: FakeOpenAI, api_key: str,
        tmp_path: Path) -> None:
    # Given three chunks, one at a time, and a server that answers the second upload with
    # 429 and Retry-After: 1
    settings = openai_settings(tmp_path, server, api_key, max_concurrent=1)
    facts = await three_chunks(media, make_ctx, settings)
    server.transcribe = fails_once(2, error(429, "slow down", **{"Retry-After": "1"}))
    step = TranscribeStep(settings)
    ctx, _ = make_ctx(media.long_wav, settings=settings, facts=facts)
    # When they are transcribed
    try:
        result = await step.run(ctx)
    finally:
        await step.aclose()
    # Then the step waited and finished, sending only the rate-limited chunk twice
    assert result.facts["segments"] == 6
    assert uploads_per_chunk(server) == [1, 1, 2]


async def test_a_429_longer_than_the_wait_limit_is_a_retry_with_its_delay(
        media: Media, make_ctx: ContextFactory, server: FakeOpenAI, api_key: str,
        tmp_path: Path) -> None:
    server.script.append(error(429, "come back tomorrow", **{"Retry-After": "86400"}))
    counted = requests_counted("429")
    with pytest.raises(Retry, match="answered 429: come back tomorrow") as caught:
        await transcribe_once(media, make_ctx, openai_settings(tmp_path, server, api_key))
    assert caught.value.defer == 86400.0 and len(server.requests) == 1
    assert requests_counted("429") == counted + 1


async def test_chunks_done_before_a_failure_are_not_sent_again_on_retry(
        media: Media, make_ctx: ContextFactory, server: FakeOpenAI, api_key: str,
        tmp_path: Path) -> None:
    # Given three chunks, one at a time, and a server failing the second upload with a 500
    settings = openai_settings(tmp_path, server, api_key, max_concurrent=1)
    facts = await three_chunks(media, make_ctx, settings)
    server.transcribe = fails_once(2, error(500, "boom"))
    step = TranscribeStep(settings)
    try:
        first, _ = make_ctx(media.long_wav, settings=settings, facts=facts)
        with pytest.raises(Retry, match="answered 500"):
            await step.run(first)
        # When the job is tried again (a new, empty folder for the step)
        again, _ = make_ctx(media.long_wav, settings=settings, facts=facts)
        result = await step.run(again)
    finally:
        await step.aclose()
    # Then the first chunk's answer was kept: no chunk was paid for twice but the failed one
    assert result.facts["segments"] == 6
    assert uploads_per_chunk(server) == [1, 1, 2]
