"""Notifications: Apprise URLs and a `command`, sent by a task of their own.

Events are queued (`emit` never waits) and sent one after another by `Notifier.serve`;
Apprise runs in a thread of its own, the command as a child process, so a receiver that
hangs or fails never holds up a job. Each message is tried `1 + retries` times per
notifier, logged and counted in `traxd_notifications_total{event,outcome}`. Failed files
are grouped: one message when their batch ends, or at most one per `group_seconds`.
Everything sent passes the redactor; Apprise URLs (they hold tokens) are never written.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from traxd import metrics
from traxd.config import NotifySettings, Settings
from traxd.folders import sidecar_path
from traxd.jobs import JobEnd
from traxd.logs import Redactor, get_logger
from traxd.procs import ProcessLimits, child_environment, run_process

QUEUE_LIMIT = 1000  # messages waiting; more are dropped (and counted), never held in memory
LISTED_FAILURES = 20  # failures named in one message's text
KEPT_FAILURES = 200  # failures in one message's JSON data
FIRST_RETRY_DELAY = 1.0
MAX_RETRY_DELAY = 30.0
DISK_POLL_SECONDS = 1.0
OUTCOMES = ("sent", "failed", "dropped")


class NotifyFailed(Exception):
    """One notifier could not deliver one message (the reason is already redacted)."""


@dataclass(frozen=True)
class Message:
    event: str
    title: str
    body: str
    data: Mapping[str, Any] = field(default_factory=dict)
    failure: bool = False
    at: float = field(default_factory=time.time)

    def payload(self, host: str) -> dict[str, Any]:
        """The event as JSON for the command notifier."""
        return {"event": self.event, "time": datetime.fromtimestamp(self.at, UTC).isoformat(),
                "host": host, "title": self.title, "message": self.body, **self.data}


class Sender(Protocol):
    name: str

    async def send(self, message: Message, host: str) -> None: ...

    def close(self) -> None: ...


class AppriseSender:
    """Every configured Apprise URL, sent to from one thread (Apprise is blocking)."""

    name = "apprise"

    def __init__(self, urls: Sequence[str], timeout: float, redactor: Redactor) -> None:
        import apprise

        logging.getLogger("apprise").addHandler(logging.NullHandler())
        self._apprise = apprise.Apprise()
        for index, url in enumerate(urls):
            if not self._apprise.add(url):
                raise ValueError(f"notify.urls[{index}] is not a URL Apprise knows; see "
                                 "https://github.com/caronc/apprise/wiki for the forms")
        self._types = apprise.NotifyType
        self._timeout = timeout
        self._redactor = redactor
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="traxd-notify")

    async def send(self, message: Message, host: str) -> None:
        notes: list[str] = []
        call = functools.partial(
            self._apprise.notify, body=message.body, title=message.title,
            notify_type=self._types.FAILURE if message.failure else self._types.INFO,
            timeout=self._timeout, log_level=logging.WARNING,
            log_callback=lambda entry, _: notes.append(entry.message))
        delivered = await asyncio.get_running_loop().run_in_executor(self._thread, call)
        if not delivered:
            why = notes[-1] if notes else "not delivered"
            raise NotifyFailed(self._redactor.text(why))

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


class CommandSender:
    """A program run per message: argv template ({event}, {title}), the event JSON on
    stdin, no shell, the environment without credentials."""

    name = "command"

    def __init__(self, argv: Sequence[str], timeout: float, redactor: Redactor) -> None:
        self._argv = tuple(argv)
        self._timeout = timeout
        self._redactor = redactor

    async def send(self, message: Message, host: str) -> None:
        argv = [arg.replace("{event}", message.event).replace("{title}", message.title)
                for arg in self._argv]
        body = (json.dumps(message.payload(host), ensure_ascii=False) + "\n").encode()
        try:
            result = await run_process(argv, limits=ProcessLimits(timeout=self._timeout),
                                       env=child_environment(), stdin=body)
        except OSError as exc:
            raise NotifyFailed(f"cannot run {argv[0]}: {exc.strerror}") from exc
        if result.returncode != 0:
            tail = result.stderr_tail.strip().splitlines()[-1:] or [""]
            raise NotifyFailed(self._redactor.text(
                f"{argv[0]} exited with {result.signal_name or result.returncode}: {tail[0]}"))

    def close(self) -> None:
        return None


def url_secrets(urls: Sequence[str]) -> list[str]:
    """The parts of Apprise URLs that may be credentials (and the whole URLs)."""
    secrets = list(urls)
    for url in urls:
        parts = urlsplit(url)
        secrets += [unquote(p) for p in (parts.password, parts.username) if p]
        secrets += [unquote(p) for p in parts.path.split("/") + parts.query.split("&") if p]
    return secrets


class Notifier:
    def __init__(self, settings: NotifySettings, senders: Sequence[Sender],
                 redactor: Redactor, inbox_events: Mapping[str, Sequence[str]] | None = None
                 ) -> None:
        self.settings = settings
        # Inboxes that name their own events ([[inbox]] notify); the others take [notify]'s.
        self.inbox_events = {k: frozenset(v) for k, v in (inbox_events or {}).items()}
        self.senders = list(senders)
        self.redactor = redactor
        self.host = socket.gethostname()
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue(QUEUE_LIMIT)
        self._failures: list[JobEnd] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._serving: asyncio.Task[None] | None = None
        self._log = get_logger(component="notify")
        for event in settings.events:
            for outcome in OUTCOMES:
                metrics.NOTIFICATIONS.labels(event=event, outcome=outcome)

    @classmethod
    def of(cls, settings: Settings) -> Notifier:
        """The notifiers the settings name (none: every event is dropped quietly)."""
        notify = settings.notify
        redactor = Redactor.of_environment(settings.key_variables)
        redactor = Redactor((*redactor.values, *url_secrets(notify.urls)))
        senders: list[Sender] = []
        if notify.urls:
            senders.append(AppriseSender(notify.urls, notify.timeout, redactor))
        if notify.command:
            senders.append(CommandSender(notify.command, notify.timeout, redactor))
        return cls(notify, senders, redactor,
                   {i.name: i.notify for i in settings.inboxes if i.notify is not None})

    def wants(self, event: str, inboxes: Collection[str] = ()) -> bool:
        """Whether `event` is told; for files of `inboxes`, when one of them wants it."""
        if not self.senders or event not in self.settings.events:
            return False
        return not inboxes or any(event in self.inbox_events.get(name, (event,))
                                  for name in inboxes)

    # --- events (called on the event loop; none of them waits) ------------------------------

    def emit(self, event: str, title: str, body: str, *, failure: bool = False,
             **data: Any) -> None:
        if not self.wants(event):
            return
        message = Message(event, self.redactor.text(title), self.redactor.text(body),
                          self._redacted(data), failure)
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            metrics.NOTIFICATIONS.labels(event=event, outcome="dropped").inc()
            self._log.warning("notification_dropped", notify_event=event,
                              why=f"{QUEUE_LIMIT} messages already wait to be sent")

    def job_ended(self, end: JobEnd) -> None:
        if end.outcome != "failed" or not self.wants("file_failed", (end.inbox,)):
            return
        self._failures.append(end)
        if self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(
                self.settings.group_seconds, self.flush_failures)

    def flush_failures(self) -> None:
        """One message for every failure not yet told."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        failures, self._failures = self._failures, []
        if not failures:
            return
        lines = [_failure_line(end) for end in failures[:LISTED_FAILURES]]
        if len(failures) > LISTED_FAILURES:
            lines.append(f"… and {len(failures) - LISTED_FAILURES} more")
        count = len(failures)
        self.emit("file_failed", f"traxd@{self.host}: {count} file{'s' * (count != 1)} failed",
                  "\n".join(lines), failure=True, count=count,
                  failures=[_failure_data(end) for end in failures[:KEPT_FAILURES]])

    def batch_finished(self, batch_id: str, files: int, size: int, wall_seconds: float,
                       outcomes: Mapping[str, int], report: str | None = None,
                       inboxes: Collection[str] = ()) -> None:
        self.flush_failures()
        if not self.wants("batch_finished", inboxes):
            return
        counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
        body = f"{files} files ({_size(size)}) in {wall_seconds:.1f} s: {counts}"
        if report:
            body += f"\nreport: {report}"
        self.emit("batch_finished", f"traxd@{self.host}: batch {batch_id} finished", body,
                  failure=bool(outcomes.get("failed")), batch_id=batch_id, files=files,
                  bytes=size, wall_seconds=wall_seconds, outcomes=dict(outcomes), report=report)

    def backend_changed(self, backend: str, reason: str | None) -> None:
        if reason is None:
            self.emit("backend_resumed", f"traxd@{self.host}: backend {backend} resumed",
                      f"{backend} is in use again; waiting files continue.", backend=backend)
            return
        self.emit("backend_paused", f"traxd@{self.host}: backend {backend} paused",
                  f"{reason}\nFiles needing {backend} wait. Fix the cause, then run "
                  "`traxd resume`.", failure=True, backend=backend, reason=reason)

    def daemon_stopped(self, running: int) -> None:
        body = "traxd stopped." + (f" {running} running jobs resume at the next start."
                                   if running else "")
        self.emit("daemon_stopped", f"traxd@{self.host}: stopped", body, running=running)

    def watch_disk(self, full: Callable[[], bool], where: str) -> None:
        """Poll `full` (the journal's disk) and tell when it turns full."""
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch_disk(full, where)))

    async def _watch_disk(self, full: Callable[[], bool], where: str) -> None:
        was = False
        while True:
            now = full()
            if now and not was:
                self.emit("disk_full", f"traxd@{self.host}: disk full", f"The disk holding "
                          f"{where} is full: no new work starts until there is space.",
                          failure=True, path=where)
            was = now
            await asyncio.sleep(DISK_POLL_SECONDS)

    # --- sending ----------------------------------------------------------------------------

    def start(self) -> None:
        self._serving = asyncio.get_running_loop().create_task(self.serve())
        self._tasks.append(self._serving)

    async def serve(self) -> None:
        while (message := await self._queue.get()) is not None:
            for sender in self.senders:
                try:
                    await self._deliver(sender, message)
                except Exception:  # a bug in one sender never ends the others, or the daemon
                    self._log.exception("notification_bug", notify_event=message.event,
                                        notifier=sender.name)
                    metrics.NOTIFICATIONS.labels(event=message.event, outcome="failed").inc()

    async def _deliver(self, sender: Sender, message: Message) -> None:
        tries = 1 + self.settings.retries
        for attempt in range(1, tries + 1):
            try:
                async with asyncio.timeout(self.settings.timeout + 5.0):
                    await sender.send(message, self.host)
            except (NotifyFailed, TimeoutError) as exc:
                why = str(exc) or f"no answer within {self.settings.timeout:g} s"
                if attempt == tries:
                    self._log.error("notification_failed", notify_event=message.event,
                                    notifier=sender.name, attempts=tries, error=why)
                    metrics.NOTIFICATIONS.labels(event=message.event, outcome="failed").inc()
                    return
                delay = min(MAX_RETRY_DELAY, FIRST_RETRY_DELAY * 2 ** (attempt - 1))
                self._log.warning("notification_retry", notify_event=message.event,
                                  notifier=sender.name, attempt=attempt, error=why,
                                  retry_in=delay)
                await asyncio.sleep(delay)
            else:
                self._log.info("notification_sent", notify_event=message.event,
                               notifier=sender.name, attempt=attempt)
                metrics.NOTIFICATIONS.labels(event=message.event, outcome="sent").inc()
                return

    async def close(self, grace: float) -> None:
        """Send what is queued (failures not yet told first), for at most `grace` s."""
        self.flush_failures()
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)
        if self._serving is not None:
            await asyncio.wait([self._serving], timeout=grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sender in self.senders:
            sender.close()

    def _redacted(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redactor.text(value)
        if isinstance(value, Mapping):
            return {str(k): self._redacted(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._redacted(v) for v in value]
        return value


def _failure_line(end: JobEnd) -> str:
    error = end.error or {}
    return (f"- {end.inbox}/{end.file}: {error.get('step', '?')}: "
            f"{error.get('message', 'failed')} ({error.get('reason', '?')})")


def _failure_data(end: JobEnd) -> dict[str, Any]:
    error = end.error or {}
    return {"inbox": end.inbox, "file": end.file, "step": error.get("step"),
            "category": error.get("category"), "reason": error.get("reason"),
            "message": error.get("message"),
            "sidecar": str(sidecar_path(Path(end.final_path))) if end.final_path else None}


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"
