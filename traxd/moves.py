"""The folder side of claiming and finishing jobs, a batch at a time (run in a thread).

Each function takes a batch and does its file-system work with one fsync per folder at the
end. Names are chosen here (`plan_*`) and written to the journal by the caller before the
moves (`claim`, `publish`, `place`) happen.
"""

from __future__ import annotations

import itertools
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from traxd.errors import Permanent
from traxd.folders import (
    InboxFolders,
    LinkOnPath,
    copy_atomic,
    describe_unprocessable,
    fsync_dirs,
    movable,
    move,
    move_out_of,
    remove_empty_parents,
    scan,
    sidecar_path,
    unique_path,
    write_atomic,
)
from traxd.journal import Job, JobState
from traxd.pipeline.base import BESIDE

SPAWN_PREFIX = "spawn:"


@dataclass(frozen=True)
class ClaimPlan:
    job: Job
    dest: Path | None = None  # where in processing/ the file goes
    changed: bool = False  # size or mtime differ from what settled: watch it again
    problem: Exception | None = None


@dataclass(frozen=True)
class Ending:
    """A job to finish: its outcome, and for a job done, what it publishes."""

    job: Job
    outcome: JobState
    error: dict[str, object] | None = None
    artifacts: Mapping[str, str] = field(default_factory=dict)  # name -> file in the workdir
    spawn: Sequence[str] = ()  # files to drop into the inbox as new jobs
    workdir: Path | None = None  # removed when the job is finished
    # Publish these outputs now and leave the job running (a later, optional step waits):
    # no destination for the original, no move. The final publish adds the rest.
    partial: bool = False

    def sources(self) -> dict[str, str]:
        return {**self.artifacts, **{SPAWN_PREFIX + str(i): p for i, p in enumerate(self.spawn)}}


class Mover:
    """Claims into processing/, publishes into outputs/, moves into done/ or failed/."""

    def __init__(self, folders: dict[str, InboxFolders]) -> None:
        self.folders = folders
        # Outputs planned by jobs not yet finished: no other job may choose these names,
        # even before the files exist (a restart between planning and publishing).
        self.reserved: set[Path] = set()
        # Claims make sub-folders of processing/ and finishes remove the empty ones, in
        # threads of their own: one at a time, so that no folder goes while in use.
        self._folders_in_use = threading.Lock()

    def reserve(self, jobs: Sequence[Job]) -> None:
        """At start-up: the output names that live jobs planned before a stop."""
        for job in jobs:
            self.reserved.update(Path(dest) for dest in (job.outputs or {}).values())

    def adopt_strays(self, claimed: set[str]) -> list[tuple[Path, Path]]:
        """Files in a processing/ folder that no live job claimed (a journal moved aside or
        lost) go back into their inbox to be processed anew; returns (from, to) pairs."""
        moved: list[tuple[Path, Path]] = []
        for folders in self.folders.values():
            if not folders.processing.is_dir():
                continue
            for rel in scan(folders.processing):
                src = folders.processing / rel
                if str(src) not in claimed:
                    dest = unique_path(folders.inbox, rel)
                    move(src, dest)
                    moved.append((src, dest))
        return moved

    # --- claim ------------------------------------------------------------------------------

    def plan_claims(self, jobs: Sequence[Job]) -> list[ClaimPlan]:
        taken: set[Path] = set()
        plans = []
        for job in jobs:
            plan = self._plan_claim(job, taken)
            if plan.dest is not None:
                taken.add(plan.dest)
            plans.append(plan)
        return plans

    def _plan_claim(self, job: Job, taken: set[Path]) -> ClaimPlan:
        folders = self.folders[job.inbox]
        if job.claimed_path is not None:
            return ClaimPlan(job, Path(job.claimed_path))
        src = folders.inbox / job.rel_path
        if (reason := describe_unprocessable(src)) is not None:
            return ClaimPlan(job, problem=Permanent(reason, reason="input"))
        try:
            info = src.stat()
        except OSError as exc:
            return ClaimPlan(job, problem=exc)
        if (info.st_size, info.st_mtime_ns) != (job.size, job.mtime_ns):
            return ClaimPlan(job, changed=True)
        if not movable(src):
            return ClaimPlan(job, problem=Permanent(
                f"{src.parent} cannot be written (read-only or no permission), and traxd moves "
                "each file out of its inbox while it works on it: make the folder writable or "
                "copy the files into a writable inbox; the file is left where it is",
                reason="read_only"))
        return ClaimPlan(job, unique_path(folders.processing, job.rel_path, taken))

    def claim(self, plans: Sequence[ClaimPlan]) -> list[Exception | None]:
        """Rename each file into processing/ (a repeat completes a claim cut short)."""
        with self._folders_in_use:
            return self._claim(plans)

    def _claim(self, plans: Sequence[ClaimPlan]) -> list[Exception | None]:
        synced: set[Path] = set()
        errors: list[Exception | None] = []
        for plan in plans:
            assert plan.dest is not None
            inbox = self.folders[plan.job.inbox].inbox
            try:
                if not os.path.lexists(plan.dest) and os.path.lexists(inbox / plan.job.rel_path):
                    move_out_of(inbox, plan.job.rel_path, plan.dest, synced)
                errors.append(None)
            except LinkOnPath as exc:
                errors.append(Permanent(str(exc), reason="input"))
            except OSError as exc:
                errors.append(exc)
        fsync_dirs(synced)
        for plan in plans:
            remove_empty_parents(self.folders[plan.job.inbox].inbox / plan.job.rel_path,
                                 self.folders[plan.job.inbox].inbox)
        return errors

    # --- publish ----------------------------------------------------------------------------

    def plan_endings(self, publishing: Sequence[Ending], ending: Sequence[Ending]
                     ) -> tuple[list[dict[str, str]], list[Path]]:
        """Names for the outputs of `publishing` and the originals of `ending`, in one go
        (subtitles that go beside an original take its name)."""
        finals = self.plan_finals(ending)
        by_job = {e.job.id: final for e, final in zip(ending, finals, strict=True)}
        return self.plan_outputs(publishing, by_job), finals

    def plan_outputs(self, endings: Sequence[Ending],
                     finals: Mapping[int, Path] | None = None) -> list[dict[str, str]]:
        """Destinations of every output, unique across the batch, the folders and the names
        other unfinished jobs hold; a job's plan so far (outputs published before a later
        step ran) is kept and added to. `finals`: where each job's original goes (job id ->
        path), planned here when not given; a partial ending has none."""
        if finals is None:
            whole = [e for e in endings if not e.partial]
            finals = dict(zip((e.job.id for e in whole), self.plan_finals(whole), strict=True))
        taken = self.reserved
        return [self._plan_outputs(ending, taken, finals.get(ending.job.id))
                for ending in endings]

    def _plan_outputs(self, ending: Ending, taken: set[Path],
                      final: Path | None) -> dict[str, str]:
        folders = self.folders[ending.job.inbox]
        subdir = PurePosixPath(ending.job.rel_path).parent
        plan: dict[str, str] = dict(ending.job.outputs or {})
        # Subtitles go where the original sits in the library, or beside it in done/ (known
        # once it has a place: not for a partial ending).
        like = final if folders.library is None else folders.library / ending.job.rel_path
        for key in sorted(set(ending.artifacts) - set(plan)):
            if not key.startswith(BESIDE):
                plan[key] = str(self._take(folders.outputs, str(subdir / key), taken))
            elif like is not None:
                plan[key] = str(self._beside(like, key.removeprefix(BESIDE), taken))
        for index, spawned in enumerate(ending.spawn):
            if SPAWN_PREFIX + str(index) not in plan:
                dest = self._take(folders.inbox, str(subdir / Path(spawned).name), taken)
                plan[SPAWN_PREFIX + str(index)] = str(dest)
        return plan

    @staticmethod
    def _take(folder: Path, rel: str, taken: set[Path]) -> Path:
        dest = unique_path(folder, rel, taken)
        taken.add(dest)
        return dest

    @staticmethod
    def _beside(video: Path, suffix: str, taken: set[Path]) -> Path:
        """`Movie (2020).en.srt` beside `Movie (2020).mkv` (suffix ".en.srt"); when that is
        taken (a subtitle already there), `Movie (2020).traxd.en.srt`, then `.traxd2.`, …"""
        stem = video.with_suffix("").name
        candidates = itertools.chain(
            [f"{stem}{suffix}", f"{stem}.traxd{suffix}"],
            (f"{stem}.traxd{n}{suffix}" for n in itertools.count(2)))
        dest = next(video.with_name(name) for name in candidates
                    if not os.path.lexists(video.with_name(name))
                    and video.with_name(name) not in taken)
        taken.add(dest)
        return dest

    def publish(self, endings: Sequence[Ending]) -> list[Exception | None]:
        """Copy each job's outputs to the destinations its journal row names (a partial
        ending: those of its outputs that it brings)."""
        synced: set[Path] = set()
        errors: list[Exception | None] = []
        for ending in endings:
            try:
                sources = ending.sources()
                for key, dest in (ending.job.outputs or {}).items():
                    if ending.partial and key not in sources:
                        continue
                    copy_atomic(Path(sources[key]), Path(dest), synced)
                errors.append(None)
            except (OSError, KeyError) as exc:
                errors.append(exc)
        fsync_dirs(synced)
        return errors

    # --- the original -----------------------------------------------------------------------

    def plan_finals(self, endings: Sequence[Ending]) -> list[Path]:
        taken: set[Path] = set()
        finals = []
        for ending in endings:
            folders = self.folders[ending.job.inbox]
            base = folders.failed if ending.outcome is JobState.FAILED else folders.done
            finals.append(self._take(base, ending.job.rel_path, taken))
        return finals

    def place(self, endings: Sequence[Ending], sidecars: Sequence[bytes | None]
              ) -> list[Exception | None]:
        """Move each original to its final path (a failure's sidecar beside it)."""
        with self._folders_in_use:
            return self._place_all(endings, sidecars)

    def _place_all(self, endings: Sequence[Ending], sidecars: Sequence[bytes | None]
                   ) -> list[Exception | None]:
        synced: set[Path] = set()
        errors: list[Exception | None] = []
        emptied: list[tuple[Path, Path]] = []
        for ending, sidecar in zip(endings, sidecars, strict=True):
            try:
                emptied += self._place(ending.job, sidecar, synced)
                errors.append(None)
            except OSError as exc:
                errors.append(exc)
        fsync_dirs(synced)
        for path, stop in emptied:
            remove_empty_parents(path, stop)
        for ending, error in zip(endings, errors, strict=True):
            if error is None:
                self.reserved.difference_update(
                    Path(dest) for dest in (ending.job.outputs or {}).values())
            if ending.workdir is not None:
                shutil.rmtree(ending.workdir, ignore_errors=True)
        return errors

    def _place(self, job: Job, sidecar: bytes | None, synced: set[Path]
               ) -> list[tuple[Path, Path]]:
        assert job.final_path is not None
        final = Path(job.final_path)
        if job.outcome == JobState.FAILED.value:
            self.withdraw_outputs(job)
            write_atomic(sidecar_path(final), sidecar or b"{}\n", synced)
        src = self.source(job)
        if os.path.lexists(src) and not os.path.lexists(final) and movable(src):
            move(src, final, synced)
            folders = self.folders[job.inbox]
            return [(src, folders.processing if job.claimed_path else folders.inbox)]
        return []

    def source(self, job: Job) -> Path:
        if job.claimed_path is not None:
            return Path(job.claimed_path)
        return self.folders[job.inbox].inbox / job.rel_path

    @staticmethod
    def withdraw_outputs(job: Job) -> None:
        """A file that failed keeps no outputs: remove those this job's plan names."""
        for key, dest in (job.outputs or {}).items():
            if not key.startswith(SPAWN_PREFIX):
                Path(dest).unlink(missing_ok=True)


class InPlaceMover(Mover):
    """`traxd batch`: originals stay where they are; no claim, no final move."""

    def _plan_claim(self, job: Job, taken: set[Path]) -> ClaimPlan:
        path = self.folders[job.inbox].inbox / job.rel_path
        if (reason := describe_unprocessable(path)) is not None:
            return ClaimPlan(job, problem=Permanent(reason, reason="input"))
        return ClaimPlan(job, path)

    def claim(self, plans: Sequence[ClaimPlan]) -> list[Exception | None]:
        return [None] * len(plans)

    def plan_finals(self, endings: Sequence[Ending]) -> list[Path]:
        return [self.folders[e.job.inbox].inbox / e.job.rel_path for e in endings]

    def _place(self, job: Job, sidecar: bytes | None, synced: set[Path]
               ) -> list[tuple[Path, Path]]:
        if job.outcome == JobState.FAILED.value:
            self.withdraw_outputs(job)
        return []
