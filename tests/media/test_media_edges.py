"""Media that lies or surprises: length caps, many audio tracks, damage (real ffmpeg)."""

from __future__ import annotations

import json
import random
import subprocess
import wave
from array import array
from pathlib import Path

import pytest

from tests.helpers import base_daemon, files_under, running_daemon, wait_until, write_config
from traxd.config import Settings
from traxd.errors import Permanent
from traxd.pipeline import ffmpeg as ffmpeg_module
from traxd.pipeline.ffmpeg import (
    PreprocessStep,
    find_tools,
    parse_ffmpeg_banner,
    probe,
    wav_duration,
)
from traxd.pipeline.formats import WARNINGS_FACT
from traxd.pipeline.tracks import Track, choose_track, language_codes
from traxd.pipeline.transcribe import TranscribeStep
from traxd.procs import ProcessLimits

from .conftest import ContextFactory, Media, with_changes
from .helpers import ffmpeg, loudness, words


def settings_for(tmp_path: Path, **daemon: object) -> Settings:
    return with_changes(Settings(), daemon={"state_dir": tmp_path, **daemon})


def scratch(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.name, p.stat().st_size) for p in folder.rglob("*") if p.is_file())


# --- item 12: a length cap for every input, from the probe -----------------------------------


def flac_bomb(out: Path, hours: float) -> Path:
    """Silence that compresses ~2500:1: a few KB of FLAC that decode to `hours` of audio."""
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=1000:cl=mono", "-t", str(hours * 3600),
           "-c:a", "flac", "-sample_fmt", "s16", "-frame_size", "65535", str(out))
    return out


def understated_flac(out: Path, seconds: int, says: int) -> Path:
    """`seconds` of tone in a FLAC whose header says it holds only `says` seconds."""
    rate = 8000
    ffmpeg("-f", "lavfi", "-i", f"sine=f=300:r={rate}", "-t", str(seconds), "-c:a", "flac",
           "-sample_fmt", "s16", str(out))
    data = bytearray(out.read_bytes())
    total = rate * says  # STREAMINFO's 36-bit sample count: low nibble of byte 21, then 4
    data[21] = (data[21] & 0xF0) | (total >> 32 & 0x0F)
    data[22:26] = (total & 0xFFFFFFFF).to_bytes(4, "big")
    out.write_bytes(bytes(data))
    return out


async def test_a_flac_bomb_is_refused_from_the_probe_without_decoding(
        make_ctx: ContextFactory, tmp_path: Path) -> None:
    # Given 13 hours of audio in a FLAC of a few KB, and the default limit (12 h)
    bomb = flac_bomb(tmp_path / "bomb.flac", 13)
    assert bomb.stat().st_size < 100_000
    ctx, _ = make_ctx(bomb, settings=settings_for(tmp_path / "state"))
    # When it is preprocessed
    with pytest.raises(Permanent) as caught:
        await PreprocessStep(ctx.settings).run(ctx)
    # Then it is refused for good, naming the length, the limit and the key to change
    message = str(caught.value)
    assert caught.value.reason == "too_long"
    assert "13:00:00" in message and "12:00:00" in message, message
    assert "[daemon] max_duration_seconds" in message, message
    # And nothing was decoded: no scratch audio at all
    assert scratch(ctx.workdir) == []


async def test_a_file_that_understates_its_length_stops_at_the_limit(
        make_ctx: ContextFactory, tmp_path: Path) -> None:
    # Given a FLAC whose header says 10 s but that holds 60 s, and a 30 s limit
    liar = understated_flac(tmp_path / "liar.flac", 60, says=10)
    info = await probe(liar, find_tools(), ProcessLimits())
    assert info.duration == pytest.approx(10.0)
    ctx, _ = make_ctx(liar, settings=settings_for(tmp_path / "state", max_duration_seconds=30))
    # When it is preprocessed, then decoding stops at the limit and the file is refused
    with pytest.raises(Permanent, match=r"decodes to more than 0:00:31 long, over the 0:00:30"):
        await PreprocessStep(ctx.settings).run(ctx)
    audio = ctx.workdir / "audio.wav"
    assert wav_duration(audio) == pytest.approx(31.0, abs=0.1)


async def test_the_whole_wav_has_no_4_gib_limit(tmp_path: Path) -> None:
    # Given the format of the 16 kHz intermediate: RF64 once past 4 GiB (37.3 h), not a
    # RIFF wav whose 32-bit sizes stop it there. ffmpeg writes the same RF64 header early
    # when asked to, so a short file shows that its length is read from that header.
    assert ffmpeg_module.WAV.options["rf64"] == "auto"
    rf64 = tmp_path / "long.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=f=300:r=16000", "-t", "3.5", "-ac", "1",
           "-c:a", "pcm_s16le", "-rf64", "always", str(rf64))
    assert rf64.read_bytes()[:4] == b"RF64"
    # When its length is read, then it is the length of the audio
    assert wav_duration(rf64) == pytest.approx(3.5, abs=0.001)


# --- item 14: which audio track --------------------------------------------------------------


def two_track_mkv(out: Path, *, default: int, languages: tuple[str, str]) -> Path:
    """Track 0 a quiet tone, track 1 a loud one; `default` marks one of them."""
    ffmpeg("-f", "lavfi", "-i", "sine=f=300:r=16000:d=4", "-f", "lavfi",
           "-i", "sine=f=300:r=16000:d=4", "-filter_complex",
           "[0]volume=0.02[quiet];[1]volume=0.5[loud]", "-map", "[quiet]", "-map", "[loud]",
           "-c:a", "flac", "-metadata:s:a:0", f"language={languages[0]}",
           "-metadata:s:a:1", f"language={languages[1]}",
           f"-disposition:a:{default}", "default", f"-disposition:a:{1 - default}", "0",
           str(out))
    return out


QUIET, LOUD = 0.02 * 0.707 / 8, 0.5 * 0.707 / 8  # RMS of the two sines (lavfi's are 1/8)


@pytest.mark.parametrize(("default", "language", "expected", "why"), [
    (1, None, LOUD, "default"),  # the second track is marked default
    (0, None, QUIET, "default"),
    (0, "de", LOUD, "language"),  # the configured language wins over the default
    (0, "deu", LOUD, "language"),
    (0, "fr", QUIET, "default"),  # no track in French: the default one
])
async def test_the_default_track_or_the_configured_language_is_transcribed(
        make_ctx: ContextFactory, tmp_path: Path, default: int, language: str | None,
        expected: float, why: str) -> None:
    # Given an mkv with an English and a German audio track
    mkv = two_track_mkv(tmp_path / "film.mkv", default=default, languages=("eng", "ger"))
    settings = with_changes(settings_for(tmp_path / "state"), transcribe={"language": language})
    ctx, _ = make_ctx(mkv, settings=settings)
    # When it is preprocessed
    result = await PreprocessStep(settings).run(ctx)
    # Then the audio handed on is that of the chosen track
    assert result.media is not None
    assert loudness(result.media, 2.0, 1.0) == pytest.approx(expected, rel=0.1)
    # And the choice, and that there were others, is recorded
    chosen = result.facts["audio_stream"]
    assert chosen["chosen_by"] == why and result.facts["audio_streams"] == 2
    assert chosen["language"] == ("ger" if expected == LOUD else "eng")


def test_banner_gives_language_and_default_without_ffprobe() -> None:
    banner = """Input #0, matroska,webm, from 'file:/x/film.mkv':
  Duration: 00:00:04.00, start: 0.000000, bitrate: 90 kb/s
  Stream #0:0(eng): Audio: flac, 16000 Hz, mono, s16
  Stream #0:1(ger): Audio: flac, 16000 Hz, mono, s16 (default)
  Stream #0:2: Audio: aac (LC), 48000 Hz, stereo, fltp
"""
    info = parse_ffmpeg_banner(banner)
    assert [(a.index, a.language, a.default) for a in info.audio] == [
        (0, "eng", False), (1, "ger", True), (2, None, False)]
    assert choose_track([a.track for a in info.audio], None).index == 1


def test_iso_639_1_and_2_codes_name_the_same_language() -> None:
    assert {"de", "ger", "deu"} <= language_codes("de")
    assert "en" in language_codes("ENG")
    tracks = [Track(1, "fre", False), Track(2, "zho", False)]
    assert choose_track(tracks, "zh").index == 2
    assert choose_track(tracks, "fr").index == 1
    assert choose_track(tracks, None).why == "first"


# --- item 11: damaged media ------------------------------------------------------------------


@pytest.fixture(scope="module")
def minute_mp3(tmp_path_factory: pytest.TempPathFactory, media: Media) -> Path:
    """60 s mp3: the ~3 s speech at 0, 10, 20 ... 50 s, quiet between."""
    folder = tmp_path_factory.mktemp("damaged")
    period = folder / "period.wav"
    ffmpeg("-i", str(media.speech_wav), "-af", "apad=whole_dur=10", "-ac", "1", "-ar", "16000",
           str(period))
    out = folder / "minute.mp3"
    ffmpeg("-stream_loop", "5", "-i", str(period), "-c:a", "libmp3lame", "-b:a", "64k", str(out))
    return out


def damaged(source: Path, out: Path, start: float, end: float) -> Path:
    """A copy with the bytes between shares start and end of the file overwritten."""
    data = bytearray(source.read_bytes())
    noise = random.Random(13)
    for i in range(int(len(data) * start), int(len(data) * end)):
        data[i] = noise.randrange(256)
    out.write_bytes(bytes(data))
    return out


def onset(audio: Path, after: float) -> float:
    """When the first loud sample after `after` seconds of a 16-bit mono wav comes."""
    with wave.open(str(audio), "rb") as wav:
        rate = wav.getframerate()
        wav.setpos(int(after * rate))
        samples = array("h", wav.readframes(3 * rate))
    return after + next(i for i, s in enumerate(samples) if abs(s) > 1000) / rate


def media_wav(source: Path) -> Path:
    out = source.with_suffix(".decoded.wav")
    if not out.exists():
        ffmpeg("-i", str(source), "-ac", "1", "-ar", "16000", str(out))
    return out


def spoken_at(audio: Path) -> list[int]:
    """Which of the 12 five-second marks of a 16-bit wav have speech just after them."""
    return [t for t in range(0, 60, 5) if loudness(audio, t + 0.8, 1.0) > 0.02]


async def test_damaged_mp3_keeps_the_source_clock_and_is_flagged(
        make_ctx: ContextFactory, minute_mp3: Path, tmp_path: Path) -> None:
    # Given the minute with its middle 40 % destroyed (ffmpeg alone decodes it to ~36 s)
    broken = damaged(minute_mp3, tmp_path / "broken.mp3", 0.3, 0.7)
    ctx, _ = make_ctx(broken)
    # When it is preprocessed
    result = await PreprocessStep(ctx.settings).run(ctx)
    assert result.media is not None
    # Then the audio is a minute long, and the speech after the damage is where it was
    assert result.facts["duration"] == pytest.approx(60.0, abs=1.0)
    assert spoken_at(result.media) == [0, 5, 10, 15, 45, 50, 55]  # damage: 18 s to 42 s
    assert onset(result.media, 49.0) == pytest.approx(onset(media_wav(minute_mp3), 49.0),
                                                      abs=0.1)
    # And the file is flagged: a fact, and a warnings file among its outputs
    [warning] = result.facts[WARNINGS_FACT]
    assert warning["reason"] == "damaged_media" and "source's clock" in warning["message"]
    note = json.loads(result.artifacts["broken.warnings.json"].read_text())
    assert note == {"file": "broken.mp3", "warnings": [warning]}


async def test_truncated_file_is_flagged(make_ctx: ContextFactory, minute_mp3: Path,
                                         tmp_path: Path) -> None:
    # Given the minute cut off half way, as an interrupted copy leaves it (its header
    # still says a minute)
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(minute_mp3.read_bytes()[: minute_mp3.stat().st_size // 2])
    ctx, _ = make_ctx(cut)
    # When it is preprocessed, then what there is is kept, and the file says it is short
    result = await PreprocessStep(ctx.settings).run(ctx)
    assert result.facts["duration"] == pytest.approx(30.0, abs=1.5)
    [warning] = result.facts[WARNINGS_FACT]
    assert "decodes to 3" in warning["message"] and "says 60.1 s" in warning["message"]
    assert "cut.warnings.json" in result.artifacts


async def test_whole_media_has_no_warnings(make_ctx: ContextFactory, minute_mp3: Path) -> None:
    ctx, _ = make_ctx(minute_mp3)
    result = await PreprocessStep(ctx.settings).run(ctx)
    assert WARNINGS_FACT not in result.facts and not result.artifacts
    assert result.facts["audio_stream"]["chosen_by"] == "only"


def test_ffmpeg_alone_loses_time_on_this_damage(minute_mp3: Path, tmp_path: Path) -> None:
    """The premise of the damage test: a plain decode of it is far shorter than a minute."""
    broken = damaged(minute_mp3, tmp_path / "broken.mp3", 0.3, 0.7)
    out = subprocess.run(["ffmpeg", "-nostdin", "-i", str(broken), "-f", "null", "-",
                          "-progress", "pipe:1", "-loglevel", "quiet"],
                         capture_output=True, text=True, check=True).stdout
    last = [line for line in out.splitlines() if line.startswith("out_time_us=")][-1]
    assert int(last.split("=")[1]) / 1e6 < 45


@pytest.mark.slow
async def test_subtitles_of_a_damaged_mp3_stay_on_the_source_clock(
        make_ctx: ContextFactory, minute_mp3: Path, tmp_path: Path) -> None:
    # Given the damaged minute, preprocessed, then transcribed by the real model
    broken = damaged(minute_mp3, tmp_path / "broken.mp3", 0.3, 0.7)
    settings = with_changes(settings_for(tmp_path / "state"),
                            transcribe={"processes": 1, "threads": 1})
    ctx, _ = make_ctx(broken, settings=settings, formats=("json", "srt"))
    prepared = await PreprocessStep(settings).run(ctx)
    step = TranscribeStep(settings)
    ctx2, _ = make_ctx(broken, settings=settings, facts=prepared.facts, formats=ctx.formats)
    try:
        result = await step.run(ctx2)
    finally:
        await step.aclose()
    # Then the speech after the damage starts at 50 s, where it is in the source
    doc = json.loads(result.artifacts["broken.json"].read_text())
    starts = [s["start"] for s in doc["segments"] if "meeting" in words(s["text"])]
    assert any(s == pytest.approx(50.0, abs=1.0) for s in starts), doc["segments"]
    assert not any(15.0 < s < 40.0 for s in starts), doc["segments"]  # unmended: ~26 s
    # And the transcript itself, and its warnings file, say the file was damaged
    [warning] = result.facts[WARNINGS_FACT]
    assert warning["step"] == "preprocess" and doc["flags"] == [warning["message"]]
    note = json.loads(result.artifacts["broken.warnings.json"].read_text())
    assert note["warnings"] == [warning]


@pytest.mark.integration
def test_the_daemon_publishes_the_warnings_and_refuses_what_is_too_long(
        minute_mp3: Path, tmp_path: Path) -> None:
    # Given a daemon with the default limit (12 h) and a preprocess inbox
    root = tmp_path / "media"
    (root / "inbox").mkdir(parents=True)
    config = write_config(tmp_path / "traxd.toml", base_daemon(tmp_path),
                          [{"name": "media", "path": str(root / "inbox"),
                            "pipeline": ["preprocess"]}])
    broken = damaged(minute_mp3, tmp_path / "broken.mp3", 0.3, 0.7)
    bomb = flac_bomb(tmp_path / "bomb.flac", 13)
    with running_daemon(config, tmp_path / "log") as daemon:
        # When a damaged minute and 13 hours of FLAC are dropped
        for source in (broken, bomb):
            source.rename(root / "inbox" / source.name)
        wait_until(lambda: files_under(root / "done") and files_under(root / "failed"), 60,
                   interval=0.2, message="both files finished")
        log = daemon.log_text()
    # Then the 13 hours are refused for their length, naming the key to change
    assert files_under(root / "done") == ["broken.mp3"], log[-3000:]
    error = json.loads((root / "failed" / "bomb.flac.error.json").read_text())
    assert error["reason"] == "too_long" and "[daemon] max_duration_seconds" in error["message"]
    # And the damaged minute is done, with its warnings published beside its outputs
    note = json.loads((root / "outputs" / "broken.warnings.json").read_text())
    assert note["file"] == "broken.mp3" and note["warnings"][0]["reason"] == "damaged_media"
