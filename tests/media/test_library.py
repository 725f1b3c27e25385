"""Media for real libraries: command steps on earlier outputs, languages, readable subtitles,
per-inbox settings."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.helpers import (
    DaemonProcess,
    base_daemon,
    files_under,
    running_daemon,
    wait_until,
    write_config,
)
from traxd.config import Settings, TranscribeSettings, load_settings
from traxd.errors import ConfigError, Permanent
from traxd.executor import StepRequest, build_request
from traxd.pipeline import whisper_worker
from traxd.pipeline.base import JobInfo, StepContext
from traxd.pipeline.command import CommandStep, render_argv
from traxd.pipeline.enhance import EnhanceStep
from traxd.pipeline.formats import (
    MAX_CUE_SECONDS,
    Segment,
    TimedWord,
    Transcript,
    WriteOptions,
    to_srt,
)
from traxd.pipeline.transcribe import LocalBackend, TranscribeStep

from .conftest import (
    LONG_SENTENCES,
    LONG_TEXT,
    SPEECH_TEXT,
    ContextFactory,
    Media,
    with_changes,
)
from .helpers import wer
from .openai_server import FakeOpenAI

# Writes what it was given: the text of {srt}, and the names in {outputs_dir}.
REPORT_SCRIPT = (
    "import json, os, sys\n"
    "srt, earlier, out = sys.argv[1:4]\n"
    "json.dump({'srt': open(srt).read(), 'earlier': sorted(os.listdir(earlier)),\n"
    "           'json': json.load(open(sys.argv[4]))}, open(out, 'w'))\n"
)


def earlier_outputs(folder: Path, stem: str) -> dict[str, Path]:
    folder.mkdir()
    files = {f"{stem}.srt": "1\n00:00:00,000 --> 00:00:01,000\nHello\n",
             f"{stem}.json": '{"language": "en"}', f"{stem}.txt": "Hello\n"}
    for name, text in files.items():
        (folder / name).write_text(text)
    return {name: folder / name for name in files}


async def test_command_step_gets_earlier_outputs(media: Media, make_ctx: ContextFactory,
                                                 tmp_path: Path) -> None:
    # Given a command that reads {srt}, {json} and the folder {outputs_dir}
    step = CommandStep((sys.executable, "-c", REPORT_SCRIPT, "{srt}", "{outputs_dir}",
                        "{output_dir}/{stem}.report", "{json}"))
    ctx, _ = make_ctx(media["speech.mp3"])
    ctx = dataclasses.replace(ctx, artifacts=earlier_outputs(tmp_path / "t", "speech"))
    # When it runs
    result = await step.run(ctx)
    # Then it was given the files the earlier steps wrote
    report = json.loads(result.artifacts["speech.report"].read_text())
    assert report["srt"].endswith("Hello\n")
    assert report["earlier"] == ["speech.json", "speech.srt", "speech.txt"]
    assert report["json"] == {"language": "en"}


def test_a_name_holding_a_placeholder_is_not_filled_in_again() -> None:
    argv = render_argv(("tool", "{name}", "{srt}", "{outputs_dir}/x"),
                       {"name": "{srt}.mp3", "srt": "/o/a.srt", "outputs_dir": "/e"})
    assert argv == ["tool", "{srt}.mp3", "/o/a.srt", "/e/x"]


async def test_command_step_naming_a_missing_output_fails_permanently(
        media: Media, make_ctx: ContextFactory, tmp_path: Path) -> None:
    # Given earlier outputs without a vtt, and a command that wants {vtt}
    step = CommandStep(("cp", "{vtt}", "{output_dir}/x.vtt"))
    ctx, _ = make_ctx(media["speech.mp3"])
    ctx = dataclasses.replace(ctx, artifacts=earlier_outputs(tmp_path / "t", "speech"))
    # When it runs, Then it fails for good, naming the output it lacks
    with pytest.raises(Permanent, match=r"\{vtt\}.*speech\.vtt"):
        await step.run(ctx)


# --- languages ----------------------------------------------------------------------------


@dataclass
class DetectingModel:
    """Stands in for a multilingual faster-whisper model that detects `language`."""

    language: str
    probability: float
    asked: list[str | None] = field(default_factory=list)

    def transcribe(self, audio: str, *, language: str | None, **_: object) -> tuple[Any, Any]:
        self.asked.append(language)
        segment = SimpleNamespace(start=0.5, end=2.0, text=" Guten Morgen", avg_logprob=-0.2,
                                  no_speech_prob=0.01, words=None)
        info = SimpleNamespace(language=language or self.language, duration=3.0,
                               language_probability=1.0 if language else self.probability)
        return iter([segment]), info


class WorkerBackend:
    """The local backend's request, answered by whisper_worker.transcribe with `model`."""

    name = "local"

    def __init__(self, model: DetectingModel) -> None:
        self.model = model

    async def transcribe(self, audio: Path, ctx: StepContext,
                         settings: TranscribeSettings | None = None) -> Transcript:
        ts = settings or ctx.settings.transcribe
        request = LocalBackend(ts).request(audio, ts)
        reply = whisper_worker.transcribe(self.model, ts.model, request, io.StringIO())
        return Transcript.from_dict(reply["transcript"])

    async def aclose(self) -> None:
        return None


def test_an_english_only_model_is_asked_for_english() -> None:
    # Given no language, and an English-only model, a multilingual one, a chosen language
    def asked(**changes: Any) -> object:
        return LocalBackend(TranscribeSettings(**changes)).request(Path("a.wav"))["language"]

    # Then tiny.en (and a path to one) is asked for English; the others as configured
    assert asked(model="tiny.en") == "en"
    assert asked(model="/models/faster-whisper-base.en") == "en"
    assert asked(model="small") is None
    assert asked(model="tiny.en", language="de") == "de"


async def test_a_detected_language_and_its_probability_are_kept(
        media: Media, make_ctx: ContextFactory, tmp_path: Path) -> None:
    # Given a multilingual model, no language configured, and audio it detects as German
    settings = with_changes(Settings(), daemon={"state_dir": tmp_path},
                            transcribe={"model": "small", "language": None})
    model = DetectingModel("de", 0.93)
    step = TranscribeStep(settings, backend=WorkerBackend(model))
    ctx, _ = make_ctx(media.speech_wav, settings=settings, formats=("json", "srt"))
    # When it is transcribed
    result = await step.run(ctx)
    # Then the model was left to detect it, and the json and the facts say what it found
    assert model.asked == [None]
    doc = json.loads(result.artifacts["speech.json"].read_text())
    assert (doc["language"], doc["language_probability"]) == ("de", pytest.approx(0.93))
    assert result.facts["language"] == "de"
    assert result.facts["language_probability"] == pytest.approx(0.93)


@pytest.mark.slow
async def test_tiny_en_without_a_language_is_english(
        media: Media, make_ctx: ContextFactory, tmp_path: Path) -> None:
    # Given the real tiny.en model and no language in the config
    settings = with_changes(Settings(), daemon={"state_dir": tmp_path},
                            transcribe={"processes": 1, "threads": 1, "language": None})
    step = TranscribeStep(settings)
    try:
        ctx, _ = make_ctx(media.speech_wav, settings=settings, formats=("json",))
        # When speech is transcribed
        result = await step.run(ctx)
    finally:
        await step.aclose()
    # Then it is English, with nothing detected
    doc = json.loads(result.artifacts["speech.json"].read_text())
    assert (doc["language"], doc["language_probability"]) == ("en", None)
    assert wer(SPEECH_TEXT, doc["text"]) <= 0.3, doc["text"]


# --- readable subtitles -------------------------------------------------------------------


def srt_cues(text: str) -> list[tuple[float, float, list[str]]]:
    """(start, end, lines) of each cue of an srt file."""
    def seconds(clock: str) -> float:
        hours, minutes, rest = clock.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(rest.replace(",", "."))

    cues = []
    for block in text.strip().split("\n\n"):
        _, times, *lines = block.split("\n")
        start, end = times.split(" --> ")
        cues.append((seconds(start), seconds(end), lines))
    return cues


def assert_readable(cues: list[tuple[float, float, list[str]]], width: int, count: int) -> None:
    assert cues
    for start, end, lines in cues:
        assert 0 < end - start <= MAX_CUE_SECONDS + 0.001, (start, end, lines)
        assert 1 <= len(lines) <= count, lines
        assert all(len(line) <= width or " " not in line for line in lines), lines
    for (_, end, _), (start, _, _) in itertools.pairwise(cues):
        assert end <= start  # in order, never overlapping


def test_cues_are_cut_at_words_within_the_limits() -> None:
    # Given a segment of 40 s without word times (as an API gives), and one with them
    text = " ".join(f"word{i}" for i in range(60))
    timed = tuple(TimedWord(40.0 + i * 0.5, 40.4 + i * 0.5, f"w{i}") for i in range(20))
    transcript = Transcript((Segment(0.0, 40.0, text), Segment(39.0, 50.0, "x", words=timed)),
                            "en", 50.0, "m")
    # When it is written with at most 2 lines of 20 characters
    srt = to_srt(transcript, WriteOptions(max_line_width=20, max_line_count=2))
    # Then every cue keeps to the limits, is on screen at most 7 s, and none overlap
    cues = srt_cues(srt)
    assert_readable(cues, 20, 2)
    # And no word is lost or doubled, and the timed words keep their own times
    shown = " ".join(" ".join(lines) for _, _, lines in cues).split()
    assert shown == text.split() + [w.word for w in timed]
    assert cues[-1][1] == pytest.approx(timed[-1].end)


@pytest.mark.slow
async def test_real_subtitles_keep_to_the_limits_and_words_have_times(
        media: Media, make_ctx: ContextFactory, tmp_path: Path) -> None:
    # Given the real model, lines of at most 24 characters, 2 to a cue, and word timings
    settings = with_changes(Settings(), daemon={"state_dir": tmp_path}, transcribe={
        "processes": 1, "threads": 1, "max_line_width": 24, "max_line_count": 2,
        "word_timestamps": True})
    step = TranscribeStep(settings)
    try:
        ctx, _ = make_ctx(media.long_wav, settings=settings, formats=("srt", "vtt", "json"))
        # When ~20 s of speech in five sentences is transcribed
        result = await step.run(ctx)
    finally:
        await step.aclose()
    # Then the subtitles keep to the limits, in order, and say every word
    cues = srt_cues(result.artifacts["long.srt"].read_text())
    assert_readable(cues, 24, 2)
    shown = " ".join(" ".join(lines) for _, _, lines in cues)
    assert wer(LONG_TEXT, shown) <= 0.3, shown
    assert len(cues) > len(LONG_SENTENCES)  # sentences were cut into shorter cues
    assert result.artifacts["long.vtt"].read_text().count(" --> ") == len(cues)
    # And each segment's words have times, in order, within the segment
    doc = json.loads(result.artifacts["long.json"].read_text())
    for segment in doc["segments"]:
        words = segment["words"]
        assert [w["word"] for w in words] and all(w["probability"] > 0 for w in words)
        assert " ".join(w["word"] for w in words).split() == segment["text"].split()
        for word in words:
            assert segment["start"] - 0.01 <= word["start"] <= word["end"] \
                <= segment["end"] + 0.01, (segment, word)
        starts = [w["start"] for w in words]
        assert starts == sorted(starts)


# --- per-inbox settings -------------------------------------------------------------------

INBOX_CONFIG = """
[transcribe]
model = "tiny.en"
language = "en"
beam_size = 2

[enhance]
model = "deepseek-chat"

[[inbox]]
name = "films"
path = "{root}/films/inbox"
pipeline = ["preprocess", "transcribe"]
[inbox.transcribe]
max_line_width = 30

[[inbox]]
name = "meetings"
path = "{root}/meetings/inbox"
pipeline = ["preprocess", "transcribe", "enhance"]
[inbox.transcribe]
backend = "openai"
model = "whisper-1"
language = "de"
[inbox.enhance]
model = "deepseek-reasoner"

[[inbox]]
name = "talks"
path = "{root}/talks/inbox"
"""


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "traxd.toml"
    path.write_text(text.replace("{root}", str(tmp_path)))
    return load_settings(path)


def request_for(settings: Settings, inbox: str, index: int, tmp_path: Path) -> StepRequest:
    pipeline = settings.inbox(inbox).pipeline
    return build_request(
        JobInfo(1, inbox, "a.mp3", "ab" * 32, 5), step_index=index, step=pipeline[index],
        source=tmp_path / "a.mp3", media=None, facts={}, artifacts={},
        job_dir=tmp_path / "work", needs_workdir=True, settings=settings)


def test_inbox_tables_are_merged_over_the_global_sections(tmp_path: Path) -> None:
    # Given global [transcribe] and [enhance], and two inboxes with tables of their own
    settings = load(tmp_path, INBOX_CONFIG)
    # Then each inbox's settings are the global ones with its own keys over them
    films, meetings = settings.for_inbox("films"), settings.for_inbox("meetings")
    assert films.transcribe == dataclasses.replace(settings.transcribe, max_line_width=30)
    assert (meetings.transcribe.backend, meetings.transcribe.model,
            meetings.transcribe.language, meetings.transcribe.beam_size) == (
        "openai", "whisper-1", "de", 2)
    assert meetings.enhance.model == "deepseek-reasoner"
    assert settings.for_inbox("talks") is settings
    # And each step of a job gets its inbox's: preprocess cuts what that backend takes
    assert request_for(settings, "films", 0, tmp_path).settings["chunk_format"] == "wav"
    assert request_for(settings, "meetings", 0, tmp_path).settings["chunk_format"] == "mp3"
    assert request_for(settings, "meetings", 1, tmp_path).settings["language"] == "de"
    assert request_for(settings, "meetings", 2, tmp_path).settings["model"] == \
        "deepseek-reasoner"
    assert request_for(settings, "films", 1, tmp_path).settings["max_line_width"] == 30


@pytest.mark.parametrize(("table", "key", "why"), [
    ("[inbox.transcribe]\nbeam = 3\n", "inbox[0].transcribe.beam", "unknown key"),
    ("[inbox.transcribe]\nbeam_size = 0\n", "inbox[0].transcribe.beam_size", "at least 1"),
    ("[inbox.transcribe]\nlanguage = \"de\"\n", "inbox[0].transcribe.language",
     "knows only English"),
    ("transcribe = 5\n", "inbox[0].transcribe", "expected a table"),
])
def test_bad_inbox_tables_name_the_inbox_key(tmp_path: Path, table: str, key: str,
                                             why: str) -> None:
    text = f'[[inbox]]\nname = "a"\npath = "{tmp_path}/a/inbox"\n{table}'
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert (caught.value.key, why in caught.value.why) == (key, True), caught.value.why


def drop(source: Path, inbox: Path) -> None:
    """Copy a file into an inbox the way a user does: written aside, then renamed in."""
    inbox.mkdir(parents=True, exist_ok=True)
    aside = inbox.parent / f".{source.name}"
    shutil.copyfile(source, aside)
    aside.rename(inbox / source.name)


def subtitle_codecs(path: Path) -> list[str]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "s", "-show_entries",
                          "stream=codec_name", "-of", "csv=p=0", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return out.split()


MUX = ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", "{source}", "-i", "{srt}",
       "-map", "0", "-map", "1", "-c", "copy", "{output_dir}/{stem}.mkv"]


@pytest.mark.slow
@pytest.mark.integration
def test_inboxes_with_their_own_settings_in_one_daemon(media: Media, tmp_path: Path,
                                                       api_key: str) -> None:
    # Given one daemon with the real tiny.en model, and three inboxes: films with short
    # one-line cues and a command that muxes {srt} into an mkv, talks on the global
    # settings, and meetings in German through an OpenAI-compatible server
    with FakeOpenAI().running() as server:
        config = write_config(
            tmp_path / "traxd.toml", base_daemon(tmp_path),
            [{"name": "films", "path": str(tmp_path / "films" / "inbox"),
              "pipeline": ["preprocess", "transcribe", {"command": MUX}], "formats": ["srt"],
              "transcribe": {"max_line_width": 20, "max_line_count": 1}},
             {"name": "talks", "path": str(tmp_path / "talks" / "inbox"),
              "pipeline": ["preprocess", "transcribe"], "formats": ["txt", "json"]},
             {"name": "meetings", "path": str(tmp_path / "meetings" / "inbox"),
              "pipeline": ["preprocess", "transcribe"], "formats": ["json"],
              "transcribe": {"backend": "openai", "base_url": server.base_url,
                             "model": "whisper-1", "language": "de", "api_key_env": api_key}}],
            transcribe={"backend": "local", "model": "tiny.en", "processes": 1, "threads": 1})
        daemon = DaemonProcess(config, tmp_path / "log", env={api_key: os.environ[api_key]})
        try:
            daemon.start()
            # When a video, a talk and a meeting are dropped
            drop(media["speech.mp4"], tmp_path / "films" / "inbox")
            drop(media["speech.mp3"], tmp_path / "talks" / "inbox")
            drop(media["speech.ogg"], tmp_path / "meetings" / "inbox")
            wait_until(lambda: all(files_under(tmp_path / box / "done") or
                                   files_under(tmp_path / box / "failed")
                                   for box in ("films", "talks", "meetings")),
                       240, interval=0.2, message="three files finished")
        finally:
            daemon.stop()
        log = daemon.log_text()
    for box in ("films", "talks", "meetings"):
        assert files_under(tmp_path / box / "failed") == [], log[-3000:]
    # Then the film's cues keep to its own limits, and the mkv holds them as a stream
    films = tmp_path / "films" / "outputs"
    assert files_under(films) == ["speech.mkv", "speech.srt"]
    cues = srt_cues((films / "speech.srt").read_text())
    assert_readable(cues, 20, 1)
    assert subtitle_codecs(films / "speech.mkv") == ["subrip"]
    # And the talk used the global settings: one segment a cue, English, tiny.en
    talk = json.loads((tmp_path / "talks" / "outputs" / "speech.json").read_text())
    assert (talk["model"], talk["language"]) == ("tiny.en", "en")
    assert wer(SPEECH_TEXT, talk["text"]) <= 0.3, talk["text"]
    # And the meeting went to the server in German, with the inbox's model
    uploads = [r for r in server.requests if r.path.endswith("/audio/transcriptions")]
    assert uploads and {(r.fields["language"], r.fields["model"]) for r in uploads} == {
        ("de", "whisper-1")}
    meeting = json.loads((tmp_path / "meetings" / "outputs" / "speech.json").read_text())
    assert meeting["model"] == "whisper-1"
    # And the film and the talk shared one model process
    assert log.count('"model_loaded"') == 1, log[-3000:]


# --- subtitles beside the original ------------------------------------------------------------


def test_subtitles_beside_is_an_inbox_key(tmp_path: Path) -> None:
    settings = load(tmp_path, INBOX_CONFIG.replace(
        'name = "talks"', 'name = "talks"\nsubtitles = "beside"'))
    assert settings.for_inbox("talks").transcribe.subtitles == "beside"
    assert settings.for_inbox("films").transcribe.subtitles == "outputs"


def test_a_library_is_an_inbox_key_read_against_the_config(tmp_path: Path) -> None:
    # Given one inbox with its library beside the config, and one on the global settings
    settings = load(tmp_path, INBOX_CONFIG.replace(
        'name = "talks"', 'name = "talks"\nsubtitles = "library"\nlibrary = "media/talks"'))
    # Then the relative folder is read against the config file's, for that inbox only
    talks = settings.for_inbox("talks").transcribe
    assert (talks.subtitles, talks.library) == ("library", tmp_path / "media" / "talks")
    assert settings.for_inbox("films").transcribe.library is None
    # And the beam of the global [transcribe] still holds for it
    assert talks.beam_size == 2


@pytest.mark.parametrize(("text", "key", "why"), [
    ('[[inbox]]\nname = "a"\npath = "{root}/a/inbox"\nsubtitles = "library"\n',
     "inbox[0].subtitles", "library = "),
    ('[transcribe]\nsubtitles = "library"\n', "transcribe.subtitles", "library = "),
    ('[[inbox]]\nname = "a"\npath = "{root}/a/inbox"\nsubtitles = "library"\n'
     'library = "{root}/a/inbox/subs"\n', "inbox[0].library", "inside the inbox folder"),
    ('[transcribe]\nsubtitles = "library"\nlibrary = "{root}/b/processing"\n'
     '[[inbox]]\nname = "b"\npath = "{root}/b/inbox"\n', "transcribe.library",
     "inside the processing folder of inbox 'b'"),
    ('[[inbox]]\nname = "a"\npath = "{root}/a/inbox"\nlibrary = 3\n', "inbox[0].library",
     "expected a path"),
])
def test_a_library_without_a_usable_folder_is_refused(tmp_path: Path, text: str, key: str,
                                                      why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert (caught.value.key, why in caught.value.why) == (key, True), caught.value.why


@pytest.mark.slow
@pytest.mark.integration
def test_subtitles_land_beside_the_video_and_never_over_one_there(
        media: Media, tmp_path: Path) -> None:
    # Given an inbox whose subtitles go beside the originals, and a film whose English
    # subtitle is already in the library (done/)
    root = tmp_path / "films"
    config = write_config(
        tmp_path / "traxd.toml", base_daemon(tmp_path),
        [{"name": "films", "path": str(root / "inbox"), "pipeline": ["preprocess", "transcribe"],
          "formats": ["srt", "vtt"], "subtitles": "beside"}],
        transcribe={"backend": "local", "model": "tiny.en", "processes": 1, "threads": 1})
    film = "Movie (2020)"
    theirs = root / "done" / film / f"{film}.en.srt"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("1\n00:00:00,000 --> 00:00:01,000\nsomeone else's\n")
    with running_daemon(config, tmp_path / "log") as daemon:
        # When that film and another video are dropped
        (root / "inbox" / film).mkdir(parents=True)
        shutil.copyfile(media["speech.mp4"], root / f"{film}.mp4")
        (root / f"{film}.mp4").rename(root / "inbox" / film / f"{film}.mp4")
        drop(media["speech.mp4"], root / "inbox")
        wait_until(lambda: len(files_under(root / "done")) >= 7 or files_under(root / "failed"),
                   240, interval=0.2, message="both videos finished")
        log = daemon.log_text()
    # Then each video's subtitles are beside it under the media-server name, the one that
    # was there is untouched, and ours took the next free name
    assert files_under(root / "done") == sorted([
        f"{film}/{film}.mp4", f"{film}/{film}.en.srt", f"{film}/{film}.traxd.en.srt",
        f"{film}/{film}.en.vtt", "speech.mp4", "speech.en.srt", "speech.en.vtt"]), log[-3000:]
    assert "someone else's" in theirs.read_text()
    ours = root / "done" / film / f"{film}.traxd.en.srt"
    assert ours.read_text() == (root / "outputs" / film / f"{film}.srt").read_text()
    assert wer(SPEECH_TEXT, " ".join(" ".join(c[2]) for c in srt_cues(ours.read_text()))) <= 0.3
    assert (root / "done" / "speech.en.vtt").read_text().startswith("WEBVTT")
    # And the outputs folder has the usual files, nothing of the beside copies
    assert files_under(root / "outputs") == sorted([
        f"{film}/{film}.srt", f"{film}/{film}.vtt", "speech.srt", "speech.vtt"])


@pytest.mark.slow
@pytest.mark.integration
def test_subtitles_land_in_the_library_at_the_videos_place_and_never_over_one_there(
        media: Media, tmp_path: Path) -> None:
    # Given an inbox whose subtitles go into a media server's library, where the film is
    # already, with an English subtitle of its own
    root, library = tmp_path / "films", tmp_path / "library" / "Films"
    config = write_config(
        tmp_path / "traxd.toml", base_daemon(tmp_path),
        [{"name": "films", "path": str(root / "inbox"), "pipeline": ["preprocess", "transcribe"],
          "formats": ["srt", "vtt"], "subtitles": "library", "library": str(library)}],
        transcribe={"backend": "local", "model": "tiny.en", "processes": 1, "threads": 1})
    film = "Movie (2020)"
    theirs = library / film / f"{film}.en.srt"
    theirs.parent.mkdir(parents=True)
    shutil.copyfile(media["speech.mp4"], library / film / f"{film}.mp4")
    theirs.write_text("1\n00:00:00,000 --> 00:00:01,000\nsomeone else's\n")
    with running_daemon(config, tmp_path / "log") as daemon:
        # When that film (in a folder of its name) and another video are dropped
        (root / "inbox" / film).mkdir(parents=True)
        shutil.copyfile(media["speech.mp4"], root / f"{film}.mp4")
        (root / f"{film}.mp4").rename(root / "inbox" / film / f"{film}.mp4")
        drop(media["speech.mp4"], root / "inbox")
        wait_until(lambda: (len(files_under(root / "done")) >= 2
                            and len(files_under(library)) >= 6) or files_under(root / "failed"),
                   240, interval=0.2, message="both videos finished")
        log = daemon.log_text()
    # Then each video's subtitles are in the library at its relative path under the
    # media-server name; the one that was there is untouched, and ours took the next name
    assert files_under(library) == sorted([
        f"{film}/{film}.mp4", f"{film}/{film}.en.srt", f"{film}/{film}.traxd.en.srt",
        f"{film}/{film}.en.vtt", "speech.en.srt", "speech.en.vtt"]), log[-3000:]
    assert "someone else's" in theirs.read_text()
    ours = library / film / f"{film}.traxd.en.srt"
    assert ours.read_text() == (root / "outputs" / film / f"{film}.srt").read_text()
    assert wer(SPEECH_TEXT, " ".join(" ".join(c[2]) for c in srt_cues(ours.read_text()))) <= 0.3
    assert (library / "speech.en.vtt").read_text().startswith("WEBVTT")
    # And done/ holds the originals only, outputs/ the usual files
    assert files_under(root / "done") == sorted([f"{film}/{film}.mp4", "speech.mp4"])
    assert files_under(root / "outputs") == sorted([
        f"{film}/{film}.srt", f"{film}/{film}.vtt", "speech.srt", "speech.vtt"])


async def test_an_inbox_enhance_table_reaches_the_enhance_step(
        make_ctx: ContextFactory, tmp_path: Path, api_key: str) -> None:
    # Given one enhance step built from the global [enhance], and a job of an inbox whose
    # own [inbox.enhance] names another model
    with FakeOpenAI().running() as server:
        common = with_changes(Settings(), daemon={"state_dir": tmp_path}, enhance={
            "base_url": server.base_url, "api_key_env": api_key, "model": "common-editor"})
        inbox = with_changes(common, enhance={"model": "inbox-editor"})
        transcript = Transcript((Segment(0.0, 5.0, "hello there"),), "en", 5.0, "tiny.en")
        source = tmp_path / "talk.mp3"
        source.write_bytes(b"x")
        ctx, _ = make_ctx(source, settings=inbox,
                          facts={"transcript": str(transcript.save(tmp_path / "t.json"))})
        step = EnhanceStep(common)
        try:
            # When the job is enhanced
            result = await step.run(ctx)
        finally:
            await step.aclose()
    # Then the inbox's model was asked
    assert [r.json["model"] for r in server.requests] == ["inbox-editor"]
    assert result.facts["enhance_model"] == "inbox-editor"
