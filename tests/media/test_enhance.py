"""The enhance step through the real `openai` client against a real local HTTP server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from traxd.config import Settings
from traxd.errors import BackendFatal, Permanent, Retry
from traxd.pipeline.base import StepResult
from traxd.pipeline.enhance import EnhanceStep, normalise, plan_windows
from traxd.pipeline.formats import Segment, Transcript

from .conftest import ContextFactory, with_changes
from .openai_server import FakeOpenAI, error

RAW = " ".join(f"word{i}" for i in range(180))  # every word different: stitching errors show


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI().running() as running:
        yield running


def enhance_settings(tmp_path: Path, server: FakeOpenAI, key_env: str, **extra: object
                     ) -> Settings:
    return with_changes(Settings(), daemon={"state_dir": tmp_path}, enhance={
        "base_url": server.base_url, "api_key_env": key_env, "model": "test-editor",
        "window_words": 50, "overlap_words": 10, **extra})


async def enhance(make_ctx: ContextFactory, tmp_path: Path, settings: Settings,
                  text: str = RAW) -> StepResult:
    transcript = Transcript((Segment(0.0, 60.0, text),), "en", 60.0, "tiny.en")
    source = tmp_path / "talk.mp3"
    source.write_bytes(b"x")
    ctx, _ = make_ctx(source, settings=settings,
                      facts={"transcript": str(transcript.save(tmp_path / "t.json"))})
    step = EnhanceStep(settings)
    try:
        return await step.run(ctx)
    finally:
        await step.aclose()


def punctuate(text: str) -> str:
    """An editor that keeps the words: capitals, commas, a paragraph break mid-way."""
    words = text.split()
    edited = [w.capitalize() + ("," if i % 7 == 6 else "") for i, w in enumerate(words)]
    middle = len(edited) // 2
    return " ".join(edited[:middle]) + ".\n\n" + " ".join(edited[middle:]) + "."


def test_windows_overlap_and_tile_the_text() -> None:
    windows = plan_windows(180, 50, 10)
    assert [(w.start, w.end) for w in windows] == [(0, 50), (40, 90), (80, 130), (120, 170),
                                                   (160, 180)]
    kept = [(w.keep_from, w.keep_to) for w in windows]
    assert kept == [(0, 45), (45, 85), (85, 125), (125, 165), (165, 180)]


async def test_windows_are_edited_and_stitched_word_for_word(
        make_ctx: ContextFactory, server: FakeOpenAI, api_key: str, tmp_path: Path) -> None:
    # Given a 180-word transcript, 50-word windows and an editor that keeps the words
    server.chat = punctuate
    # When it is enhanced
    result = await enhance(make_ctx, tmp_path, enhance_settings(tmp_path, server, api_key))
    # Then each window was one request with the system prompt and its words
    assert server.paths() == ["/v1/chat/completions"] * 5
    assert all(r.json["model"] == "test-editor" and r.json["messages"][0]["role"] == "system"
               for r in server.requests)
    # And the stitched text has every word once, in order, with the editor's punctuation
    text = result.artifacts["talk.enhanced.md"].read_text()
    assert [normalise(w) for w in text.split()] == RAW.split()
    assert "Word6," in text and "\n\n" in text
    assert result.facts["enhanced"] is True and result.facts["enhance_warnings"] == []


async def test_guard_keeps_the_raw_text_when_words_are_dropped(
        make_ctx: ContextFactory, server: FakeOpenAI, api_key: str, tmp_path: Path) -> None:
    # Given an editor that drops a third of the words (a summary, not an edit)
    server.chat = lambda text: " ".join(w for i, w in enumerate(text.split()) if i % 3)
    settings = enhance_settings(tmp_path, server, api_key, window_words=500)
    # When the transcript is enhanced
    result = await enhance(make_ctx, tmp_path, settings)
    # Then the raw words are kept and the rejection is recorded
    assert result.artifacts["talk.enhanced.md"].read_text().split() == RAW.split()
    assert result.facts["enhanced"] is False
    (warning,) = result.facts["enhance_warnings"]
    assert "kept the raw text" in warning and "33%" in warning


async def test_guard_allows_small_changes(
        make_ctx: ContextFactory, server: FakeOpenAI, api_key: str, tmp_path: Path) -> None:
    # an editor that changes one word in fifty: under the 15 % limit
    server.chat = lambda text: text.replace("word7 ", "Word seven ")
    result = await enhance(make_ctx, tmp_path, enhance_settings(tmp_path, server, api_key))
    assert "Word seven" in result.artifacts["talk.enhanced.md"].read_text()
    assert result.facts["enhance_warnings"] == []


@pytest.mark.parametrize(("status", "kind"), [(401, BackendFatal), (429, Retry),
                                              (500, Retry), (400, Permanent)])
async def test_errors_map_like_the_transcriber(
        make_ctx: ContextFactory, server: FakeOpenAI, api_key: str, tmp_path: Path,
        status: int, kind: type[Exception]) -> None:
    server.script.append(error(status, "no", **{"Retry-After": "3"}))
    settings = enhance_settings(tmp_path, server, api_key, window_words=500)
    with pytest.raises(kind) as caught:
        await enhance(make_ctx, tmp_path, settings)
    if isinstance(caught.value, BackendFatal):
        assert caught.value.backend == "enhance"
    if isinstance(caught.value, Retry) and status == 429:
        assert caught.value.defer == 3.0


async def test_without_a_transcript_it_is_permanent(make_ctx: ContextFactory,
                                                    tmp_path: Path) -> None:
    source = tmp_path / "talk.mp3"
    source.write_bytes(b"x")
    ctx, _ = make_ctx(source)
    with pytest.raises(Permanent, match="put 'transcribe' before 'enhance'"):
        await EnhanceStep(ctx.settings).run(ctx)
