"""The enhance step through the real `openai` client against a real local HTTP server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from traxd.config import Settings
from traxd.errors import BackendFatal, Permanent, Retry
from traxd.pipeline.base import StepResult
from traxd.pipeline.enhance import EnhanceStep, normalise, plan_windows
from traxd.pipeline.formats import WARNINGS_FACT, Segment, Transcript

from .conftest import ContextFactory, with_changes
from .openai_server import FakeOpenAI, error, html_page

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
    server.script.append(error(status, "no", **{"Retry-After": "86400"}))  # past the wait
    settings = enhance_settings(tmp_path, server, api_key, window_words=500)
    with pytest.raises(kind) as caught:
        await enhance(make_ctx, tmp_path, settings)
    if isinstance(caught.value, BackendFatal):
        assert caught.value.backend == "enhance"
    if isinstance(caught.value, Retry) and status == 429:
        assert caught.value.defer == 86400.0


async def test_without_a_transcript_it_is_permanent(make_ctx: ContextFactory,
                                                    tmp_path: Path) -> None:
    source = tmp_path / "talk.mp3"
    source.write_bytes(b"x")
    ctx, _ = make_ctx(source)
    with pytest.raises(Permanent, match="put 'transcribe' before 'enhance'"):
        await EnhanceStep(ctx.settings).run(ctx)


async def test_an_html_page_is_a_provider_retry_not_an_edit(
        make_ctx: ContextFactory, server: FakeOpenAI, api_key: str, tmp_path: Path) -> None:
    server.script.append(html_page())
    settings = enhance_settings(tmp_path, server, api_key, window_words=500)
    with pytest.raises(Retry, match=r"127\.0\.0\.1: unusable answer: not JSON: '<html>") as caught:
        await enhance(make_ctx, tmp_path, settings)
    assert caught.value.reason == "bad_response"


# --- text the model adds (issue 13, item 10) ----------------------------------------------

LONG = " ".join(f"word{i}" for i in range(1400))
INJECTED = "Send your password and the code from your bank to support at example dot org."


def invent_every_tenth(text: str) -> str:
    """140 words in 1,400 that were never said, one after every tenth word: 9 % changed."""
    return " ".join(f"{w} extra{i}" if i % 10 == 9 else w for i, w in enumerate(text.split()))


@pytest.mark.parametrize(("editor", "problem"), [
    (lambda text: punctuate(text) + " " + INJECTED, "added 15 words in a row that were not said"),
    (invent_every_tenth, "added 140 words that were not said"),
])
async def test_guard_rejects_text_the_model_added(
        make_ctx: ContextFactory, server: FakeOpenAI, api_key: str, tmp_path: Path,
        editor: Callable[[str], str], problem: str) -> None:
    # Given a 1,400-word window and an editor that appends an instruction or invents words
    server.chat = editor
    settings = enhance_settings(tmp_path, server, api_key, window_words=1500)
    # When the transcript is enhanced
    result = await enhance(make_ctx, tmp_path, settings, text=LONG)
    # Then the raw words are kept: nothing the model wrote reaches the output
    assert result.artifacts["talk.enhanced.md"].read_text().split() == LONG.split()
    assert result.facts["enhanced"] is False
    (warning,) = result.facts["enhance_warnings"]
    assert problem in warning and "kept the raw text" in warning
    # And the rejection is written in the warnings file beside the outputs
    body = json.loads(result.artifacts["talk.warnings.json"].read_text())
    (entry,) = body["warnings"]
    assert entry["step"] == "enhance" and entry["reason"] == "enhancement_rejected"
    assert problem in entry["message"]


async def test_reasoning_blocks_are_stripped(
        make_ctx: ContextFactory, server: FakeOpenAI, api_key: str, tmp_path: Path) -> None:
    server.chat = lambda text: ("<think>\nThe user wants punctuation. I will add commas and "
                                "keep every word as it is.\n</think>\n\n" + punctuate(text))
    result = await enhance(make_ctx, tmp_path, enhance_settings(tmp_path, server, api_key))
    text = result.artifacts["talk.enhanced.md"].read_text()
    assert "think" not in text.lower() and "commas" not in text
    assert [normalise(w) for w in text.split()] == RAW.split()
    assert result.facts["enhanced"] is True and "talk.warnings.json" not in result.artifacts


async def test_a_rejection_keeps_the_warnings_of_earlier_steps(
        make_ctx: ContextFactory, server: FakeOpenAI, api_key: str, tmp_path: Path) -> None:
    server.chat = lambda text: text + " " + INJECTED
    settings = enhance_settings(tmp_path, server, api_key, window_words=500)
    transcript = Transcript((Segment(0.0, 60.0, RAW),), "en", 60.0, "tiny.en")
    earlier = {"step": "preprocess", "reason": "damaged", "message": "decoded 30 s of 60 s"}
    source = tmp_path / "talk.mp3"
    source.write_bytes(b"x")
    ctx, _ = make_ctx(source, settings=settings, facts={
        "transcript": str(transcript.save(tmp_path / "t.json")), WARNINGS_FACT: [earlier]})
    step = EnhanceStep(settings)
    try:
        result = await step.run(ctx)
    finally:
        await step.aclose()
    body = json.loads(result.artifacts["talk.warnings.json"].read_text())
    assert [w["step"] for w in body["warnings"]] == ["preprocess", "enhance"]
    assert result.facts[WARNINGS_FACT][0] == earlier
