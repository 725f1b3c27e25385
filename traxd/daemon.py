"""The daemon's life: build the parts, recover, run the loops, signals, reload and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import shutil
import signal
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from structlog.typing import FilteringBoundLogger

from traxd import metrics, reports, sdnotify
from traxd.batcher import Batch, Batcher
from traxd.config import Settings, load_settings
from traxd.control import ControlServer
from traxd.errors import ConfigError, JournalError
from traxd.executor import Executor, LocalExecutor
from traxd.exporter import HttpServerHandle, parse_address, start_http
from traxd.folders import create_folders, sweep_temporaries, why_not_a_folder
from traxd.gates import InboxGates
from traxd.heap import HeapKeeper
from traxd.intake import Intake
from traxd.jobs import BackendGate, JobEnd, JobRunner
from traxd.journal import Job, JobState, Journal, StateLock
from traxd.logs import get_logger
from traxd.looplag import watch_loop_lag
from traxd.moves import Mover
from traxd.notify import Notifier
from traxd.operations import Operations, Parts
from traxd.pipeline.base import Step
from traxd.pipeline.registry import StepRegistry, backend_of
from traxd.pool import Slot, WorkerPool
from traxd.procs import watch_children_by_pidfd
from traxd.throttle import Governor
from traxd.watcher import Watchers
from traxd.web.app import WebApp, is_loopback
from traxd.web.history import History

GOVERNOR_INTERVAL = 1.0
NOTIFY_GRACE = 10.0  # seconds the last notifications may take at shutdown
OWNER_ENV = "TRAXD_STATE_DIR"


@dataclass
class Flags:
    """Set by signal handlers; the main loop acts on them."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    cold: bool = False
    reload: asyncio.Event = field(default_factory=asyncio.Event)


class Daemon:
    def __init__(self, settings: Settings, steps: Mapping[str, Step] | None = None) -> None:
        self.settings = settings
        self.extra_steps = dict(steps or {})
        self.log = get_logger(component="daemon")
        self.lock = StateLock(settings.daemon.state_dir)
        self._tasks: set[asyncio.Task[object]] = set()

    # --- start-up ---------------------------------------------------------------------------

    def _lock_state_dir(self) -> None:
        try:
            self.lock.acquire()
        except OSError as exc:
            state_dir = self.settings.daemon.state_dir
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise JournalError(f"cannot start: the disk holding {state_dir} is full; free "
                                   "some space, then start traxd again") from exc
            why = (why_not_a_folder(exc) if exc.errno in (errno.EEXIST, errno.ENOTDIR)
                   else f"cannot write in {state_dir}: {exc.strerror}; name a folder traxd may "
                   "write")
            raise ConfigError(str(self.settings.source or "<config>"), "daemon.state_dir",
                              why) from exc

    async def open(self) -> None:
        """Build every part once; raises with a clear message when something cannot start."""
        settings = self.settings
        os.umask(settings.daemon.umask)
        watch_children_by_pidfd()
        self._lock_state_dir()
        stop_orphans(settings.daemon.state_dir, self.log)
        # Every child inherits this mark, so the next start can find what a crash left running.
        os.environ[OWNER_ENV] = str(settings.daemon.state_dir)
        path = settings.daemon.state_dir / "journal.sqlite3"
        self.journal = await asyncio.to_thread(Journal.open, path)
        self.backends = BackendGate()
        self.runner = JobRunner(settings, self.journal, self._executor(settings), self.backends,
                                Mover({}))
        self.governor = Governor(settings.daemon)
        self.heap = HeapKeeper()
        self.gates = InboxGates(settings, self.backends,
                                lambda: self.journal.store.problem is None)
        self.pool = WorkerPool(self.journal, self._run_job, self.governor,
                               lambda: self.gates.open(time.time()))
        self.intake = Intake(settings, self.journal, self._on_duplicate)
        self.watchers = Watchers(self.intake.announce_many)
        self.batcher = Batcher(self.journal, self.pool)
        self._wire_notifications(settings)
        self.operations = Operations(settings, Parts(
            self.journal, self.pool, self.gates, self.backends, self.runner, self.governor,
            self.watchers.alive, lambda: self.watchers.missing))
        await asyncio.to_thread(create_folders, settings)

    def _wire_notifications(self, settings: Settings) -> None:
        """Job ends, batch ends and backend changes go to the notifier (and the reports)."""
        try:
            self.notifier = Notifier.of(settings)
        except ValueError as exc:
            raise ConfigError(str(settings.source or "<config>"), "notify.urls",
                              str(exc)) from exc
        self.history = History()
        self.runner.on_end = self._job_ended
        self.backends.on_change = self._backend_changed
        self.batcher.on_finished = self._batch_finished

    def _backend_changed(self, backend: str, reason: str | None) -> None:
        self.notifier.backend_changed(backend, reason)
        self.runner.executor.backend_changed(backend, reason)

    def _job_ended(self, end: JobEnd) -> None:
        self.batcher.job_ended(end)
        self.notifier.job_ended(end)
        self.history.add(end)

    def _batch_finished(self, batch: Batch) -> None:
        self._background(self._report(batch))

    async def _report(self, batch: Batch) -> None:
        """The batch's report beside the state (old ones pruned), then its notification."""
        report = reports.build_report(batch.id, batch.started_at, batch.wall_seconds,
                                      batch.ends, batch.outcomes)
        folder = self.settings.daemon.state_dir / "reports"
        path: Path | None = None
        try:
            path = await asyncio.to_thread(reports.write_report, folder, report)
            await asyncio.to_thread(reports.prune, folder, self.settings.daemon.report_retention,
                                    time.time())
        except OSError as exc:
            self.log.error("report_failed", batch_id=batch.id, folder=str(folder),
                           error=exc.strerror or str(exc))
        self.notifier.batch_finished(batch.id, batch.files, batch.bytes, batch.wall_seconds,
                                     batch.outcomes, str(path) if path else None,
                                     {end.inbox for end in batch.ends})

    def _executor(self, settings: Settings) -> Executor:
        registry = StepRegistry(settings)
        for name, step in self.extra_steps.items():
            registry.register(name, step)
        if settings.cluster.broker:
            from traxd.cluster.remote import DramatiqExecutor

            return DramatiqExecutor(settings, registry, durable=self.journal.durable,
                                    on_paused=self.backends.pause)
        return LocalExecutor(settings, registry)

    async def recover(self) -> None:
        """Put every job left by a crash or stop back on its way; clean temporary files."""
        interrupted = self.journal.interrupt_all()
        self.journal.release_all()
        await self._adopt_strays()
        prepared = [j for j in self.journal.live(JobState.QUEUED) if j.final_path is not None]
        for job in prepared:
            self.journal.take(job)
        await asyncio.gather(*(self.runner.run(job) for job in prepared))
        live = self.journal.live()
        swept = await asyncio.to_thread(self._sweep, {str(j.id) for j in live})
        # Resumed: left running, or put back after a step finished (a stop's grace ran out).
        resumed = {j.id for j in interrupted} | {j.id for j in live if j.step}
        self.log.info("recovered", resumed=len(resumed), finalized=len(prepared),
                      temporaries_removed=swept)

    async def _adopt_strays(self) -> None:
        live = self.journal.live()
        self.runner.mover.reserve(live)
        claimed = {j.claimed_path for j in live if j.claimed_path is not None}
        for src, dest in await asyncio.to_thread(self.runner.mover.adopt_strays, claimed):
            self.log.warning("stray_adopted", file=str(src), moved_to=str(dest),
                             why="in processing/ with no job in the journal")

    def _sweep(self, live: set[str]) -> int:
        """Temporary files left by a crash mid-write; work folders of jobs no longer live."""
        swept = sum(sweep_temporaries(folder) for folders in self.runner.folders.values()
                    for folder in folders.all())
        root = self.runner.work_root
        if root.is_dir():
            for entry in root.iterdir():
                if entry.name not in live:
                    shutil.rmtree(entry, ignore_errors=True)
        return swept

    # --- running ----------------------------------------------------------------------------

    async def serve(self) -> int:
        self.flags = Flags()
        self._install_signals()
        try:
            await self._start()
            await self._main()
        finally:
            await self._shutdown()
        return 0

    async def _publish_known_series(self) -> None:
        inboxes = [i.name for i in self.settings.inboxes]
        backends = {b for i in self.settings.inboxes for spec in i.pipeline
                    if (b := backend_of(spec, self.settings))}
        last = await asyncio.to_thread(self.journal.last_done_times)
        metrics.publish_known(inboxes, sorted(backends), last)

    async def _start(self) -> None:
        await self.open()
        await self.recover()
        self.heap.settle(self.journal.made)
        await self._publish_known_series()
        self.http = self._start_http()
        for inbox in self.settings.inboxes:
            mode = self.watchers.start(inbox)
            self.log.info("watching", inbox=inbox.name, path=str(inbox.path), mode=mode)
        await self.intake.reconcile(count_missed=False)
        self.control = ControlServer(
            self.operations, self.settings.daemon.state_dir / "traxd.sock",
            registry={"config": str(self.settings.source.resolve() if self.settings.source
                                    else ""),
                      "inboxes": [i.name for i in self.settings.inboxes]})
        await self.control.start()
        self.notifier.start()
        self.notifier.watch_disk(lambda: self.journal.store.disk_full,
                                 str(self.settings.daemon.state_dir))
        self.batcher.start(self.settings.daemon.batch_interval)
        sdnotify.notify("READY=1", f"STATUS=watching {len(self.settings.inboxes)} inboxes")
        self.log.info("ready", inboxes=[i.name for i in self.settings.inboxes],
                      workers=self.settings.daemon.workers)

    def _start_http(self) -> HttpServerHandle | None:
        address = self.settings.daemon.metrics_address
        if not address:
            return None
        try:
            return start_http(address, self.operations, page=self._status_page(address))
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(str(self.settings.source or "<config>"), "daemon.metrics_address",
                              f"cannot listen on {address}: {why}; choose a free port, or \"\" "
                              "to serve no metrics") from exc

    def _status_page(self, address: str) -> WebApp | None:
        web, where = self.settings.web, str(self.settings.source or "<config>")
        if not web.page:
            return None
        token = os.environ.get(web.token_env) or None
        if web.control and token is None:
            raise ConfigError(where, "web.control", f"the buttons need a token: set "
                              f"${web.token_env} in traxd's environment, or control = false")
        loopback = is_loopback(parse_address(address)[0])
        if not loopback and token is None:
            self.log.warning("status_page_locked", address=address,
                             fix=f"set ${web.token_env} to serve the page beyond this machine")
        return WebApp(web, self.operations, self.history, token=token, loopback=loopback,
                      loop=asyncio.get_running_loop())

    async def _main(self) -> None:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self.pool.serve()),
                     group.create_task(self._govern()),
                     group.create_task(watch_loop_lag()),
                     group.create_task(self._reconcile_loop()),
                     group.create_task(self._reload_loop())]
            await self.flags.stop.wait()
            for task in tasks:
                task.cancel()

    async def _govern(self) -> None:
        """Re-sample the machine each second; also the loop's heartbeat for health checks."""
        watchdog = sdnotify.watchdog_interval()
        while True:
            self.operations.beat()
            self.heap.look(self.journal.live_count(), self.journal.made)
            self.governor.evaluate(await asyncio.to_thread(self.governor.sample))
            self.pool.wake()
            await self._rewatch(await asyncio.to_thread(self.watchers.changed))
            if watchdog is not None and self.watchers.alive():
                sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(GOVERNOR_INTERVAL)

    async def _rewatch(self, changed: list[str]) -> None:
        """An inbox folder removed loses its watch (not ready meanwhile); one there again, or
        replaced, is watched anew and scanned."""
        for name in changed:
            inbox = next((i for i in self.settings.inboxes if i.name == name), None)
            self.watchers.stop(name)
            if inbox is None:
                continue
            if not await asyncio.to_thread(inbox.path.is_dir):
                if name not in self.watchers.missing:
                    self.log.error("inbox_missing", inbox=name, path=str(inbox.path),
                                   fix="create the folder again; traxd watches it when it is back")
                self.watchers.missing.add(name)
                self.watchers.track(inbox)
                continue
            try:
                await asyncio.to_thread(create_folders, self.settings)
            except ConfigError as exc:
                self.log.error("inbox_unusable", inbox=name, error=str(exc))
                continue
            self.watchers.start(inbox)
            self.log.warning("watch_rearmed", inbox=name, path=str(inbox.path))
            await self.intake.reconcile_inbox(inbox, count_missed=False)

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.daemon.reconcile_interval)
            await self.intake.reconcile(count_missed=True)

    async def _reload_loop(self) -> None:
        while True:
            await self.flags.reload.wait()
            self.flags.reload.clear()
            self.reload()

    async def _run_job(self, job: Job, slot: Slot) -> None:
        outcome = await self.runner.run(job, slot)
        self.batcher.job_finished(job.id, outcome.value)

    def _on_duplicate(self, job: Job, original: int) -> None:
        self._background(self.runner.finish_duplicate(job, original))

    # --- signals, reload, shutdown ----------------------------------------------------------

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self.flags.reload.set)

    def _on_stop_signal(self) -> None:
        running = len(self.pool.running) if hasattr(self, "pool") else 0
        jobs = f"{running} job" + ("" if running == 1 else "s")
        if self.flags.stop.is_set():
            self.flags.cold = True
            if hasattr(self, "pool"):
                self.log.warning("stopping_now", message=f"stopping {jobs} now; they are "
                                 "taken up again at the next start")
                self._background(self.pool.cancel_all())
        elif running:
            grace = self.settings.daemon.shutdown_grace
            self.log.warning("stop_requested", message=f"finishing {jobs}, up to {grace:g} s; "
                             "Ctrl-C (or SIGTERM) again to stop now")
        self.flags.stop.set()

    def reload(self) -> None:
        """SIGHUP: the new configuration, or, if it cannot be loaded, the running one kept."""
        try:
            new = load_settings(self.settings.source)
        except ConfigError as exc:
            self.log.error("reload_failed", error=str(exc), kept="the running configuration")
            return
        except Exception as exc:  # e.g. a value no check foresaw: never fatal to the daemon
            self.log.exception("reload_failed", error=repr(exc),
                               kept="the running configuration")
            return
        self.apply(new)

    def apply(self, new: Settings) -> None:
        """Switch to a new configuration without dropping work in flight."""
        old = {i.name: i for i in self.settings.inboxes}
        fresh = {i.name: i for i in new.inboxes}
        create_folders(new)
        for name, inbox in old.items():
            if fresh.get(name) != inbox:
                self.watchers.stop(name)
        for name, inbox in fresh.items():
            if old.get(name) != inbox:
                self.watchers.start(inbox)
        self._swap_executor(new)
        # Jobs of an inbox that was removed finish as they began; no new ones start.
        departing = tuple(i for name, i in old.items() if name not in fresh and any(
            job.inbox == name for job in self.journal.live(JobState.RUNNING)))
        self.runner.configure(dataclasses.replace(new, inboxes=new.inboxes + departing))
        self.settings = self.operations.settings = new
        for part in (self.intake, self.gates):
            part.configure(new)
        self.governor.cap = new.daemon.workers
        self.batcher.reschedule(new.daemon.batch_interval)
        self.log.info("reloaded", inboxes=sorted(fresh))
        self.pool.wake()
        self._background(self.intake.reconcile(count_missed=False))

    def _swap_executor(self, new: Settings) -> None:
        """New step settings get new steps; the old ones close once the jobs using them end."""
        old = self.settings
        if (old.transcribe, old.enhance, old.download, old.cluster) == (
                new.transcribe, new.enhance, new.download, new.cluster):
            return
        retired, self.runner.executor = self.runner.executor, self._executor(new)
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

    async def _notify_stopped(self) -> None:
        """Tell that traxd stops; what is still queued gets NOTIFY_GRACE seconds to go out."""
        if not hasattr(self, "notifier"):
            return
        self.notifier.daemon_stopped(len(self.pool.running))
        await self.notifier.close(NOTIFY_GRACE)

    async def _shutdown(self) -> None:
        sdnotify.notify("STOPPING=1")
        if not hasattr(self, "pool"):  # start-up failed before the parts were built
            self.lock.release()
            return
        self.batcher.shutdown()
        if not hasattr(self, "control"):
            self.flags.cold = True  # start-up failed: no work was promised a grace period
        grace = 0.0 if self.flags.cold else self.settings.daemon.shutdown_grace
        self.log.info("stopping", running=len(self.pool.running), grace_seconds=grace)
        await self.pool.stop(grace)
        await self._notify_stopped()
        self.watchers.stop_all()
        self.intake.close()
        await self.runner.close()
        if hasattr(self, "control"):
            await self.control.close()
        if getattr(self, "http", None) is not None:
            assert self.http is not None
            self.http.close()
        await asyncio.to_thread(self.journal.close)
        self.lock.release()
        self.log.info("stopped")


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
