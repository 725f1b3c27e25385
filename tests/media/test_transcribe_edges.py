"""Transcription edges: silence (whisper's hallucinations) and chunk cuts with no pause."""

from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from traxd.pipeline import ffmpeg as ffmpeg_module
from traxd.pipeline.ffmpeg import chunk_spans
from traxd.pipeline.formats import (
    WARNINGS_FACT,
    Segment,
    TimedWord,
    Transcript,
    hallucination,
)
from traxd.pipeline.stitch import merge_chunks, split_at_silences, stitch
from traxd.pipeline.transcribe import TranscribeStep

from .conftest import LONG_SENTENCES, ContextFactory
from .helpers import ffmpeg, words
from .test_transcribe_local import local_settings

# --- item 13: silence -------------------------------------------------------------------------


def lines(*texts: str, every: float = 30.0) -> Transcript:
    segments = tuple(Segment(i * every, i * every + 2.0, t) for i, t in enumerate(texts))
    return Transcript(segments, "en", len(texts) * every, "tiny.en")


def test_a_transcript_of_one_short_line_over_and_over_is_flagged() -> None:
    assert hallucination(lines(*["you"] * 6)) is not None
    assert "'thank you'" in (hallucination(lines("Thank you.", "thank you", " Thank you!",
                                                 "Hello there, how are you today?")) or "")
    assert hallucination(lines(".", ".", ".", "I")) is not None
    # real speech, even with a few short lines, is not
    assert hallucination(lines("Please remember the notes.", "you", "The weather is warm.",
                               "you", "We start on Monday morning.")) is None
    assert hallucination(lines("Yes.", "No.", "Maybe.")) is None
    assert hallucination(lines("you", "you")) is None  # too few to tell
    assert hallucination(lines()) is None


@pytest.fixture(scope="module")
def silence(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three minutes of digital silence (tiny.en makes six lines of "you" of it)."""
    out = tmp_path_factory.mktemp("silence") / "silence.wav"
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "180", str(out))
    return out


@pytest.fixture
async def default_step(tmp_path: Path) -> AsyncIterator[TranscribeStep]:
    step = TranscribeStep(local_settings(tmp_path))
    yield step
    await step.aclose()


@pytest.mark.slow
async def test_silence_gives_no_invented_lines_by_default(
        silence: Path, make_ctx: ContextFactory, default_step: TranscribeStep) -> None:
    # Given three minutes of silence and the local backend with its default settings
    ctx, _ = make_ctx(silence, settings=default_step.settings, formats=("txt", "json"))
    # When it is transcribed with the real model
    result = await default_step.run(ctx)
    # Then nothing was heard: no "you", no lines at all
    text = result.artifacts["silence.txt"].read_text()
    assert "you" not in words(text) and text.strip() == "", text
    assert result.facts["segments"] == 0 and result.facts["hallucination"] is False


@pytest.mark.slow
async def test_a_made_up_transcript_is_flagged(silence: Path, make_ctx: ContextFactory,
                                               tmp_path: Path) -> None:
    # Given the local backend with the voice filter turned off, as a user may configure it
    step = TranscribeStep(local_settings(tmp_path, vad_filter=False))
    ctx, _ = make_ctx(silence, settings=step.settings, formats=("txt", "json"))
    try:
        # When three minutes of silence are transcribed, and the model makes lines up
        result = await step.run(ctx)
    finally:
        await step.aclose()
    assert words(result.artifacts["silence.txt"].read_text()).count("you") >= 3
    # Then the transcript is flagged: a fact, the json output and a warnings file say so
    assert result.facts["hallucination"] is True
    [warning] = result.facts[WARNINGS_FACT]
    assert warning["reason"] == "hallucination" and "'you'" in warning["message"]
    doc = json.loads(result.artifacts["silence.json"].read_text())
    assert doc["flags"] == [warning["message"]]
    note = json.loads(result.artifacts["silence.warnings.json"].read_text())
    assert note == {"file": "silence.wav", "warnings": [warning]}


@pytest.fixture(scope="module")
def spaced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The five sentences, one every 8 s: pauses of 4-5 s that the voice filter cuts out."""
    folder = tmp_path_factory.mktemp("spaced")
    parts = []
    for index, sentence in enumerate(LONG_SENTENCES):
        raw, part = folder / f"raw-{index}.wav", folder / f"part-{index}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), sentence],
                       check=True)
        ffmpeg("-i", str(raw), "-af", f"apad=whole_dur={SPACING}", "-ac", "1", "-ar", "16000",
               str(part))
        parts.append(part)
    out = folder / "spaced.wav"
    inputs = [arg for part in parts for arg in ("-i", str(part))]
    ffmpeg(*inputs, "-filter_complex", f"concat=n={len(parts)}:v=0:a=1", str(out))
    return out


SPACING = 8.0


@pytest.mark.slow
async def test_the_voice_filter_keeps_segments_on_the_source_clock(
        spaced: Path, make_ctx: ContextFactory, default_step: TranscribeStep) -> None:
    # Given sentences 8 s apart, and the voice filter on (the default): it joins the speech
    # end to end, and whisper's own segment times on the joined audio are seconds early
    ctx, _ = make_ctx(spaced, settings=default_step.settings, formats=("json",))
    # When it is transcribed
    result = await default_step.run(ctx)
    segments = json.loads(result.artifacts["spaced.json"].read_text())["segments"]
    # Then each sentence starts where it is spoken
    for index, sentence in enumerate(LONG_SENTENCES):
        key = max(words(sentence), key=len)
        [start] = [s["start"] for s in segments if key in words(s["text"])]
        assert start == pytest.approx(index * SPACING, abs=0.6), (sentence, segments)


# --- item 15: cuts with no pause ------------------------------------------------------------


def test_cuts_with_no_pause_overlap_and_cuts_in_pauses_do_not() -> None:
    overlap = ffmpeg_module.OVERLAP
    assert 1.0 <= overlap <= 3.0  # a word or two, far less than a chunk
    # no pause anywhere: both sides of each cut are heard twice
    assert chunk_spans(25.0, 10.0, []) == [(0.0, 10.0 + overlap), (10.0 - overlap, 20.0 + overlap),
                                           (20.0 - overlap, 25.0)]
    # a cut in a pause is where one chunk ends and the next begins
    spans = chunk_spans(25.0, 10.0, [(8.0, 9.0)])
    assert spans[0] == (0.0, 8.5) and spans[1][0] == 8.5


def seg(start: float, end: float, text: str) -> Segment:
    return Segment(start, end, text, -0.2, 0.01)


def test_overlapping_chunks_keep_each_word_once() -> None:
    # Given two chunks that both heard [8, 12]: the first cut "meeting" at its end
    left = [seg(0.0, 4.0, "Please remember to bring"), seg(4.0, 12.0,
                                                            "your notes to the meet")]
    right = [seg(8.0, 11.5, "notes to the meeting."), seg(11.5, 15.0, "The weather is warm.")]
    # When they are stitched
    merged = stitch(left, right, 8.0, 12.0)
    # Then every word is there once, the whole word from the chunk that heard it whole
    text = " ".join(s.text for s in merged)
    assert text == "Please remember to bring your notes to the meeting. The weather is warm."
    # And times rise without overlapping; untouched segments keep their scores
    assert all(a.end <= b.start for a, b in itertools.pairwise(merged))
    assert merged[0] == left[0] and merged[-1] == right[-1]


def test_overlap_with_nothing_in_common_is_split_in_the_middle() -> None:
    left = [seg(0.0, 6.0, "alpha beta gamma"), seg(6.0, 10.0, "delta epsilon")]
    right = [seg(8.0, 9.0, "zeta"), seg(9.0, 12.0, "eta theta")]
    merged = stitch(left, right, 8.0, 10.0)
    # words are kept from the side of the middle (9 s) where they lie: "epsilon" (~7.7 to
    # 10 s) is the left's, "zeta" (8 to 9 s) is dropped, "eta" (~9 to 10.2 s) is the right's
    assert " ".join(s.text for s in merged) == "alpha beta gamma delta epsilon eta theta"


def test_merge_stitches_only_chunks_that_overlap() -> None:
    a = Transcript((seg(0.0, 5.0, "one two three four"),), "en", 6.0, "m")
    b = Transcript((seg(0.0, 3.0, "three four five six"),), "en", 6.0, "m")
    assert merge_chunks([(0.0, a), (4.0, b)], duration=10.0).text == \
        "one two three four five six"
    assert merge_chunks([(0.0, a), (6.0, b)], duration=12.0).text == \
        "one two three four three four five six"


NOISY_TEXT = ("The quick brown fox jumps over the lazy dog while the farmer walks slowly across "
              "the green field carrying a heavy basket of apples and pears toward the old wooden "
              "barn near the river where his children are waiting patiently for their "
              "afternoon snack")


@pytest.fixture(scope="module")
def noisy_speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~14 s of speech without a pause, over pink noise loud enough that no pause is found."""
    folder = tmp_path_factory.mktemp("noisy")
    speech = folder / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(speech), NOISY_TEXT],
                   check=True)
    out = folder / "noisy.wav"
    ffmpeg("-i", str(speech), "-f", "lavfi", "-i", "anoisesrc=r=22050:a=0.03:c=pink:seed=7",
           "-filter_complex", "[0][1]amix=inputs=2:duration=first:normalize=0",
           "-ac", "1", "-ar", "16000", str(out))
    return out


@pytest.mark.slow
async def test_cuts_in_continuous_speech_lose_and_double_no_word(
        noisy_speech: Path, make_ctx: ContextFactory, tmp_path: Path) -> None:
    # Given speech over noise and 5 s chunks: cuts at 5 s ("green") and 10 s ("near"),
    # with no pause to cut in
    step = TranscribeStep(local_settings(tmp_path, chunk_seconds=5.0))
    ctx, _ = make_ctx(noisy_speech, settings=step.settings, formats=("json",))
    try:
        # When it is transcribed
        result = await step.run(ctx)
    finally:
        await step.aclose()
    doc = json.loads(result.artifacts["noisy.json"].read_text())
    said = " ".join(words(" ".join(s["text"] for s in doc["segments"])))
    # Then the words at both cuts are there, once
    for phrase in ("across the green field", "near the river where", "while the farmer"):
        assert said.count(phrase) == 1, said
    assert abs(len(said.split()) - len(words(NOISY_TEXT))) <= 3, said
    # And the segments follow each other in time
    spans = [(s["start"], s["end"]) for s in doc["segments"]]
    assert all(a[1] <= b[0] + 1e-6 for a, b in itertools.pairwise(spans)), spans


def test_a_segment_that_spans_a_silence_is_cut_there_on_the_source_clock() -> None:
    # Given a segment (as the VAD filter makes them) holding the end of one passage at 183 s
    # and the whole next one, a minute later, with each word timed on the source's clock
    words = [TimedWord(183.1, 183.5, "for"), TimedWord(183.5, 184.2, "minutes."),
             TimedWord(240.0, 240.6, "Yesterday,"), TimedWord(240.6, 241.0, "a"),
             TimedWord(241.0, 241.9, "reporter.")]
    joined = Segment(183.1, 241.9, "for minutes. Yesterday, a reporter.", -0.2, 0.1,
                     tuple(words))
    # When it is split at silences
    split = split_at_silences(Transcript((joined,), "en", 300.0, "tiny.en"))
    # Then each passage is a segment of its own, at its own time
    assert [(s.start, s.end, s.text) for s in split.segments] == [
        (183.1, 184.2, "for minutes."), (240.0, 241.9, "Yesterday, a reporter.")]
    assert split.segments[1].avg_logprob == -0.2
    # And a segment without such a gap, or without timed words, is left as it is
    kept = Segment(10.0, 12.0, "Hello there.", words=(TimedWord(10.0, 10.5, "Hello"),
                                                      TimedWord(10.6, 12.0, "there.")))
    plain = Segment(20.0, 25.0, "No word times.")
    assert split_at_silences(Transcript((kept, plain), "en", 30.0, "m")).segments == (
        kept, plain)
