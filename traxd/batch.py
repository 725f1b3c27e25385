"""`traxd batch PATH`: process a folder once, in place, with a progress bar and resume."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shlex
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from traxd.config import InboxSettings, Settings, StepSpec
from traxd.errors import BackendFatal
from traxd.eta import Eta, Throughput
from traxd.executor import LocalExecutor
from traxd.folders import InboxFolders, scan, why_not_a_folder, write_atomic
from traxd.intake import sha256_file
from traxd.jobs import OPTIONAL_STEPS, BackendGate, JobEnd, JobRunner, Outcome
from traxd.journal import Job, JobState, Journal
from traxd.keys import key_state, needed_keys
from traxd.moves import InPlaceMover
from traxd.pipeline.ffmpeg import find_tools, header_duration
from traxd.pipeline.registry import StepRegistry
from traxd.pipeline.ytdlp import is_link_list
from traxd.procs import watch_children_by_pidfd
from traxd.reports import build_report, write_report
from traxd.statusview import format_duration

BATCH_INBOX = "batch"
OUTPUT_SUFFIX = ".transcripts"  # `talks/` -> `talks.transcripts/` beside it
# Surely not media: skipped, with the reason, when the pipeline starts with a named step.
NOT_MEDIA = frozenset({
    ".pdf", ".doc", ".docx", ".odt", ".rtf", ".md", ".csv", ".json", ".xml", ".html", ".htm",
    ".xls", ".xlsx", ".ppt", ".pptx", ".epub", ".jpg", ".jpeg", ".png", ".gif", ".heic",
    ".webp", ".svg", ".bmp", ".tif", ".tiff", ".zip", ".gz", ".tar", ".7z", ".rar", ".srt",
    ".vtt", ".ini", ".log", ".py", ".sh", ".exe", ".dmg", ".iso", ".db", ".sqlite3"})
LINK_FILES = (".url", ".webloc", ".txt")
MAX_LINK_FILE = 1 << 20  # bytes; a bigger text file is not a list of links


@dataclass
class Tally:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    bytes: int = 0
    not_media: dict[str, str] = field(default_factory=dict)  # file -> why it was skipped


def default_output(root: Path) -> Path:
    """Where a batch of `root` writes without --output: its own folder beside it."""
    return root.parent / f"{root.name or 'root'}{OUTPUT_SUFFIX}"


def skip_reason(path: Path, pipeline: tuple[StepSpec, ...]) -> str | None:
    """Why a file of a batch folder is not one to process; None when it is. A pipeline that
    starts with a command takes any file."""
    if not pipeline or not isinstance(pipeline[0], str):
        return None
    suffix = path.suffix.lower()
    if suffix in NOT_MEDIA:
        return f"not audio or video ({suffix})"
    if suffix in LINK_FILES and "download" not in pipeline:
        return "a link file, and the pipeline has no download step"
    if suffix == ".txt" and not lists_links(path):
        return "a text file that is not a list of links"
    return None


def lists_links(path: Path) -> bool:
    """Whether each line of a text file is a link, a comment (#) or blank, and one a link."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_LINK_FILE + 1)
    except OSError:
        return True  # the download step says why it cannot be read
    if len(data) > MAX_LINK_FILE:
        return False
    return is_link_list(data.decode("utf-8", "replace"))


class ConsoleLog:
    """The log writer's stream while a progress bar shows: each line is printed through the
    bar's console, above the bar instead of across it."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def write(self, text: str) -> int:
        self.console.print(Text.from_ansi(text.rstrip("\n")), soft_wrap=True, highlight=False)
        return len(text)

    def flush(self) -> None:
        return None

    def isatty(self) -> bool:
        return self.console.is_terminal


class BatchRun:
    def __init__(self, settings: Settings, root: Path, output: Path, console: Console) -> None:
        self.root, self.output, self.console = root, output, console
        state_dir = output / ".traxd"
        inbox = dataclasses.replace(settings.inboxes[0], name=BATCH_INBOX, path=root,
                                    schedule="always")
        self.settings = dataclasses.replace(
            settings, inboxes=(inbox,),
            daemon=dataclasses.replace(settings.daemon, state_dir=state_dir))
        self.journal = Journal.open(state_dir / "batch.sqlite3")
        executor = LocalExecutor(self.settings, StepRegistry(self.settings))
        self.runner = JobRunner(self.settings, self.journal, executor, BackendGate(),
                                InPlaceMover({}))
        self.runner.optional_waits = False  # no one resumes: done without it, with a warning
        self.runner.folders[BATCH_INBOX] = InboxFolders(root, root, root, output, output)
        self.tally = Tally()
        self.ends: list[JobEnd] = []  # for the report (traxd.reports)
        self.runner.on_end = self._ended
        self.throughput = Throughput(min_span=1.0)
        self.left: set[int] = set()  # jobs not finished
        self.durations: dict[int, float] = {}  # media seconds of files not finished
        self.again = f"traxd batch {shlex.quote(str(root))}"  # the command that resumes
        self.interrupted = False

    def jobs(self) -> list[Job]:
        """A job per file not yet done; unchanged files done before are skipped (resume),
        and a run that was interrupted goes on from its last finished step."""
        self.journal.interrupt_all()
        self.journal.release_all()
        done = self.journal.done_files()
        unfinished = {(j.rel_path, j.size, j.mtime_ns): j for j in self.journal.live()}
        jobs = []
        for rel in sorted(scan(self.root)):
            path = self.root / rel
            if path.is_relative_to(self.output):
                continue
            if why := skip_reason(path, self.settings.inboxes[0].pipeline):
                self.tally.not_media[rel] = why
                continue
            info = path.lstat()
            key = (rel, info.st_size, info.st_mtime_ns)
            if key in done:
                self.tally.skipped += 1
            else:
                jobs.append(unfinished.get(key) or self.journal.add_seen(BATCH_INBOX, *key, 0))
        for job in jobs:
            self.journal.take(job)
        return jobs

    def _ended(self, end: JobEnd) -> None:
        self.ends.append(end)
        self.left.discard(end.job_id)
        self.durations.pop(end.job_id, None)
        if end.outcome == Outcome.DONE.value:
            self.throughput.finished(end.media_seconds)

    def eta(self) -> Eta | None:
        """Time left: in media seconds once durations are known (probed), else in files."""
        known = [self.durations[j] for j in self.left if j in self.durations]
        return self.throughput.eta(known, len(self.left) - len(known))

    async def _probe_durations(self, jobs: list[Job]) -> None:
        """The durations the files' headers state, one file at a time, for the ETA."""
        if "preprocess" not in self.settings.inboxes[0].pipeline:
            return
        try:
            tools = find_tools()
        except BackendFatal:
            return
        for job in jobs:
            path = self.root / job.rel_path
            if job.id not in self.left or path.suffix.lower() in LINK_FILES:
                continue
            seconds = await header_duration(path, tools)
            if seconds is not None and job.id in self.left:  # not finished meanwhile
                self.durations[job.id] = seconds

    async def run(self) -> int:
        watch_children_by_pidfd()
        self._started = time.time()
        self.throughput.started = self._started
        jobs = await asyncio.to_thread(self.jobs)
        done_before = f"; {self.tally.skipped} done before" if self.tally.skipped else ""
        self.console.print(f"traxd batch: {len(jobs)} to do in {self.root}{done_before}\n"
                           f"outputs: {self.output}", markup=False, highlight=False,
                           soft_wrap=True)
        for warning in missing_optional_keys(self.settings):
            self.console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
        try:
            await self._run_all(jobs)
        except asyncio.CancelledError:  # Ctrl-C: what finished is kept, the rest resumes
            self.interrupted = True
        await self.runner.close()
        await asyncio.to_thread(self.journal.sync)  # the report reads what is written
        await asyncio.to_thread(self._report)
        self.journal.close()
        if self.interrupted:
            left = len(jobs) - self.tally.done - self.tally.failed
            self.console.print(f"interrupted: {left} of {len(jobs)} files not finished; "
                               f"to resume, run again: {self.again}", markup=False,
                               soft_wrap=True)
            return 130
        return 1 if self.tally.failed else 0

    async def _run_all(self, jobs: list[Job]) -> None:
        gate = asyncio.Semaphore(self.settings.daemon.workers)
        self.left = {job.id for job in jobs}
        probing = asyncio.create_task(self._probe_durations(jobs), name="probe-durations")
        with _progress_bar(self.console, self.eta) as bar:
            task = bar.add_task("processing", total=len(jobs))

            async def one(job: Job) -> None:
                async with gate:
                    await self._process(job)
                self.left.discard(job.id)
                bar.advance(task)

            try:
                async with asyncio.TaskGroup() as group:
                    for job in jobs:
                        group.create_task(one(job))
            finally:
                probing.cancel()

    async def _process(self, job: Job) -> None:
        if job.state is JobState.SEEN:
            digest = await asyncio.to_thread(sha256_file, self.root / job.rel_path)
            job = self.journal.queue(job, digest, job.size, job.mtime_ns)
            self.journal.take(job)
        while True:
            outcome = await self.runner.run(job)
            if outcome is not Outcome.RETRY:
                break
            job = self.journal.get(job.id)
            self.journal.take(job)
            await asyncio.sleep(max(0.0, job.not_before - time.time()))  # the back-off itself
        if outcome is Outcome.DONE:
            self.tally.done += 1
            self.tally.bytes += job.size
        else:
            self.tally.failed += 1

    def _report(self) -> None:
        failed = [j for j in self.journal.failed() if j.updated >= self._started]
        waiting = self.journal.live(JobState.WAITING)
        failed += waiting
        self._write_failed(failed)
        self._write_report(len(waiting))
        table = Table(title=Text(f"traxd batch: {self.root}"), title_justify="left")
        for column in ("done", "failed", "done before", "not media", "MB processed"):
            table.add_column(column, justify="right")
        table.add_row(str(self.tally.done), str(self.tally.failed), str(self.tally.skipped),
                      str(len(self.tally.not_media)), f"{self.tally.bytes / 1e6:.1f}")
        self.console.print(table)
        for job in failed:
            message = (job.error or {}).get("message", "")
            self.console.print(f"[red]failed[/red] {escape(job.rel_path)}: {escape(message)}",
                               soft_wrap=True)
        for rel, why in sorted(self.tally.not_media.items()):
            self.console.print(f"skipped {escape(rel)}: {escape(why)}", soft_wrap=True)
        for (step, why), count in sorted(optional_steps_not_run(self.ends).items()):
            self.console.print(f"[yellow]warning:[/yellow] {step} did not run for {count} "
                               f"file{'s' if count > 1 else ''} ({escape(why)}): done without "
                               "it, each with <stem>.warnings.json", soft_wrap=True)
        self.console.print(f"outputs: {self.output}", markup=False, highlight=False,
                           soft_wrap=True)

    def _write_report(self, waiting: int) -> None:
        """The same report a daemon's batch gets, as report.json and report.md."""
        others = {"waiting": waiting} if waiting else {}
        report = build_report(uuid.uuid4().hex[:12], self._started, time.time() - self._started,
                              self.ends, others)
        for failure in report["failures"]:  # originals stay in place: no sidecar beside them
            failure["sidecar"] = str(self.output / "failed.jsonl")
        write_report(self.output, report, stem="report")

    def _write_failed(self, failed: list[Job]) -> None:
        lines = [json.dumps({"file": j.rel_path, **(j.error or {})}, ensure_ascii=False)
                 for j in failed if j.state is JobState.FAILED or j.error]
        write_atomic(self.output / "failed.jsonl", "".join(f"{line}\n" for line in lines).encode())


def missing_optional_keys(settings: Settings) -> list[str]:
    """What to say before work starts about optional steps that will find no API key."""
    said = []
    for need in needed_keys(settings):
        state = key_state(need)
        if need.use in OPTIONAL_STEPS and not state.present:
            said.append(f"{need.use} has no API key ({need.where}: {state.problem}): the "
                        f"files are done without {need.use}")
    return said


def optional_steps_not_run(ends: list[JobEnd]) -> dict[tuple[str, str], int]:
    """(step, why) -> files done without that optional step because its backend was
    paused (a missing or refused key); why: the head of the message ("no API key for
    api.deepseek.com", "api.deepseek.com answered 401"), the rest is in the warnings file."""
    counts: dict[tuple[str, str], int] = {}
    for end in ends:
        for warning in end.warnings:
            if warning.get("step") in OPTIONAL_STEPS and warning.get("category") == "fatal":
                key = (str(warning["step"]), str(warning.get("message", "")).split(": ")[0])
                counts[key] = counts.get(key, 0) + 1
    return counts


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed * 3600:.0f} files/h" if speed else "- files/h")


class EtaColumn(ProgressColumn):
    """`ETA 3m 20s`: from the media seconds left when durations are known, else files."""

    def __init__(self, eta: Callable[[], Eta | None]) -> None:
        super().__init__()
        self.eta = eta

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text("ETA 0s")
        eta = self.eta()
        return Text(f"ETA {format_duration(eta.seconds)}" if eta else "ETA -")


def _progress_bar(console: Console, eta: Callable[[], Eta | None]) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), RateColumn(), TimeElapsedColumn(), EtaColumn(eta),
                    console=console)


def run_batch(settings: Settings, root: Path, output: Path | None, *, enhance: bool,
              console: Console, config: Path | None = None) -> int:
    root = root.resolve()
    if not root.is_dir():
        console.print(f"[red]traxd batch: {escape(str(root))} is not a folder[/red]",
                      soft_wrap=True)
        return 2
    inbox = settings.inboxes[0] if settings.inboxes else InboxSettings(BATCH_INBOX, root)
    if enhance and "enhance" not in inbox.pipeline:
        inbox = dataclasses.replace(inbox, pipeline=(*inbox.pipeline, "enhance"))
    settings = dataclasses.replace(settings, inboxes=(inbox,))
    out = (output or default_output(root)).resolve()
    empty = not (out / ".traxd").exists() and next(scan(root), None) is None
    if empty and (out.is_dir() or not out.exists()):  # a file there: the message below
        console.print(f"traxd batch: {root} holds no files; nothing to do", markup=False,
                      soft_wrap=True)
        return 0
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        console.print(f"[red]traxd batch: --output: {escape(why_not_a_folder(exc))}[/red]",
                      soft_wrap=True)
        return 2
    run = BatchRun(settings, root, out, console)
    if output is not None:
        run.again += f" --output {shlex.quote(str(out))}"
    if config is not None:
        run.again += f" --config {shlex.quote(str(config))}"
    return asyncio.run(run.run())
