"""The step interface: what a pipeline step gets and what it gives back."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from structlog.typing import FilteringBoundLogger

from traxd.config import Settings
from traxd.procs import ProcessLimits


@dataclass(frozen=True)
class JobInfo:
    """The file a job is about."""

    job_id: int
    inbox: str
    name: str  # path relative to the inbox, e.g. "talks/intro.mp3"
    sha256: str
    size: int

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def filename(self) -> str:
        return Path(self.name).name


# The workdir of a step that declares `needs_workdir = False`: anything written here fails.
NO_WORKDIR = Path(os.devnull) / "no-workdir"


@dataclass(frozen=True)
class StepContext:
    job: JobInfo
    input: Path  # the media this step works on: the original, or an earlier step's `media`
    source: Path  # the original file, claimed into processing/
    workdir: Path  # an empty folder of this step's own (NO_WORKDIR when it asked for none)
    facts: Mapping[str, Any]  # JSON-able facts from earlier steps (duration, language, ...)
    artifacts: Mapping[str, Path]  # outputs of earlier steps: output file name -> file
    settings: Settings
    formats: tuple[str, ...]  # transcript formats the inbox asks for
    limits: ProcessLimits  # for every child process the step starts
    log: FilteringBoundLogger
    progress: Callable[[float], None]  # fraction done, 0..1
    # This step's own settings from its request, JSON-able (e.g. preprocess: chunk_format,
    # chunk_seconds), decided by the daemon from the pipeline.
    step_settings: Mapping[str, Any] = field(default_factory=dict)


# A fact a step sets to have lines appended to files once the whole job is done (and only
# then): [{"file": path, "line": text}]. The download archive uses it, so that a link whose
# later steps fail is not refused as "already downloaded" when the file is retried.
RECORD_WHEN_DONE = "record_when_done"

# An artifact whose name starts with this goes beside the original's final place in done/
# (or its place in the inbox's library folder), not into outputs/: "beside:.en.srt" for
# `Movie (2020).mkv` becomes `Movie (2020).en.srt` (what Plex, Jellyfin and Emby look for),
# or another name when that one is taken.
BESIDE = "beside:"


@dataclass
class StepResult:
    # Output file name (e.g. "talk.srt") -> a file under the step's workdir. Published into
    # outputs/ when the whole pipeline has succeeded; a later step's artifact of the same
    # name replaces an earlier one.
    artifacts: dict[str, Path] = field(default_factory=dict)
    media: Path | None = None  # the input of the next step; None keeps the current one
    facts: dict[str, Any] = field(default_factory=dict)  # merged into the job's facts
    spawn: list[Path] = field(default_factory=list)  # files to drop into the inbox as new jobs
    finish: bool = False  # end the pipeline after this step (e.g. a link list that was split)


class Step(Protocol):
    """One stage of a pipeline. Built once per daemon and shared by all jobs.

    A step may say `needs_workdir = False` (an in-process step that writes nothing): it then
    gets no folder. Without the attribute it gets one.
    """

    name: str

    async def run(self, ctx: StepContext) -> StepResult:
        """Do the work; raise a traxd.errors class (Retry, Permanent, BackendFatal) on failure."""
        ...

    async def aclose(self) -> None:
        """Release what the step holds (model processes, HTTP clients)."""
        ...


def needs_workdir(step: object) -> bool:
    """Whether `step` wants a work folder of its own (True unless it says otherwise)."""
    return bool(getattr(step, "needs_workdir", True))
