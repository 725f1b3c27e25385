"""Child processes as asyncio subprocesses: argv only, limits watched, stopped with escalation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from traxd.errors import ResourceExceeded, StepTimeout
from traxd.logs import CREDENTIAL_NAMES

LineHandler = Callable[[str], None]

WATCH_INTERVAL = 0.5
PUMP_CHUNK = 1 << 16
STOP_ESCALATION = ((signal.SIGINT, 2.0), (signal.SIGTERM, 3.0))


def watch_children_by_pidfd() -> None:
    """On Python 3.11 asyncio starts a thread per child to wait for its exit; a pidfd on the
    running loop costs none (Python 3.12 does this by itself). Where pidfds are missing
    (macOS, old kernels), the default stays."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.get_event_loop_policy().set_child_watcher(watcher)


def child_environment(environ: Mapping[str, str] | None = None,
                      **extra: str) -> dict[str, str]:
    """The environment a child process gets: ours without anything credential-like (steps
    that call an API do so inside the daemon, which reads the keys; programs get none)."""
    source = os.environ if environ is None else environ
    return {**{k: v for k, v in source.items() if not CREDENTIAL_NAMES.search(k)}, **extra}


@dataclass(frozen=True)
class ProcessLimits:
    timeout: float | None = None  # wall-clock seconds
    stall_seconds: float | None = None  # no output and no CPU time for this long
    memory_limit_mb: int | None = None  # resident memory of the whole process tree


@dataclass(frozen=True)
class ProcessResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr_tail: str
    peak_rss_mb: float

    @property
    def signal_name(self) -> str | None:
        """The signal that ended the process (WTERMSIG), if one did."""
        if self.returncode < 0:
            return signal.Signals(-self.returncode).name
        return None


class _Watch:
    """What the watcher learns about a running tree: activity, peak memory, the verdict."""

    def __init__(self, now: float) -> None:
        self.last_activity = now
        self.cpu_seconds = 0.0
        self.peak_rss_mb = 0.0
        self.verdict: Exception | None = None


async def run_process(
    argv: Sequence[str],
    *,
    limits: ProcessLimits = ProcessLimits(),
    on_stdout_line: LineHandler | None = None,
    capture_stdout: bool = False,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stderr_lines: int = 40,
    stdin: bytes | None = None,
) -> ProcessResult:
    """Run argv to its end; limits breached raise StepTimeout or ResourceExceeded.

    Cancelling the awaiting task stops the process group: SIGINT, SIGTERM, then SIGKILL.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=dict(env) if env is not None else child_environment(),
        start_new_session=True,
    )
    watch = _Watch(time.monotonic())
    tail: deque[str] = deque(maxlen=stderr_lines)
    stdout = bytearray()
    try:
        async with asyncio.TaskGroup() as group:
            keep = stdout if capture_stdout else None
            group.create_task(_pump(proc.stdout, watch, on_stdout_line, keep))
            group.create_task(_pump(proc.stderr, watch, tail.append, None))
            if stdin is not None:
                group.create_task(_feed(proc.stdin, stdin))
            watcher = group.create_task(_watch(proc, limits, watch))
            await proc.wait()
            watcher.cancel()
            # Whatever it started and left behind holds its pipes open: end them too.
            _signal_group(proc.pid, signal.SIGKILL)
    except BaseException:
        await asyncio.shield(stop_process(proc))
        raise
    if watch.verdict is not None:
        raise watch.verdict
    return ProcessResult(tuple(argv), proc.returncode or 0, bytes(stdout), "\n".join(tail),
                         watch.peak_rss_mb)


async def _feed(stream: asyncio.StreamWriter | None, data: bytes) -> None:
    """Write `data` to the child's stdin and close it; a child that stops reading is fine."""
    if stream is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stream.write(data)
        await stream.drain()
    stream.close()


async def _pump(
    stream: asyncio.StreamReader | None,
    watch: _Watch,
    handler: LineHandler | None,
    keep: bytearray | None,
) -> None:
    """Read a stream in chunks (a program that writes `\\r` progress for hours never ends a
    line); each whole line goes to `handler`, and a line longer than PUMP_CHUNK in pieces."""
    if stream is None:
        return
    pending = b""
    while chunk := await stream.read(PUMP_CHUNK):
        watch.last_activity = time.monotonic()
        if keep is not None:
            keep.extend(chunk)
        if handler is None:
            continue
        *lines, pending = (pending + chunk).split(b"\n")
        while len(pending) > PUMP_CHUNK:
            lines.append(pending[:PUMP_CHUNK])
            pending = pending[PUMP_CHUNK:]
        for line in lines:
            handler(line.decode("utf-8", "replace").rstrip("\r"))
    if handler is not None and pending:
        handler(pending.decode("utf-8", "replace").rstrip("\r"))


async def _watch(proc: asyncio.subprocess.Process, limits: ProcessLimits, watch: _Watch,
                 clock: Callable[[], float] = time.monotonic) -> None:
    """Every WATCH_INTERVAL, judge the tree's memory, time and progress (a program that
    ends before the first look is never looked at: most commands are that quick). A program
    that has exited while its output stays open left children holding the pipes: they end."""
    started = looked = clock()
    await asyncio.sleep(WATCH_INTERVAL)
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(proc.pid)
        while proc.returncode is None:
            now = clock()
            # Time this daemon did not run (stopped, suspended, starved) is no one's stall.
            missed = max(0.0, now - looked - WATCH_INTERVAL)
            started, looked = started + missed, now
            watch.last_activity += missed
            watch.verdict = _verdict(root, limits, watch, started, now)
            if watch.verdict is not None:
                await stop_process(proc)
                return
            await asyncio.sleep(WATCH_INTERVAL)
    _signal_group(proc.pid, signal.SIGKILL)


def _verdict(
    root: psutil.Process, limits: ProcessLimits, watch: _Watch, started: float, now: float
) -> Exception | None:
    if root.status() == psutil.STATUS_ZOMBIE:
        return None  # it has ended; its exit is on the way
    rss, cpu = tree_usage(root)
    watch.peak_rss_mb = max(watch.peak_rss_mb, rss)
    if cpu > watch.cpu_seconds + 0.01:
        watch.cpu_seconds, watch.last_activity = cpu, now
    if limits.memory_limit_mb and rss > limits.memory_limit_mb:
        return ResourceExceeded(
            f"stopped at {rss:.0f} MB resident, over the {limits.memory_limit_mb} MB limit",
            reason="memory")
    if limits.timeout and now - started > limits.timeout:
        return StepTimeout(f"stopped after {limits.timeout:.0f} s (step timeout)", reason="timeout")
    if limits.stall_seconds and now - watch.last_activity > limits.stall_seconds:
        return StepTimeout(f"stopped: no progress for {limits.stall_seconds:.0f} s",
                           reason="stall")
    return None


def tree_usage(root: psutil.Process) -> tuple[float, float]:
    """Resident MB and CPU seconds of a process and all its descendants."""
    rss = cpu = 0.0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0, 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            rss += proc.memory_info().rss / 2**20
            times = proc.cpu_times()
            cpu += times.user + times.system
    return rss, cpu


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    """Stop a process group: SIGINT, wait, SIGTERM, wait, SIGKILL."""
    for sig, grace in STOP_ESCALATION:
        if proc.returncode is not None:
            return
        _signal_group(proc.pid, sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), grace)
    if proc.returncode is None:
        _signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
