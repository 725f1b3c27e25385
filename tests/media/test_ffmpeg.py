"""The preprocess step and the ffmpeg helpers, on real media with the real ffmpeg."""

from __future__ import annotations

import itertools
import shutil
import wave
from pathlib import Path

import pytest

from traxd.config import Settings
from traxd.errors import Permanent
from traxd.executor import preprocess_settings
from traxd.pipeline import ffmpeg as ffmpeg_module
from traxd.pipeline.ffmpeg import (
    Chunk,
    PreprocessStep,
    Tools,
    detect_silences,
    find_tools,
    parse_ffmpeg_banner,
    parse_silences,
    plan_cuts,
    probe,
)
from traxd.procs import ProcessLimits

from .conftest import ContextFactory, Media, with_changes
from .helpers import ffmpeg, ffprobe_stream, loudness

FORMATS = ["speech.wav", "speech.mp3", "speech.m4a", "speech.ogg", "speech.flac", "speech.mp4"]


def wav_seconds(path: Path) -> float:
    with wave.open(str(path), "rb") as wav:
        return wav.getnframes() / wav.getframerate()


def settings_for(tmp_path: Path, **transcribe: object) -> Settings:
    return with_changes(Settings(), daemon={"state_dir": tmp_path}, transcribe=transcribe)


@pytest.mark.parametrize("name", FORMATS)
async def test_every_format_becomes_16k_mono_wav(media: Media, make_ctx: ContextFactory,
                                                 name: str) -> None:
    # Given speech in a common container/codec
    ctx, progress = make_ctx(media[name])
    # When it is preprocessed
    result = await PreprocessStep(ctx.settings).run(ctx)
    # Then the media handed on is 16 kHz mono 16-bit PCM, as long as the speech
    assert result.media is not None
    assert ffprobe_stream(result.media) == {"codec_name": "pcm_s16le", "sample_rate": "16000",
                                            "channels": "1"}
    assert result.facts["duration"] == pytest.approx(wav_seconds(media.speech_wav), abs=0.15)
    chunks = [Chunk.from_fact(c) for c in result.facts["chunks"]]
    assert [(c.path, c.offset) for c in chunks] == [(result.media, 0.0)]
    # And progress rose to 1
    assert progress == sorted(progress) and progress[-1] == 1.0


async def test_probe_without_ffprobe_reads_the_same_facts(media: Media) -> None:
    # Given a machine with ffmpeg but no ffprobe
    with_probe = find_tools()
    only_ffmpeg = Tools(with_probe.ffmpeg, None)
    for name in ("speech.mp4", "speech.ogg"):
        # When both probe the same file
        a = await probe(media[name], with_probe, ProcessLimits())
        b = await probe(media[name], only_ffmpeg, ProcessLimits())
        # Then they agree on duration and audio
        assert a.duration == pytest.approx(b.duration, abs=0.05)
        assert [(s.codec, s.sample_rate, s.channels) for s in a.audio] == \
            [(s.codec, s.sample_rate, s.channels) for s in b.audio]
        assert a.video == b.video


def test_ffmpeg_banner_parsing() -> None:
    banner = """Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'file:/x/a.mp4':
  Duration: 01:02:03.50, start: 0.000000, bitrate: 82 kb/s
  Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p, 64x64
  Stream #0:1[0x2](und): Audio: aac (LC) (mp4a / 0x6134706D), 22050 Hz, stereo, fltp
"""
    info = parse_ffmpeg_banner(banner)
    assert info.format_name == "mov,mp4,m4a,3gp,3g2,mj2"
    assert info.duration == pytest.approx(3723.5)
    assert info.video == ("h264",)
    assert [(s.index, s.codec, s.sample_rate, s.channels) for s in info.audio] == \
        [(1, "aac", 22050, 2)]


@pytest.mark.parametrize(("name", "expected"), [
    ("random.mp3", "cannot decode random.mp3"),
    ("text.mp4", "cannot decode text.mp4"),
    ("noaudio.mp4", r"has no audio stream: video only \(h264\)"),
    ("tiny.wav", "empty audio"),
])
async def test_undecodable_input_is_permanent(media: Media, make_ctx: ContextFactory,
                                              name: str, expected: str) -> None:
    # Given a file that is not usable audio
    ctx, _ = make_ctx(media[name])
    # When it is preprocessed, then it fails permanently, saying why
    with pytest.raises(Permanent, match=expected):
        await PreprocessStep(ctx.settings).run(ctx)


async def test_names_that_look_like_options_or_hold_quotes(
        media: Media, make_ctx: ContextFactory, tmp_path: Path) -> None:
    # Given a file whose name starts with '-' and holds quotes and spaces
    odd = tmp_path / "-i 'it''s' \"x\".mp3"
    shutil.copy(media["speech.mp3"], odd)
    ctx, _ = make_ctx(odd)
    # When it is preprocessed, then it is read as a file, not as options
    result = await PreprocessStep(ctx.settings).run(ctx)
    assert result.facts["duration"] == pytest.approx(wav_seconds(media.speech_wav), abs=0.15)


def test_plan_cuts_prefers_the_longest_pause_before_the_limit() -> None:
    silences = [(1.0, 1.2), (8.0, 9.0), (9.5, 9.6), (14.0, 14.5)]
    # the long pause 8-9 s lies in the last third of the first 10 s; then 14-14.5 in [14, 18]
    assert plan_cuts(25.0, 10.0, silences) == [8.5, 14.25, 24.25]
    # no pause at all: hard cuts at the limit
    assert plan_cuts(25.0, 10.0, []) == [10.0, 20.0]
    # short enough: no cut
    assert plan_cuts(9.0, 10.0, silences) == []


def test_silence_parser_survives_lines_split_by_another_writer() -> None:
    # Given ametadata lines as a shared pipe delivered them: one cut by a progress block
    lines = ["frame:1 pts:16000 pts_time:1", "lavfi.silence_start=1.5",
             "lavfi.silence_end=2", "lavfi.silence_duration=0.5",
             "lavfi.silence_start=4", "lavfi.silence_end=4.8bitrate=N/A", "progress=continue",
             "lavfi.silence_start=7", "lavfi.silence_end=7.5",
             "lavfi.silence_start=nan", "lavfi.silence_start=9.25"]
    # When they are parsed
    pauses = parse_silences(lines, duration=10.0)
    # Then whole pauses are kept, the damaged one is skipped, the open one runs to the end
    assert pauses == [(1.5, 2.0), (7.0, 7.5), (9.25, 10.0)]


async def test_silences_of_a_long_file_survive_a_busy_progress_stream(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given 10 min of tone with a pause every 0.7 s: pause metadata far beyond one 32 KB
    # pipe buffer, as an hour-long podcast makes
    audio = tmp_path / "pulses.wav"
    pulses = "if(lt(mod(t\\,0.7)\\,0.35)\\,0.5*sin(2*PI*440*t)\\,0)"
    ffmpeg("-f", "lavfi", "-i", f"aevalsrc={pulses}:s=16000:d=600", str(audio))
    # When ffmpeg writes progress as often as it can, as it does on a busy machine
    busy = (*ffmpeg_module.GLOBAL_ARGS, "-stats_period", "0.0005")
    monkeypatch.setattr(ffmpeg_module, "GLOBAL_ARGS", busy)
    pauses = await detect_silences(audio, find_tools(), ProcessLimits(), 600.0, tmp_path)
    # Then every pause is found whole, in order, where the audio is quiet
    assert len(pauses) == 857
    for index, (start, end) in enumerate(pauses):
        assert start == pytest.approx(index * 0.7 + 0.35, abs=0.01)
        assert end == pytest.approx(min(600.0, index * 0.7 + 0.7), abs=0.01)
    # And the scratch file is gone
    assert not (tmp_path / ffmpeg_module.SILENCE_LOG).exists()


async def test_long_speech_is_split_in_pauses(media: Media, make_ctx: ContextFactory,
                                              tmp_path: Path) -> None:
    # Given ~20 s of speech with pauses and a 6 s chunk limit
    settings = settings_for(tmp_path, chunk_seconds=6.0)
    ctx, progress = make_ctx(media.long_wav, settings=settings,
                             step_settings=preprocess_settings(settings, ["transcribe"]))
    # When it is preprocessed
    result = await PreprocessStep(settings).run(ctx)
    chunks = [Chunk.from_fact(c) for c in result.facts["chunks"]]
    assert result.media is not None
    # Then the chunks tile the whole without gaps, none longer than the limit
    assert len(chunks) >= 4
    assert chunks[0].offset == 0.0
    for before, after in itertools.pairwise(chunks):
        assert after.offset == pytest.approx(before.offset + before.duration)
    assert sum(c.duration for c in chunks) == pytest.approx(result.facts["duration"])
    assert all(c.duration <= 6.0 + 1e-6 for c in chunks)
    # And every cut lies in a pause (quiet in the audio itself), every chunk is real audio
    for chunk in chunks[1:]:
        assert loudness(result.media, chunk.offset) < 0.01, chunk
    for chunk in chunks:
        assert wav_seconds(chunk.path) == pytest.approx(chunk.duration, abs=0.01)
    assert progress == sorted(progress) and progress[-1] == 1.0


async def test_openai_chunks_are_small_16k_mono_mp3(media: Media, make_ctx: ContextFactory,
                                                    tmp_path: Path) -> None:
    # Given the openai backend, which uploads compressed audio
    settings = settings_for(tmp_path, backend="openai", chunk_seconds=8.0)
    ctx, _ = make_ctx(media.long_wav, settings=settings,
                      step_settings=preprocess_settings(settings, ["transcribe"]))
    # When the long file is preprocessed
    result = await PreprocessStep(settings).run(ctx)
    chunks = [Chunk.from_fact(c) for c in result.facts["chunks"]]
    # Then every chunk is a 16 kHz mono mp3, far smaller than the wav
    assert len(chunks) >= 3
    for chunk in chunks:
        assert chunk.path.suffix == ".mp3"
        assert ffprobe_stream(chunk.path) == {"codec_name": "mp3", "sample_rate": "16000",
                                              "channels": "1"}
        assert chunk.path.stat().st_size < chunk.duration * 32_000 / 8 * 1.2
