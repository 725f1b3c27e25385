"""The `mux` step: subtitles added as a track into a copy of the video, streams copied."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.helpers import base_daemon, files_under, running_daemon, wait_until, write_config
from traxd.errors import ConfigError, Permanent
from traxd.pipeline.mux import MuxStep, container_language

from .conftest import SPEECH_TEXT, ContextFactory, Media
from .helpers import ffmpeg, wer
from .test_library import drop, load, srt_cues, subtitle_codecs

SRT = "1\n00:00:00,500 --> 00:00:02,000\nPlease remember\n\n2\n00:00:02,000 --> 00:00:04,000\n" \
      "to bring your notes.\n"


def subtitle_languages(path: Path) -> list[str]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "s", "-show_entries",
                          "stream_tags=language", "-of", "csv=p=0", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return out.split()


def packets_digest(path: Path, stream: str) -> str:
    """A digest of one stream's packets as they are stored (equal only when copied)."""
    out = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-map",
                          stream, "-c", "copy", "-f", "md5", "-"], check=True,
                         capture_output=True, text=True).stdout
    return out.strip()


def subtitle_text(path: Path) -> str:
    out = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-map",
                          "0:s:0", "-f", "srt", "-"], check=True, capture_output=True,
                         text=True).stdout
    return " ".join(" ".join(lines) for _, _, lines in srt_cues(out))


def srt_artifact(tmp_path: Path, stem: str) -> dict[str, Path]:
    path = tmp_path / f"{stem}.srt"
    path.write_text(SRT)
    return {f"{stem}.srt": path, f"{stem}.txt": tmp_path / "unused.txt"}


async def mux(make_ctx: ContextFactory, source: Path, tmp_path: Path,
              language: str | None = "en") -> dict[str, Path]:
    ctx, progress = make_ctx(source, facts={"language": language})
    ctx = dataclasses.replace(ctx, artifacts=srt_artifact(tmp_path, source.stem))
    step = MuxStep(ctx.settings)
    result = await step.run(ctx)
    assert not result.artifacts or progress[-1] == 1.0
    return result.artifacts


async def test_an_mp4_gets_a_mov_text_track_and_its_streams_copied(
        media: Media, make_ctx: ContextFactory, tmp_path: Path) -> None:
    # Given an mp4 (h264 and aac) and English subtitles from an earlier step
    source = media["speech.mp4"]
    # When it is muxed
    artifacts = await mux(make_ctx, source, tmp_path)
    # Then an mp4 copy holds them as mov_text, marked English
    copy = artifacts["speech.mp4"]
    assert list(artifacts) == ["speech.mp4"] and copy.parent != source.parent
    assert subtitle_codecs(copy) == ["mov_text"]
    assert subtitle_languages(copy) == ["eng"]
    assert subtitle_text(copy) == "Please remember to bring your notes."
    # And its video and audio are the original's packets, not encoded again
    for stream in ("0:v:0", "0:a:0"):
        assert packets_digest(copy, stream) == packets_digest(source, stream)


async def test_an_mkv_keeps_its_subtitles_and_gets_one_more(
        media: Media, make_ctx: ContextFactory, tmp_path: Path) -> None:
    # Given an mkv that already has a subtitle track, and German subtitles
    theirs = tmp_path / "theirs.srt"
    theirs.write_text("1\n00:00:00,000 --> 00:00:01,000\nsomeone else's\n")
    source = tmp_path / "film.mkv"
    ffmpeg("-i", str(media["speech.mp4"]), "-i", str(theirs), "-map", "0", "-map", "1",
           "-c", "copy", str(source))
    # When it is muxed
    artifacts = await mux(make_ctx, source, tmp_path, language="de")
    # Then the mkv copy has both, the new one SubRip marked German (Matroska's code)
    copy = artifacts["film.mkv"]
    assert subtitle_codecs(copy) == ["subrip", "subrip"]
    assert subtitle_languages(copy) == ["ger"]  # the first track has no language tag
    assert packets_digest(copy, "0:s:0") == packets_digest(source, "0:s:0")
    assert packets_digest(copy, "0:v:0") == packets_digest(source, "0:v:0")


async def test_other_containers_get_an_mkv_copy_and_audio_none(
        media: Media, make_ctx: ContextFactory, tmp_path: Path) -> None:
    avi = tmp_path / "clip.avi"
    ffmpeg("-i", str(media["speech.mp4"]), "-c:v", "mpeg4", "-c:a", "mp3", str(avi))
    assert list(await mux(make_ctx, avi, tmp_path)) == ["clip.mkv"]
    assert await mux(make_ctx, media["speech.mp3"], tmp_path) == {}


async def test_mux_without_an_srt_fails_naming_it(media: Media,
                                                  make_ctx: ContextFactory) -> None:
    ctx, _ = make_ctx(media["speech.mp4"])
    with pytest.raises(Permanent, match=r"speech\.srt.*'srt' in the inbox's formats"):
        await MuxStep(ctx.settings).run(ctx)


def test_container_language_codes() -> None:
    assert [container_language(code, mp4=True) for code in ("en", "de", "zh", "xx", None)] == [
        "eng", "deu", "zho", None, None]
    assert [container_language(code, mp4=False) for code in ("en", "de", "fr")] == [
        "eng", "ger", "fre"]


@pytest.mark.parametrize(("inbox", "key", "why"), [
    ('pipeline = ["preprocess", "mux", "transcribe"]\n', "inbox[0].pipeline",
     "put transcribe before mux"),
    ('pipeline = ["transcribe", "mux"]\nformats = ["txt"]\n', "inbox[0].formats",
     'add "srt"'),
])
def test_a_mux_without_subtitles_before_it_is_refused(tmp_path: Path, inbox: str, key: str,
                                                      why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, f'[[inbox]]\nname = "a"\npath = "{tmp_path}/a/inbox"\n{inbox}')
    assert (caught.value.key, why in caught.value.why) == (key, True), caught.value.why


@pytest.mark.slow
@pytest.mark.integration
def test_a_dropped_mp4_comes_out_with_its_subtitles_inside(media: Media,
                                                          tmp_path: Path) -> None:
    # Given an inbox that transcribes with the real tiny.en model and muxes
    root = tmp_path / "films"
    config = write_config(
        tmp_path / "traxd.toml", base_daemon(tmp_path),
        [{"name": "films", "path": str(root / "inbox"),
          "pipeline": ["preprocess", "transcribe", "mux"], "formats": ["srt"]}],
        transcribe={"backend": "local", "model": "tiny.en", "processes": 1, "threads": 1})
    with running_daemon(config, tmp_path / "log") as daemon:
        # When a video is dropped
        drop(media["speech.mp4"], root / "inbox")
        wait_until(lambda: files_under(root / "done") or files_under(root / "failed"),
                   240, interval=0.2, message="the video finished")
        log = daemon.log_text()
    # Then outputs/ has the srt and an mp4 copy whose mov_text track says the same words
    assert files_under(root / "outputs") == ["speech.mp4", "speech.srt"], log[-3000:]
    copy = root / "outputs" / "speech.mp4"
    assert subtitle_codecs(copy) == ["mov_text"]
    assert subtitle_languages(copy) == ["eng"]
    assert wer(SPEECH_TEXT, subtitle_text(copy)) <= 0.3
    # And the original in done/ is untouched
    original = root / "done" / "speech.mp4"
    digest = hashlib.sha256(original.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(media["speech.mp4"].read_bytes()).hexdigest()
