"""A recording longer than an hour through the real daemon: preprocess, the real model, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import base_daemon, files_under, running_daemon, wait_until, write_config

from .conftest import Media
from .helpers import ffmpeg, words

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PERIOD = 300.0  # one spoken sentence every five minutes
REPEATS = 13  # 65 minutes in all


def hour_long_episode(speech: Path, out: Path) -> None:
    """Speech at 0, 5, 10 ... 60 min, quiet in between, as a 65-minute mp3."""
    period = out.with_name("period.wav")
    ffmpeg("-i", str(speech), "-af", f"apad=whole_dur={PERIOD}", "-ac", "1", "-ar", "16000",
           str(period))
    ffmpeg("-stream_loop", str(REPEATS - 1), "-i", str(period), "-c:a", "libmp3lame",
           "-b:a", "32k", str(out))
    period.unlink()


def test_a_recording_over_an_hour_comes_out_whole_on_the_source_clock(
        media: Media, tmp_path: Path) -> None:
    # Given a daemon with the local model and 10-minute chunks
    root = tmp_path / "podcasts"
    (root / "inbox").mkdir(parents=True)
    config = write_config(
        tmp_path / "traxd.toml", base_daemon(tmp_path, step_timeout="30m", stall_seconds="5m"),
        [{"name": "podcasts", "path": str(root / "inbox"),
          "pipeline": ["preprocess", "transcribe"], "formats": ["txt", "srt", "json"]}],
        transcribe={"backend": "local", "model": "tiny.en", "language": "en",
                    "vad_filter": True})
    episode = tmp_path / "episode.mp3"
    hour_long_episode(media.speech_wav, episode)
    with running_daemon(config, tmp_path / "log") as daemon:
        # When a 65-minute episode is dropped
        episode.rename(root / "inbox" / "episode.mp3")
        wait_until(lambda: files_under(root / "done") or files_under(root / "failed"), 600,
                   interval=1.0, message="the episode finished")
        log = daemon.log_text()
    # Then it is done, with every output, and nothing is left in processing/
    assert files_under(root / "done") == ["episode.mp3"], log[-3000:]
    assert files_under(root / "outputs") == ["episode.json", "episode.srt", "episode.txt"]
    assert not files_under(root / "processing")
    doc = json.loads((root / "outputs" / "episode.json").read_text())
    assert doc["duration"] == pytest.approx(REPEATS * PERIOD, abs=1.0)
    # And each of the 13 sentences is there once, at its own time on the source's clock
    spoken = [s for s in doc["segments"] if {"weather", "meeting"} & set(words(s["text"]))]
    starts = sorted({round(s["start"] / PERIOD) for s in spoken})
    assert starts == list(range(REPEATS)), [(s["start"], s["text"]) for s in spoken]
    for segment in spoken:
        offset = segment["start"] - round(segment["start"] / PERIOD) * PERIOD
        assert -1.0 <= offset <= 6.0, segment
