"""What every benchmark shares: scratch folders, time limits, a daemon process, drops into an
inbox, an RSS sampler, /metrics parsing, and the one-line report of a figure.

A figure line reads ``FIGURE: VALUE  (target T)  BARE LIMIT  OK|MISSED|n/a``; a figure that
ran out of time reads ``FIGURE: MISSED: timed out after N s (what it was waiting for)``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import base_daemon, write_config
from traxd.config import load_settings
from traxd.control import SOCKET_NAME, request

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
FILE_SIZE = 1024  # bytes per dropped file; each file's content is unique (no duplicates)

# The daemon settings the figures assume (the throughput set-up).
SETTLE_SECONDS, BATCH_SECONDS, SHUTDOWN_GRACE = 0.2, 0.5, 5.0
THROUGHPUT = {"settle_seconds": SETTLE_SECONDS, "batch_interval": f"{BATCH_SECONDS:g}s",
              "reconcile_interval": "60s", "shutdown_grace": f"{SHUTDOWN_GRACE:g}s"}


# --- time limits ------------------------------------------------------------------------------


class BenchError(Exception):
    """A figure that could not be measured; reported as MISSED with the reason."""


class DaemonFailed(BenchError):
    pass


class TimedOut(BenchError):
    def __init__(self, seconds: float, what: str) -> None:
        super().__init__(f"timed out after {seconds:.0f} s ({what})")
        self.seconds, self.what = seconds, what


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise TimedOut in the main thread once `seconds` have passed, whatever it is doing."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise TimedOut(seconds, what)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str,
             interval: float = 0.05) -> T:
    """Poll until predicate returns something truthy; TimedOut after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:  # truthy, so not None
            return value
        if time.monotonic() > deadline:
            raise TimedOut(timeout, what)
        time.sleep(interval)


def throughput_limit(files: int, floor_rate: float = 200.0) -> float:
    """Seconds after which a throughput figure gives up: below `floor_rate` files/s."""
    return 60.0 + files / floor_rate


# --- reporting --------------------------------------------------------------------------------


def report(figure: str, value: str, target: str, ok: bool | None, bare: str = "") -> None:
    verdict = "n/a" if ok is None else "OK" if ok else "MISSED"
    extra = f"  {bare}" if bare else ""
    print(f"{figure}: {value}  (target {target}){extra}  {verdict}", flush=True)


def report_failure(figure: str, exc: BenchError) -> None:
    print(f"{figure}: MISSED: {exc}", flush=True)


def command_line(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of a module's docstring."""
    return argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])


def arguments(prog: str, doc: str | None, files: Sequence[int]) -> argparse.ArgumentParser:
    """A parser whose positional FILES default to the full sizes; smaller ones run quicker."""
    parser = command_line(prog, doc)
    parser.add_argument("files", type=int, nargs="*", default=list(files),
                        help=f"file counts (default: {' '.join(map(str, files))})")
    return parser


def machine() -> str:
    memory = psutil.virtual_memory().total / 2**30
    return (f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), "
            f"{memory:.1f} GiB memory, Python {sys.version.split()[0]}")


# --- scratch space, configs, drops ------------------------------------------------------------


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="traxd-bench-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class Box:
    """An inbox and its siblings, plus a staging folder on the same filesystem for drops."""

    root: Path
    name: str = "bench"

    @property
    def inbox(self) -> Path:
        return self.root / self.name / "inbox"

    @property
    def done(self) -> Path:
        return self.root / self.name / "done"

    @property
    def staging(self) -> Path:
        return self.root / self.name / "staging"

    def spec(self, pipeline: Sequence[Any], **extra: Any) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.inbox), "pipeline": list(pipeline), **extra}

    def stage(self, names: Sequence[str]) -> None:
        """Write the files to drop (unique content, FILE_SIZE bytes each) into staging/."""
        self.staging.mkdir(parents=True, exist_ok=True)
        self.inbox.mkdir(parents=True, exist_ok=True)
        for name in names:
            head = name.encode() + b"\n"
            (self.staging / name).write_bytes(head + b"." * (FILE_SIZE - len(head)))

    def drop(self, name: str) -> float:
        """Rename one staged file into the inbox (atomic, as a real drop); the wall time."""
        at = time.time()
        os.rename(self.staging / name, self.inbox / name)
        return at

    def drop_all(self, names: Sequence[str]) -> None:
        for name in names:
            os.rename(self.staging / name, self.inbox / name)

    def done_count(self) -> int:
        try:
            return len(os.listdir(self.done))  # noqa: PTH208 (names only: 100k Paths cost)
        except FileNotFoundError:
            return 0

    def wait_done(self, files: int, timeout: float) -> float:
        """Wait until `files` are in done/; the monotonic time it was seen."""
        interval = min(0.5, max(0.02, files / 200_000))  # a listing costs ~0.3 us per entry
        try:
            wait_for(lambda: self.done_count() >= files, timeout, "", interval)
        except TimedOut as exc:
            raise TimedOut(exc.seconds, f"{files} files in done/, {self.done_count()} there"
                           ) from None
        return time.monotonic()


def names_for(files: int, prefix: str = "f") -> list[str]:
    return [f"{prefix}{n:06d}.bin" for n in range(files)]


def config(root: Path, inboxes: Sequence[dict[str, Any]], **daemon: Any) -> Path:
    """A traxd.toml under root: the tests' base daemon with the throughput settings."""
    settings = base_daemon(root, **{**THROUGHPUT, **daemon})
    return write_config(root / "traxd.toml", settings, inboxes)


def status(config_path: Path, timeout: float = 30.0) -> dict[str, Any]:
    """The running daemon's status, asked over its control socket (as `traxd status` does)."""
    state_dir = load_settings(config_path).daemon.state_dir
    return request(state_dir / SOCKET_NAME, "status", timeout=timeout)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def true_pipeline() -> list[dict[str, list[str]]]:
    """A pipeline of one command step running the `true` binary (no output, no shell)."""
    return [{"command": [shutil.which("true") or "/bin/true"]}]


# --- the daemon process and its log -----------------------------------------------------------


def log_events(path: Path, wanted: str | None = None) -> Iterator[dict[str, Any]]:
    """The JSON events of a log file (lines that are not JSON are skipped)."""
    needle = None if wanted is None else f'"{wanted}"'.encode()
    with path.open("rb") as handle:
        for line in handle:
            if not line.startswith(b"{") or (needle is not None and needle not in line):
                continue
            with contextlib.suppress(ValueError):
                event: dict[str, Any] = json.loads(line)
                if wanted is None or event.get("event") == wanted:
                    yield event


def last_line(path: Path) -> str:
    """The last non-empty line of a file (a traceback's last line is its error)."""
    lines = path.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(empty log)"


def event_time(event: dict[str, Any]) -> float:
    """Unix time of a log event's ISO 8601 "timestamp"."""
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


@dataclass
class DaemonProcess:
    """A daemon as a real child process (`traxd run` or a runner module), its log in a file."""

    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0  # wall time just before the process was started
    _offset: int = field(default=0, repr=False)

    @classmethod
    def traxd(cls, config_path: Path) -> DaemonProcess:
        return cls([PY, "-m", "traxd", "run", "--config", str(config_path)],
                   config_path.parent / "daemon.log")

    @classmethod
    def noop(cls, config_path: Path) -> DaemonProcess:
        return cls([PY, "-m", "bench.noop_daemon", str(config_path)],
                   config_path.parent / "daemon.log")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> float:
        """Start it and wait for its "ready" event; seconds from start to ready (log times)."""
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.started_at = time.time()
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=REPO)
        atexit.register(self.stop)  # also when a time limit cut a clean-up short
        ready = wait_for(self._ready, timeout, "the daemon's ready event", 0.02)
        return event_time(ready) - self.started_at

    def _ready(self) -> dict[str, Any] | None:
        assert self.proc is not None
        with self.log.open("rb") as handle:
            handle.seek(self._offset)
            for line in handle:
                if b'"ready"' in line:
                    return dict(json.loads(line))
        if self.proc.poll() is not None:
            raise DaemonFailed(f"the daemon exited with {self.proc.returncode}: "
                               + last_line(self.log))
        return None

    def terminate(self, timeout: float) -> float:
        """SIGTERM; seconds until the process has exited (TimedOut after `timeout`)."""
        assert self.proc is not None
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise TimedOut(timeout, "the daemon to exit after SIGTERM") from exc
        return time.monotonic() - sent

    def stop(self) -> None:
        """Kill it if it still runs (the end of a benchmark, or of a failed one)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


STEPS = {"noop": "no-op step", "true": "command true"}


def daemon_for(step: str, config_path: Path) -> DaemonProcess:
    """The in-process no-op step (bench.noop_daemon), or `traxd run` as configured."""
    if step == "noop":
        return DaemonProcess.noop(config_path)
    return DaemonProcess.traxd(config_path)


@contextlib.contextmanager
def running(daemon: DaemonProcess, timeout: float = 60.0) -> Iterator[DaemonProcess]:
    daemon.start(timeout)
    try:
        yield daemon
    finally:
        daemon.stop()


def traxd_cli(*args: str, timeout: float = 30.0) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run `python -m traxd ARGS`; its wall time and result."""
    started = time.monotonic()
    try:
        result = subprocess.run([PY, "-m", "traxd", *args], capture_output=True, text=True,
                                timeout=timeout, check=False, cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        raise TimedOut(timeout, f"traxd {' '.join(args)}") from exc
    return time.monotonic() - started, result


# --- measuring --------------------------------------------------------------------------------


class PeakRss:
    """Samples a process's resident memory every `interval` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def scrape(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as answer:  # loopback only
        text: str = answer.read().decode("utf-8")
        return text


def histogram_quantile(q: float, text: str, name: str) -> float | None:
    """Prometheus's histogram_quantile over a histogram in exposition text; None if absent."""
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    if not buckets:
        return None
    return _quantile(q, sorted(buckets.items()))


def _quantile(q: float, cumulative: list[tuple[float, float]]) -> float:
    total = cumulative[-1][1]
    if total == 0:
        return 0.0
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if bound == float("inf"):
                return lower  # as Prometheus: the highest finite bound
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[index]
