"""Transcript writers: txt, srt, vtt (read back by ffmpeg), json with quality warnings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from traxd.pipeline.formats import (
    Segment,
    SourceInfo,
    Transcript,
    merge,
    to_srt,
    to_vtt,
    write_formats,
)

from .helpers import ffmpeg

TRANSCRIPT = Transcript(
    segments=(
        Segment(0.0, 2.5, " Hello there, <friend> & co.", -0.2, 0.01),
        Segment(2.5, 3661.25, "Second line\nwith a break --> and an arrow.", -0.4, 0.02),
        Segment(3661.25, 3662.0, "  ", -0.1, 0.0),  # empty: no cue
        Segment(3662.0, 3663.0, "mumble", -1.6, 0.8),  # low confidence, probably noise
    ),
    language="en", duration=3663.5, model="tiny.en")
SOURCE = SourceInfo("talk.mp3", "ab" * 32, {"preprocess": 1.5})


def ass_dialogue(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("Dialogue:")]


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles_are_read_back_by_ffmpeg(tmp_path: Path, fmt: str) -> None:
    # Given a transcript written as subtitles
    written = write_formats(TRANSCRIPT, [fmt], tmp_path, "talk", SOURCE)
    # When ffmpeg converts them to ASS
    ass = tmp_path / f"{fmt}.ass"
    ffmpeg("-i", str(written[f"talk.{fmt}"]), str(ass))
    # Then every non-empty segment is one dialogue line with its times and text
    lines = ass_dialogue(ass)
    assert len(lines) == 3
    assert "0:00:00.00,0:00:02.50" in lines[0] and "Hello there" in lines[0]
    assert "0:00:02.50,1:01:01.25" in lines[1] and "and an arrow" in lines[1]
    assert "1:01:02.00,1:01:03.00" in lines[2] and "mumble" in lines[2]


def test_srt_and_vtt_text() -> None:
    srt = to_srt(TRANSCRIPT)
    assert srt.startswith("1\n00:00:00,000 --> 00:00:02,500\nHello there, <friend> & co.\n")
    assert "01:01:01,250" in srt and "break -> and" in srt
    vtt = to_vtt(TRANSCRIPT)
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\n")
    assert "Hello there, &lt;friend&gt; &amp; co." in vtt
    assert vtt.count(" --> ") == 3  # the arrow in the text was defused


def test_json_carries_source_timings_confidence_and_warnings(tmp_path: Path) -> None:
    written = write_formats(TRANSCRIPT, ["json", "txt"], tmp_path, "talk", SOURCE)
    doc = json.loads(written["talk.json"].read_text())
    assert {k: doc[k] for k in ("source", "sha256", "duration", "model", "language")} == {
        "source": "talk.mp3", "sha256": "ab" * 32, "duration": 3663.5, "model": "tiny.en",
        "language": "en"}
    assert doc["timings"] == {"preprocess": 1.5}
    assert [s["start"] for s in doc["segments"]] == [0.0, 2.5, 3661.25, 3662.0]
    assert doc["segments"][0]["confidence"] == pytest.approx(0.8187, abs=1e-3)
    assert [(w["segment"], len(w["problems"])) for w in doc["warnings"]] == [(3, 2)]
    assert written["talk.txt"].read_text().splitlines() == [
        "Hello there, <friend> & co.", "Second line with a break -> and an arrow.", "mumble"]


def test_transcript_round_trip_and_merge(tmp_path: Path) -> None:
    path = TRANSCRIPT.save(tmp_path / "t.json")
    assert Transcript.load(path) == TRANSCRIPT
    part = Transcript((Segment(0.5, 1.5, "a"),), "en", 2.0, "m")
    merged = merge([(0.0, part), (10.0, part)], duration=12.0)
    assert [(s.start, s.end) for s in merged.segments] == [(0.5, 1.5), (10.5, 11.5)]
    assert (merged.language, merged.model, merged.duration) == ("en", "m", 12.0)
