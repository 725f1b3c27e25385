"""Job runner: claim, steps with checkpoints, outputs, done/failed, retries, crash repeats."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import copy_step, files_under, with_pipeline
from traxd import folders, moves
from traxd.config import Settings
from traxd.errors import BackendFatal, Permanent, Retry
from traxd.executor import LocalExecutor
from traxd.folders import InboxFolders
from traxd.jobs import BackendGate, JobRunner, Outcome
from traxd.journal import Job, JobState, Journal
from traxd.moves import Ending, Mover
from traxd.pipeline.base import RECORD_WHEN_DONE, StepContext, StepResult
from traxd.pipeline.command import render_argv
from traxd.pipeline.formats import WARNINGS_FACT, file_warning
from traxd.pipeline.registry import StepRegistry


@dataclass
class ScriptedStep:
    """Writes <stem>.<name> and counts its runs; raises the scripted errors first."""

    name: str
    errors: list[Exception] = field(default_factory=list)
    runs: int = 0
    facts: dict[str, Any] = field(default_factory=dict)

    async def run(self, ctx: StepContext) -> StepResult:
        self.runs += 1
        if self.errors:
            raise self.errors.pop(0)
        out = ctx.workdir / f"{ctx.job.stem}.{self.name}"
        out.write_text(f"{self.name} of {ctx.input.name}")
        return StepResult(artifacts={out.name: out}, facts={"duration": 2.5, **self.facts})

    async def aclose(self) -> None:
        return None


class Harness:
    def __init__(self, settings: Settings, *steps: ScriptedStep) -> None:
        pipeline = [s.name for s in steps]
        self.settings = with_pipeline(settings, *pipeline) if steps else settings
        self.journal = Journal.open(settings.daemon.state_dir / "j.sqlite3")
        self.registry = StepRegistry(self.settings)
        for step in steps:
            self.registry.register(step.name, step)
        self.gate = BackendGate()
        executor = LocalExecutor(self.settings, self.registry)
        self.runner = JobRunner(self.settings, self.journal, executor, self.gate, Mover({}))
        self.folders = InboxFolders.of(self.settings.inboxes[0], self.settings.folders)
        self.folders.create()

    def drop(self, rel: str, data: bytes = b"media") -> Job:
        path = self.folders.inbox / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        info = path.stat()
        job = self.journal.add_seen("main", rel, info.st_size, info.st_mtime_ns, 5)
        return self.take(self.journal.queue(job, "ab", info.st_size, info.st_mtime_ns))

    def take(self, job: Job) -> Job:
        """The job as the pool would hand it over: the current row, out of the ready set."""
        current = self.journal.get(job.id)
        self.journal.take(current)
        return current

    async def run(self, job: Job) -> Outcome:
        return await self.runner.run(self.take(job))

    def finished(self, job: Job, state: JobState) -> bool:
        return job.id not in self.journal and self.journal.count("main", state) >= 1


async def test_done_job_publishes_outputs_and_moves_the_original(settings: Settings) -> None:
    h = Harness(settings, ScriptedStep("a"), ScriptedStep("b"))
    job = h.drop("talks/intro.mp3")
    assert await h.run(job) is Outcome.DONE
    assert files_under(h.folders.outputs) == ["talks/intro.a", "talks/intro.b"]
    assert files_under(h.folders.done) == ["talks/intro.mp3"]
    assert files_under(h.folders.inbox) == files_under(h.folders.processing) == []
    assert h.finished(job, JobState.DONE)
    assert not (h.runner.work_root / str(job.id)).exists()
    # And the row on disk says so
    h.journal.sync()
    assert h.journal.done_with_hash("main", "ab") == job.id


async def test_names_taken_in_outputs_and_done_get_numbers(settings: Settings) -> None:
    h = Harness(settings, ScriptedStep("a"))
    for _ in range(2):
        job = h.drop("x.mp3")
        assert await h.run(job) is Outcome.DONE
    assert files_under(h.folders.outputs) == ["x (1).a", "x.a"]
    assert files_under(h.folders.done) == ["x (1).mp3", "x.mp3"]


async def test_permanent_error_fails_with_a_sidecar(settings: Settings) -> None:
    h = Harness(settings, ScriptedStep("a"), ScriptedStep("b", [Permanent("no audio stream")]))
    job = h.drop("sub/bad.mp4")
    assert await h.run(job) is Outcome.FAILED
    assert files_under(h.folders.failed) == ["sub/bad.mp4", "sub/bad.mp4.error.json"]
    sidecar = json.loads((h.folders.failed / "sub/bad.mp4.error.json").read_text())
    assert sidecar["category"] == "permanent"
    assert sidecar["message"] == "no audio stream"
    assert sidecar["step"] == "b"
    assert sidecar["attempts"] == 1
    assert sidecar["file"] == "sub/bad.mp4"
    assert {"first_seen", "started", "failed_at"} <= set(sidecar)
    assert files_under(h.folders.outputs) == []


async def test_retry_resumes_after_the_last_finished_step(settings: Settings) -> None:
    first, second = ScriptedStep("a"), ScriptedStep("b", [Retry("HTTP 503", reason="http")])
    h = Harness(settings, first, second)
    job = h.drop("x.mp3")
    assert await h.run(job) is Outcome.RETRY
    again = h.journal.get(job.id)
    assert again.state is JobState.QUEUED
    assert again.step == 1
    assert again.priority == job.priority + 1
    assert again.not_before > job.updated
    assert await h.run(job) is Outcome.DONE
    assert (first.runs, second.runs) == (1, 2)
    assert files_under(h.folders.outputs) == ["x.a", "x.b"]


@pytest.mark.parametrize(("error", "category", "reason"), [
    (Retry("timeout", reason="timeout"), "retry", "timeout"),
    (TypeError("'NoneType' is not iterable"), "internal", "TypeError"),  # a bug, not bad input
])
async def test_retries_are_capped_then_the_file_fails(settings: Settings, error: Exception,
                                                      category: str, reason: str) -> None:
    h = Harness(settings, ScriptedStep("a", [error] * 10))
    job = h.drop("x.mp3")
    outcomes = [await h.run(job) for _ in range(settings.daemon.max_retries + 1)]
    assert outcomes[:-1] == [Outcome.RETRY] * settings.daemon.max_retries
    assert outcomes[-1] is Outcome.FAILED
    sidecar = json.loads((h.folders.failed / "x.mp3.error.json").read_text())
    assert (sidecar["category"], sidecar["reason"]) == (category, reason)
    assert sidecar["attempts"] == settings.daemon.max_retries + 1


async def test_fatal_backend_error_pauses_the_backend_and_keeps_the_file(
        settings: Settings) -> None:
    h = Harness(settings, ScriptedStep("a", [BackendFatal("401 bad key", backend="openai")]))
    job = h.drop("x.mp3")
    assert await h.run(job) is Outcome.WAITING
    assert h.gate.paused == {"openai": "401 bad key"}
    assert h.journal.get(job.id).state is JobState.WAITING
    assert files_under(h.folders.failed) == []
    assert files_under(h.folders.processing) == ["x.mp3"]


async def test_a_transcript_is_published_while_the_enhancement_waits(
        settings: Settings) -> None:
    # Given a transcript step that works and an enhancement without its key
    enhance = ScriptedStep("enhance", [BackendFatal("no API key", backend="enhance")])
    h = Harness(settings, ScriptedStep("txt"), enhance)
    first = h.drop("talk.mp3")
    # When the job runs, it waits for the key, and its transcript is published already
    assert await h.run(first) is Outcome.WAITING
    assert h.gate.paused == {"enhance": "no API key"}
    assert files_under(h.folders.outputs) == ["talk.txt"]
    assert files_under(h.folders.processing) == ["talk.mp3"]
    # And a file that comes while the backend is paused does the same, without a request
    second = h.drop("sub/other.mp3")
    assert await h.run(second) is Outcome.WAITING
    assert enhance.runs == 1
    assert files_under(h.folders.outputs) == ["sub/other.txt", "talk.txt"]
    # When the backend is resumed, each job adds its enhanced file to what is there
    h.gate.resume()
    h.journal.release_all()
    assert [await h.run(job) for job in (first, second)] == [Outcome.DONE] * 2
    assert files_under(h.folders.outputs) == ["sub/other.enhance", "sub/other.txt",
                                              "talk.enhance", "talk.txt"]
    assert files_under(h.folders.done) == ["sub/other.mp3", "talk.mp3"]
    assert h.runner.mover.reserved == set()


async def test_with_no_one_to_resume_a_paused_enhancement_is_a_warning(
        settings: Settings) -> None:
    # Given a runner for `traxd batch`, where no one runs `traxd resume`
    h = Harness(settings, ScriptedStep("txt"),
                ScriptedStep("enhance", [BackendFatal("no API key", backend="enhance")]))
    h.runner.optional_waits = False
    job = h.drop("talk.mp3")
    # When the enhancement has no key, the file is done with its transcript and a warning
    assert await h.run(job) is Outcome.DONE
    assert files_under(h.folders.outputs) == ["talk.txt", "talk.warnings.json"]
    warning = json.loads((h.folders.outputs / "talk.warnings.json").read_text())
    assert (warning["warnings"][0]["step"], warning["warnings"][0]["category"]) == (
        "enhance", "fatal")
    assert files_under(h.folders.failed) == []


async def test_a_symlink_in_the_inbox_is_refused_not_followed(settings: Settings,
                                                              tmp_path: Path) -> None:
    h = Harness(settings, ScriptedStep("a"))
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    (h.folders.inbox / "link.mp3").symlink_to(secret)
    job = h.journal.add_seen("main", "link.mp3", 0, 0, 5)
    h.journal.queue(job, None, 0, 0)
    assert await h.run(job) is Outcome.FAILED
    assert (h.folders.failed / "link.mp3").is_symlink()
    sidecar = json.loads((h.folders.failed / "link.mp3.error.json").read_text())
    assert "symbolic link" in sidecar["message"]
    assert secret.read_text() == "do not read"


async def test_finalize_repeats_cleanly_after_a_crash_before_the_move(settings: Settings) -> None:
    h = Harness(settings, ScriptedStep("a"))
    job = h.drop("x.mp3")
    claimed = await h.runner.claims.claim(job)
    assert claimed is not None
    # Given a crash right after the destination was written down, before the move
    h.journal.destine(claimed, JobState.DONE, str(h.folders.done / "x.mp3"), None)
    h.journal.interrupt(h.journal.get(job.id))  # as recovery finds it
    # When the job is run again (as recovery does)
    assert await h.run(job) is Outcome.DONE
    # Then the original is in done/ once and nowhere else
    assert files_under(h.folders.done) == ["x.mp3"]
    assert files_under(h.folders.processing) == []


async def test_publish_repeats_into_the_same_names(settings: Settings) -> None:
    h = Harness(settings, ScriptedStep("a"))
    job = h.drop("x.mp3")
    claimed = await h.runner.claims.claim(job)
    assert claimed is not None
    artifact = h.runner.work_root / "x.a"
    artifact.parent.mkdir(parents=True, exist_ok=True)
    artifact.write_text("out")
    ending = Ending(claimed, JobState.DONE, artifacts={"x.a": str(artifact)})
    [plan] = h.runner.mover.plan_outputs([ending])
    planned = Ending(h.journal.plan_outputs(claimed, plan), JobState.DONE,
                     artifacts={"x.a": str(artifact)})
    assert h.runner.mover.publish([planned]) == [None]
    assert h.runner.mover.publish([planned]) == [None]  # a repeat after a crash
    assert files_under(h.folders.outputs) == ["x.a"]


async def test_command_step_runs_a_real_program(settings: Settings, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    h = Harness(with_pipeline(settings, tuple(copy_step(ledger))))
    ok, bad = h.drop("-rf.mp3", b"good"), h.drop("bad.mp3", b"FAIL now")
    assert await h.run(ok) is Outcome.DONE
    assert await h.run(bad) is Outcome.FAILED
    assert (h.folders.outputs / "-rf.txt").read_bytes() == b"good"
    sidecar = json.loads((h.folders.failed / "bad.mp3.error.json").read_text())
    assert "refusing to copy bad.mp3" in sidecar["message"]
    assert "exit status 1" in sidecar["message"]


def test_names_never_become_options() -> None:
    argv = render_argv(("tool", "{name}", "-o", "{stem}.txt", "--in={input}"),
                       {"input": "/p/-x.mp3", "output_dir": "/o", "stem": "-x", "name": "-x.mp3"})
    assert argv == ["tool", "./-x.mp3", "-o", "./-x.txt", "--in=/p/-x.mp3"]


async def test_a_publish_cut_short_leaves_no_outputs_when_the_file_fails(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given two outputs, and a disk that fills after the first is written
    h = Harness(dataclasses.replace(settings, daemon=dataclasses.replace(
        settings.daemon, max_retries=0)), ScriptedStep("a"), ScriptedStep("b"))
    job = h.drop("x.mp3")
    real_copy = folders.copy_atomic
    copies: list[Path] = []

    def filling(src: Path, dest: Path, later: set[Path] | None = None) -> None:
        if copies:
            raise OSError(errno.ENOSPC, "No space left on device")
        copies.append(dest)
        real_copy(src, dest, later)

    monkeypatch.setattr(moves, "copy_atomic", filling)
    # When the job runs out of retries
    assert await h.run(job) is Outcome.FAILED
    # Then the output written before the disk filled is gone, and the reason is recorded
    assert copies and not copies[0].exists()
    assert files_under(h.folders.outputs) == []
    sidecar = json.loads((h.folders.failed / "x.mp3.error.json").read_text())
    assert "No space left" in sidecar["message"]


async def test_two_files_with_one_stem_finishing_together_keep_their_own_outputs(
        settings: Settings) -> None:
    # Given talk.mp3 and talk.wav, whose steps both write talk.a, finishing in one batch
    h = Harness(settings, ScriptedStep("a"))
    jobs = [h.drop("talk.mp3", b"mp3"), h.drop("talk.wav", b"wav")]
    # When both run at once
    outcomes = await asyncio.gather(*(h.run(job) for job in jobs))
    # Then each has an output of its own, under its own name
    assert outcomes == [Outcome.DONE, Outcome.DONE]
    assert files_under(h.folders.outputs) == ["talk (1).a", "talk.a"]
    texts = sorted((h.folders.outputs / name).read_text() for name in ("talk.a", "talk (1).a"))
    assert texts == ["a of talk.mp3", "a of talk.wav"]


async def test_output_names_planned_before_a_restart_stay_reserved(settings: Settings) -> None:
    # Given a job that planned outputs/x.a before a stop, and has not written it yet
    h = Harness(settings, ScriptedStep("a"))
    first = await h.runner.claims.claim(h.drop("x.mp3"))
    assert first is not None
    h.journal.plan_outputs(first, {"x.a": str(h.folders.outputs / "x.a")})
    h.runner.mover.reserve(h.journal.live())
    # When another file with the same stem is done
    second = h.drop("x.wav")
    assert await h.run(second) is Outcome.DONE
    # Then it does not take the name the first one holds
    assert files_under(h.folders.outputs) == ["x (1).a"]


async def test_the_same_name_dropped_again_while_the_first_runs_ends_apart(
        settings: Settings) -> None:
    # Given talk.mp3 claimed and running, and a new talk.mp3 dropped meanwhile; both fail
    h = Harness(settings, ScriptedStep("a", [Permanent("bad one"), Permanent("bad two")]))
    first = await h.runner.claims.claim(h.drop("talk.mp3", b"one"))
    assert first is not None
    h.journal.interrupt(h.journal.get(first.id))
    second = h.drop("talk.mp3", b"two")
    # When both run to their end at once
    outcomes = await asyncio.gather(h.run(first), h.run(second))
    # Then each original and its sidecar has a place of its own, nothing stays behind
    assert list(outcomes) == [Outcome.FAILED, Outcome.FAILED]
    assert files_under(h.folders.failed) == [
        "talk (1).mp3", "talk (1).mp3.error.json", "talk.mp3", "talk.mp3.error.json"]
    assert files_under(h.folders.processing) == []
    contents = {(h.folders.failed / n).read_bytes() for n in ("talk.mp3", "talk (1).mp3")}
    assert contents == {b"one", b"two"}
    assert h.journal.count("main", JobState.FAILED) == 2



async def test_a_folder_swapped_for_a_link_after_queueing_leads_nowhere(
        settings: Settings, tmp_path: Path) -> None:
    # Given a queued file in a sub-folder of the inbox, and a secret of the same name outside
    h = Harness(settings, ScriptedStep("a"))
    job = h.drop("sub/talk.mp3", b"mine")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "talk.mp3").write_bytes(b"SECRET"[:job.size])  # same size and time: no tell
    os.utime(outside / "talk.mp3", ns=(job.mtime_ns, job.mtime_ns))
    # When the sub-folder is swapped for a link to the outside before the claim
    (h.folders.inbox / "sub").rename(tmp_path / "moved-away")
    (h.folders.inbox / "sub").symlink_to(outside)
    outcome = await h.run(job)
    # Then nothing is taken through the link: the outside file stays, and no content leaks
    assert outcome is Outcome.FAILED
    assert (outside / "talk.mp3").read_bytes() == b"SECR"
    assert files_under(h.folders.done) == files_under(h.folders.outputs) == []
    sidecar = json.loads((h.folders.failed / "sub/talk.mp3.error.json").read_text())
    assert "symbolic link" in sidecar["message"]


@pytest.mark.parametrize("error", [Retry("HTTP 503 from the chat model", reason="http"),
                                   Permanent("HTTP 400: context too long", reason="http")])
async def test_a_failed_enhancement_keeps_the_finished_transcript(settings: Settings,
                                                                  error: Exception) -> None:
    # Given a transcript step that works and an enhancement that fails every time
    h = Harness(settings, ScriptedStep("txt"), ScriptedStep("enhance", [error] * 10))
    job = h.drop("talk.mp3")
    # When the job runs until the enhancement's retries are spent (or it fails for good)
    outcomes = [await h.run(job) for _ in range(settings.daemon.max_retries + 1)
                if job.id in h.journal]
    # Then the file is done, with the transcript published and a warning beside it
    assert outcomes[-1] is Outcome.DONE
    assert files_under(h.folders.done) == ["talk.mp3"]
    assert files_under(h.folders.outputs) == ["talk.txt", "talk.warnings.json"]
    warning = json.loads((h.folders.outputs / "talk.warnings.json").read_text())
    assert warning["warnings"][0]["step"] == "enhance"
    assert error.args[0] in warning["warnings"][0]["message"]
    assert files_under(h.folders.failed) == []


async def test_a_failed_enhancement_keeps_the_warnings_of_the_steps_before(
        settings: Settings) -> None:
    # Given a transcript step that warns about the file, and an enhancement that fails
    damaged = file_warning("preprocess", "damaged", "decoded 35.9 s of 60.0 s")
    h = Harness(settings, ScriptedStep("txt", facts={WARNINGS_FACT: [damaged]}),
                ScriptedStep("enhance", [Permanent("HTTP 400", reason="http")]))
    job = h.drop("talk.mp3")
    # When the job runs
    assert await h.run(job) is Outcome.DONE
    # Then the warnings file names both: the damage and the failed enhancement
    warning = json.loads((h.folders.outputs / "talk.warnings.json").read_text())
    assert [w["step"] for w in warning["warnings"]] == ["preprocess", "enhance"]
    assert warning["warnings"][0] == damaged


async def test_a_retry_after_longer_than_the_back_off_cap_is_capped(settings: Settings) -> None:
    # Given a step whose provider says Retry-After: one day
    h = Harness(settings, ScriptedStep("a", [Retry("HTTP 429", reason="http_429", defer=86400)]))
    job = h.drop("x.mp3")
    # When it is retried
    assert await h.run(job) is Outcome.RETRY
    # Then it waits no longer than retry_backoff_max
    again = h.journal.get(job.id)
    assert again.not_before - again.updated <= settings.daemon.retry_backoff_max + 1e-6


@dataclass
class RecordingStep:
    """Asks for a line in a file once the job is done (as the download archive does)."""

    ledger: Path
    name: str = "fetch"

    async def run(self, ctx: StepContext) -> StepResult:
        return StepResult(facts={RECORD_WHEN_DONE: [{"file": str(self.ledger),
                                                     "line": ctx.job.name}]})

    async def aclose(self) -> None:
        return None


async def test_a_record_is_written_only_when_the_job_is_done(settings: Settings,
                                                             tmp_path: Path) -> None:
    # Given a first step that asks for a record (a download archive line), then a step
    # that fails once for good and works the next time
    ledger = tmp_path / "archive.txt"
    fetch, later = RecordingStep(ledger), ScriptedStep("b", [Permanent("bad answer")])
    h = Harness(settings, later)
    h.settings = with_pipeline(h.settings, "fetch", "b")
    h.registry.register("fetch", fetch)
    h.runner.configure(h.settings)
    # When the file fails in the later step
    assert await h.run(h.drop("talk.mp3")) is Outcome.FAILED
    # Then nothing is recorded, so a retry of the file is not refused as already done
    assert not ledger.exists()
    # And when it is done, the record is written once
    assert await h.run(h.drop("talk2.mp3")) is Outcome.DONE
    assert ledger.read_text() == "talk2.mp3\n"


def test_a_claim_never_loses_its_folder_to_another_claim_emptying_it(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given two files in one sub-folder, claimed by two batches in two threads, the first
    # held between its rename and its folder sync for as long as the second takes
    h = Harness(settings)
    mover = h.runner.mover
    first, second = h.drop("album/one.mp3"), h.drop("album/two.mp3")
    second_done = threading.Event()
    real_sync = folders.fsync_dirs
    held = [True]

    def sync_after_the_other(paths: set[Path]) -> None:
        if held[0] and threading.current_thread().name == "first":
            held[0] = False
            second_done.wait(3)  # without the lock the second claim empties album/ now
        real_sync(paths)

    monkeypatch.setattr(moves, "fsync_dirs", sync_after_the_other)
    errors: dict[str, list[Exception | None]] = {}

    def claim(name: str, job: Job) -> None:
        errors[name] = mover.claim(mover.plan_claims([job]))
        if name == "second":
            second_done.set()

    threads = [threading.Thread(target=claim, args=("first", first), name="first"),
               threading.Thread(target=claim, args=("second", second), name="second")]
    threads[0].start()
    threads[1].start()
    for thread in threads:
        thread.join(10)
    # Then both claims worked, and the emptied folder went only after both were done
    assert errors == {"first": [None], "second": [None]}
    assert files_under(h.folders.processing) == ["album/one.mp3", "album/two.mp3"]
    assert not (h.folders.inbox / "album").exists()
