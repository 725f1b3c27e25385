"""Real media made at set-up (espeak-ng speech, ffmpeg) and step contexts for the tests."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from traxd.config import Settings
from traxd.logs import get_logger
from traxd.pipeline.base import JobInfo, StepContext
from traxd.procs import ProcessLimits

from .helpers import ffmpeg

SPEECH_TEXT = ("Please remember to bring your notes to the meeting. "
               "The weather will be warm and sunny tomorrow.")
LONG_SENTENCES = (
    "Please remember to bring your notes to the meeting.",
    "The weather will be warm and sunny tomorrow.",
    "We will start the project on Monday morning.",
    "Our team has finished the first version of the report.",
    "Thank you all for listening to this short message.",
)
LONG_TEXT = " ".join(LONG_SENTENCES)
PAUSE_MS = 1500


@dataclass(frozen=True)
class Media:
    folder: Path
    speech_wav: Path  # ~5 s of speech, espeak's own 22 kHz wav
    long_wav: Path  # ~20 s: five sentences with 1.5 s pauses between them
    files: Mapping[str, Path] = field(default_factory=dict)  # the speech in other formats

    def __getitem__(self, name: str) -> Path:
        return self.files[name]


def _espeak(text: str, out: Path, *, ssml: bool = False) -> Path:
    argv = ["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(out)]
    subprocess.run([*argv, "-m", text] if ssml else [*argv, text], check=True)
    return out


def _formats(speech: Path, folder: Path) -> dict[str, Path]:
    files = {}
    for name, codec in (("speech.mp3", "libmp3lame"), ("speech.m4a", "aac"),
                        ("speech.ogg", "libopus"), ("speech.flac", "flac")):
        ffmpeg("-i", str(speech), "-c:a", codec, str(folder / name))
        files[name] = folder / name
    video = folder / "speech.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=c=blue:s=64x64:r=10", "-i", str(speech),
           "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-c:a", "aac", "-shortest",
           str(video))
    silent = folder / "noaudio.mp4"
    ffmpeg("-f", "lavfi", "-i", "color=c=red:s=64x64:r=10:d=2", "-c:v", "libx264", str(silent))
    return {**files, "speech.mp4": video, "noaudio.mp4": silent}


def _broken(folder: Path) -> dict[str, Path]:
    noise = folder / "random.mp3"
    noise.write_bytes(bytes((i * 7919 + 13) % 251 for i in range(20_000)))
    text = folder / "text.mp4"
    text.write_text("this is not a video\n" * 50)
    tiny = folder / "tiny.wav"
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "0.01", str(tiny))
    return {"random.mp3": noise, "text.mp4": text, "tiny.wav": tiny}


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> Media:
    """Given speech made by espeak-ng and converted by ffmpeg into the usual formats."""
    folder = tmp_path_factory.mktemp("media")
    speech = _espeak(SPEECH_TEXT, folder / "speech.wav")
    pause = f'<break time="{PAUSE_MS}ms"/>'
    long_wav = _espeak(f"<speak>{pause.join(LONG_SENTENCES)}</speak>", folder / "long.wav",
                       ssml=True)
    minute = folder / "minute.wav"  # whisper works in 30 s windows: this needs three
    ffmpeg("-stream_loop", "2", "-i", str(long_wav), "-ac", "1", "-ar", "16000", str(minute))
    files = {**_formats(speech, folder), **_broken(folder), "speech.wav": speech,
             "long.wav": long_wav, "minute.wav": minute}
    return Media(folder, speech, long_wav, files)


Progress = list[float]
ContextFactory = Callable[..., tuple[StepContext, Progress]]


def with_changes(settings: Settings, **sections: Mapping[str, Any]) -> Settings:
    """Settings with fields of some sections replaced: with_changes(s, transcribe={...})."""
    changes = {name: dataclasses.replace(getattr(settings, name), **values)
               for name, values in sections.items()}
    return dataclasses.replace(settings, **changes)


@pytest.fixture
def make_ctx(tmp_path: Path) -> ContextFactory:
    """A StepContext for one file, with its own workdir and a progress list."""
    counter = iter(range(1, 1000))

    def build(source: Path, *, settings: Settings | None = None,
              facts: Mapping[str, Any] | None = None, formats: tuple[str, ...] = ("txt",),
              limits: ProcessLimits | None = None,
              step_settings: Mapping[str, Any] | None = None) -> tuple[StepContext, Progress]:
        number = next(counter)
        workdir = tmp_path / f"work-{number}"
        workdir.mkdir()
        progress: Progress = []
        job = JobInfo(number, "test", source.name, "ab" * 32, source.stat().st_size)
        base = settings or with_changes(Settings(), daemon={"state_dir": tmp_path / "state"})
        ctx = StepContext(
            job=job, input=source, source=source, workdir=workdir, facts=facts or {},
            artifacts={}, settings=base, formats=formats,
            limits=limits or ProcessLimits(timeout=120, stall_seconds=60, memory_limit_mb=4096),
            log=get_logger(job_id=number, file=source.name), progress=progress.append,
            step_settings=step_settings or {})
        return ctx, progress

    return build


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An API key in the environment variable the settings name."""
    key = "sk-test-" + "x" * 24
    monkeypatch.setenv("TRAXD_TEST_KEY", key)
    yield "TRAXD_TEST_KEY"
