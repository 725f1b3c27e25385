"""`traxd batch PATH`: process a folder once, in place, with a progress bar and resume."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from traxd.config import InboxSettings, Settings
from traxd.executor import LocalExecutor
from traxd.folders import InboxFolders, scan, write_atomic
from traxd.intake import sha256_file
from traxd.jobs import BackendGate, JobRunner, Outcome
from traxd.journal import Job, JobState, Journal
from traxd.moves import InPlaceMover
from traxd.pipeline.registry import StepRegistry

BATCH_INBOX = "batch"


@dataclass
class Tally:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    bytes: int = 0


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
        self.runner.folders[BATCH_INBOX] = InboxFolders(root, root, root, output, output)
        self.tally = Tally()

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
            info = path.lstat()
            key = (rel, info.st_size, info.st_mtime_ns)
            if key in done:
                self.tally.skipped += 1
            else:
                jobs.append(unfinished.get(key) or self.journal.add_seen(BATCH_INBOX, *key, 0))
        for job in jobs:
            self.journal.take(job)
        return jobs

    async def run(self) -> int:
        self._started = time.time()
        jobs = self.jobs()
        gate = asyncio.Semaphore(self.settings.daemon.workers)
        with _progress_bar(self.console) as bar:
            task = bar.add_task("processing", total=len(jobs))

            async def one(job: Job) -> None:
                async with gate:
                    await self._process(job)
                bar.advance(task)

            async with asyncio.TaskGroup() as group:
                for job in jobs:
                    group.create_task(one(job))
        await self.runner.close()
        await asyncio.to_thread(self.journal.sync)  # the report reads what is written
        await asyncio.to_thread(self._report)
        self.journal.close()
        return 1 if self.tally.failed else 0

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
        failed += self.journal.live(JobState.WAITING)
        self._write_failed(failed)
        table = Table(title=f"traxd batch: {self.root}")
        for column in ("done", "skipped (done before)", "failed", "MB processed"):
            table.add_column(column, justify="right")
        table.add_row(str(self.tally.done), str(self.tally.skipped), str(self.tally.failed),
                      f"{self.tally.bytes / 1e6:.1f}")
        self.console.print(table)
        for job in failed:
            message = (job.error or {}).get("message", "")
            self.console.print(f"[red]failed[/red] {job.rel_path}: {message}")
        self.console.print(f"outputs: {self.output}")

    def _write_failed(self, failed: list[Job]) -> None:
        lines = [json.dumps({"file": j.rel_path, **(j.error or {})}, ensure_ascii=False)
                 for j in failed if j.state is JobState.FAILED or j.error]
        write_atomic(self.output / "failed.jsonl", "".join(f"{line}\n" for line in lines).encode())


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed * 3600:.0f} files/h" if speed else "- files/h")


def _progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), RateColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console)


def run_batch(settings: Settings, root: Path, output: Path | None, *, enhance: bool,
              console: Console) -> int:
    root = root.resolve()
    if not root.is_dir():
        console.print(f"[red]traxd batch: {root} is not a folder[/red]")
        return 2
    inbox = settings.inboxes[0] if settings.inboxes else InboxSettings(BATCH_INBOX, root)
    if enhance and "enhance" not in inbox.pipeline:
        inbox = dataclasses.replace(inbox, pipeline=(*inbox.pipeline, "enhance"))
    settings = dataclasses.replace(settings, inboxes=(inbox,))
    out = (output or root.parent / "outputs").resolve()
    out.mkdir(parents=True, exist_ok=True)
    return asyncio.run(BatchRun(settings, root, out, console).run())
