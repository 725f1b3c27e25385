"""The daemon's life: start-up recovery, the running loops, signals, reload and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from structlog.typing import FilteringBoundLogger

from traxd import metrics, sdnotify
from traxd.batcher import Batcher
from traxd.config import Settings, load_settings
from traxd.control import ControlServer
from traxd.errors import ConfigError
from traxd.exporter import start_http
from traxd.folders import InboxFolders, move, sidecar_path, sweep_temporaries, unique_path
from traxd.intake import Intake
from traxd.jobs import BackendGate, JobRunner, Outcome
from traxd.journal import Job, JobState, Journal, StateLock
from traxd.logs import get_logger
from traxd.pipeline.registry import StepRegistry
from traxd.pool import WorkerPool
from traxd.schedule import Window
from traxd.throttle import Governor
from traxd.watcher import Watchers

GOVERNOR_INTERVAL = 1.0
OWNER_ENV = "TRAXD_STATE_DIR"


@dataclass
class Flags:
    """Set by signal handlers; the main loop acts on them."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    cold: bool = False
    reload: asyncio.Event = field(default_factory=asyncio.Event)


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started_at = time.time()
        self.log = get_logger(component="daemon")
        self.lock = StateLock(settings.daemon.state_dir)
        self.paused: set[str] = set()
        self.draining: set[str] = set()
        self.heartbeat = time.monotonic()
        self._tasks: set[asyncio.Task[object]] = set()

    # --- start-up ---------------------------------------------------------------------------

    def open(self) -> None:
        """Everything that must succeed before work starts; raises with a clear message."""
        os.umask(self.settings.daemon.umask)
        self.lock.acquire()
        stop_orphans(self.settings.daemon.state_dir, self.log)
        # Every child inherits this mark, so the next start can find what a crash left running.
        os.environ[OWNER_ENV] = str(self.settings.daemon.state_dir)
        self.journal = Journal.open(self.settings.daemon.state_dir / "journal.sqlite3")
        self.gate = BackendGate()
        self.steps = StepRegistry(self.settings)
        self.runner = JobRunner(self.settings, self.journal, self.steps, self.gate)
        self.governor = Governor(self.settings.daemon)
        self.pool = WorkerPool(self._run_job, self.governor)
        self.intake = Intake(self.settings, self.journal, self._on_duplicate)
        self.watchers = Watchers(self.intake.announce)
        self.batcher = Batcher(self.journal, self.pool, self.open_inboxes)
        self.windows = {i.name: Window.parse(i.schedule) for i in self.settings.inboxes}
        for inbox in self.settings.inboxes:
            InboxFolders.of(inbox, self.settings.folders).create()

    def recover(self) -> None:
        """Put every job left by a crash or stop back on its way; clean temporary files."""
        now = time.time()
        interrupted = self.journal.requeue_interrupted(now)
        for job in self.journal.in_states(JobState.WAITING):
            self.journal.update(job.id, now, state=JobState.QUEUED, waiting_on=None)
        for job in self.journal.in_states(JobState.QUEUED, JobState.SEEN):
            if job.final_path is not None:
                log = self.log.bind(inbox=job.inbox, file=job.rel_path, job_id=job.id)
                try:
                    self.runner.finalize(job, log)
                except OSError as exc:  # e.g. failed/ not writable: the pool tries again
                    log.error("finalize_failed", error=str(exc))
        swept = sum(sweep_temporaries(folder) for folders in self.runner.folders.values()
                    for folder in folders.all())
        self._sweep_work_dirs()
        self.log.info("recovered", resumed=len(interrupted), temporaries_removed=swept)

    def _sweep_work_dirs(self) -> None:
        root = self.runner.work_root
        if not root.is_dir():
            return
        live = {str(j.id) for j in self.journal.in_states(JobState.QUEUED, JobState.RUNNING,
                                                          JobState.WAITING)}
        for entry in root.iterdir():
            if entry.name not in live:
                shutil.rmtree(entry, ignore_errors=True)

    # --- running ----------------------------------------------------------------------------

    async def serve(self) -> int:
        self.flags = Flags()
        self._install_signals()
        self.open()
        self.recover()
        metrics.set_build_info()
        for inbox in self.settings.inboxes:
            mode = self.watchers.start(inbox)
            self.log.info("watching", inbox=inbox.name, path=str(inbox.path), mode=mode)
        await self.intake.reconcile(count_missed=False)
        self.control = ControlServer(self, self.settings.daemon.state_dir / "traxd.sock")
        await self.control.start()
        self.http = start_http(self.settings.daemon.metrics_address, self) \
            if self.settings.daemon.metrics_address else None
        self.batcher.start(self.settings.daemon.batch_interval)
        sdnotify.notify("READY=1", f"STATUS=watching {len(self.settings.inboxes)} inboxes")
        self.log.info("ready", inboxes=[i.name for i in self.settings.inboxes],
                      workers=self.settings.daemon.workers)
        try:
            await self._main()
        finally:
            await self._shutdown()
        return 0

    async def _main(self) -> None:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self.pool.serve()),
                     group.create_task(self._govern()),
                     group.create_task(self._reconcile_loop()),
                     group.create_task(self._reload_loop())]
            await self.flags.stop.wait()
            for task in tasks:
                task.cancel()

    async def _govern(self) -> None:
        """Re-sample the machine each second; also the loop's heartbeat for health checks."""
        watchdog = sdnotify.watchdog_interval()
        while True:
            self.heartbeat = time.monotonic()
            self.governor.evaluate()
            self.pool.poke()
            if watchdog is not None and self.watchers.alive():
                sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(GOVERNOR_INTERVAL)

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.daemon.reconcile_interval)
            await self.intake.reconcile(count_missed=True)

    async def _reload_loop(self) -> None:
        while True:
            await self.flags.reload.wait()
            self.flags.reload.clear()
            self.reload()

    async def _run_job(self, job_id: int) -> None:
        outcome = await self.runner.run(job_id)
        self.batcher.job_finished(job_id, outcome.value)
        if outcome in (Outcome.RETRY, Outcome.WAITING):
            self.log.debug("job_deferred", job_id=job_id, outcome=outcome.value)

    def _on_duplicate(self, job: Job) -> None:
        log = self.log.bind(inbox=job.inbox, file=job.rel_path, job_id=job.id)
        self.runner.finish(job, JobState.DUPLICATE, None, log)

    def open_inboxes(self, now: float) -> Sequence[str]:
        moment = datetime.fromtimestamp(now).astimezone()
        names = []
        for inbox in self.settings.inboxes:
            if inbox.name in self.paused or inbox.name in self.draining:
                continue
            if not self.windows[inbox.name].is_open(moment):
                continue
            if self.steps.backends(inbox.pipeline) & set(self.gate.paused):
                continue
            names.append(inbox.name)
        return names

    # --- signals, reload, shutdown ----------------------------------------------------------

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self.flags.reload.set)

    def _on_stop_signal(self) -> None:
        if self.flags.stop.is_set():
            self.flags.cold = True
            if hasattr(self, "pool"):
                asyncio.get_running_loop().create_task(self.pool.cancel_all())
        self.flags.stop.set()

    def reload(self) -> None:
        source = self.settings.source
        try:
            new = load_settings(source)
        except ConfigError as exc:
            self.log.error("reload_failed", error=str(exc), kept="the running configuration")
            return
        self.apply(new)

    def apply(self, new: Settings) -> None:
        """Switch to a new configuration without dropping work in flight."""
        old = {i.name: i for i in self.settings.inboxes}
        fresh = {i.name: i for i in new.inboxes}
        for name, inbox in old.items():
            if fresh.get(name) != inbox:
                self.watchers.stop(name)
        self.settings = new
        for name, inbox in fresh.items():
            InboxFolders.of(inbox, new.folders).create()
            if old.get(name) != inbox:
                self.watchers.start(inbox)
        self.windows = {i.name: Window.parse(i.schedule) for i in new.inboxes}
        self._swap_steps(new)
        self.runner.settings = new
        self.runner.folders = {i.name: InboxFolders.of(i, new.folders) for i in new.inboxes}
        self.intake.configure(new)
        self.governor.cap = new.daemon.workers
        self.batcher.reschedule(new.daemon.batch_interval)
        self.log.info("reloaded", inboxes=sorted(fresh))
        self._background(self.intake.reconcile(count_missed=False))

    def _swap_steps(self, new: Settings) -> None:
        """New step settings get new steps; the old ones close once the jobs using them end."""
        old = self.steps.settings
        if (old.transcribe, old.enhance, old.download) == (
                new.transcribe, new.enhance, new.download):
            self.steps.settings = new
            return
        retired, self.steps = self.steps, StepRegistry(new)
        self.runner.steps = self.steps
        running = list(self.pool.running.values())

        async def close_when_idle() -> None:
            if running:
                await asyncio.wait(running)
            await retired.aclose()

        self._background(close_when_idle())

    def _background(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shutdown(self) -> None:
        sdnotify.notify("STOPPING=1")
        self.batcher.shutdown()
        grace = 0.0 if self.flags.cold else self.settings.daemon.shutdown_grace
        self.log.info("stopping", running=len(self.pool.running), grace_seconds=grace)
        await self.pool.stop(grace)
        self.watchers.stop_all()
        self.intake.close()
        await self.control.close()
        if self.http is not None:
            self.http.close()
        await self.steps.aclose()
        self.journal.close()
        self.lock.release()
        self.log.info("stopped")

    # --- health (for the HTTP exporter) -----------------------------------------------------

    def alive(self) -> bool:
        return time.monotonic() - self.heartbeat < 10 * GOVERNOR_INTERVAL

    def ready(self) -> tuple[bool, str]:
        if not self.watchers.alive():
            return False, "a watcher has stopped"
        if not self.journal.writable():
            return False, "the journal is not writable"
        if self.gate.paused:
            return False, "paused backends: " + ", ".join(sorted(self.gate.paused))
        return True, ""

    # --- control (the socket's handler) -----------------------------------------------------

    def status(self) -> dict[str, Any]:
        from traxd.status import build_status

        return build_status(self)

    def pause(self, inbox: str | None) -> dict[str, Any]:
        names = self._names(inbox)
        self.paused.update(names)
        self._withdraw_queued(names)
        self.log.info("paused", inboxes=names)
        return {"paused": names}

    def resume(self, inbox: str | None) -> dict[str, Any]:
        names = self._names(inbox)
        self.paused.difference_update(names)
        self.draining.difference_update(names)
        backends = self.gate.resume() if inbox is None else []
        for job in self.journal.in_states(JobState.WAITING):
            if inbox is None or job.inbox == inbox:
                self.journal.update(job.id, time.time(), state=JobState.QUEUED, waiting_on=None)
        self.log.info("resumed", inboxes=names, backends=backends)
        return {"resumed": names, "backends": backends}

    def drain(self, inbox: str | None) -> dict[str, Any]:
        names = self._names(inbox)
        self.draining.update(names)
        self._withdraw_queued(names)
        return {"draining": names, "running": len(self.pool.running)}

    def retry(self, names: list[str] | None) -> dict[str, Any]:
        """Put failed files back into their inbox (all, or those named) to be processed anew."""
        retried: list[str] = []
        for job in self.journal.in_states(JobState.FAILED):
            wanted = names is None or job.rel_path in names or Path(job.rel_path).name in names
            if wanted and job.inbox in self.runner.folders and self._unfail(job):
                retried.append(job.rel_path)
        self.log.info("retry", files=retried)
        return {"retried": retried}

    def _unfail(self, job: Job) -> bool:
        folders = self.runner.folders[job.inbox]
        failed = Path(job.final_path or "")
        if not failed.is_file():
            return False
        move(failed, unique_path(folders.inbox, job.rel_path))
        sidecar_path(failed).unlink(missing_ok=True)
        self.journal.delete(job.id)
        return True

    def _withdraw_queued(self, names: list[str]) -> None:
        """Queued jobs of these inboxes leave the pool's queue (running ones go on)."""
        self.pool.withdraw({j.id for n in names
                            for j in self.journal.in_states(JobState.QUEUED, inbox=n)})

    def _names(self, inbox: str | None) -> list[str]:
        known = [i.name for i in self.settings.inboxes]
        if inbox is None:
            return known
        if inbox not in known:
            raise ValueError(f"no inbox named {inbox!r}; inboxes: {', '.join(known)}")
        return [inbox]


def stop_orphans(state_dir: Path, log: FilteringBoundLogger) -> int:
    """Kill step processes (ffmpeg, commands, model workers) left by a daemon that was killed.

    They carry OWNER_ENV naming our state_dir; holding its lock, no other daemon owns them.
    """
    mark, killed = str(state_dir), 0
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if proc.environ().get(OWNER_ENV) == mark:
                proc.kill()
                killed += 1
    if killed:
        log.warning("orphans_stopped", processes=killed)
    return killed

