"""Test helpers: configs, a real daemon process, and polling with a deadline."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from traxd.config import Settings, StepSpec

T = TypeVar("T")

# A command step that copies the input to {output_dir}/{stem}.txt, optionally slowly, and
# appends the file name to a ledger so tests can count how often a step really ran.
COPY_SCRIPT = (
    "import os, shutil, sys, time\n"
    "src, dest, ledger, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])\n"
    "time.sleep(delay)\n"
    "if open(src, 'rb').read(4) == b'FAIL':\n"
    "    sys.exit('refusing to copy ' + os.path.basename(src))\n"
    "shutil.copyfile(src, dest)\n"
    "with open(ledger, 'a', errors='surrogateescape') as f:\n"
    "    f.write(os.path.basename(src) + '\\n')\n"
)


def copy_step(ledger: Path, delay: float = 0.0) -> list[str]:
    return [sys.executable, "-c", COPY_SCRIPT, "{input}", "{output_dir}/{stem}.txt",
            str(ledger), str(delay)]


def with_pipeline(settings: Settings, *pipeline: StepSpec) -> Settings:
    inbox = dataclasses.replace(settings.inboxes[0], pipeline=tuple(pipeline))
    return dataclasses.replace(settings, inboxes=(inbox,))


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
               message: str = "condition") -> T:
    """Poll predicate until it returns something truthy, or fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def toml_key(key: str) -> str:
    """A bare key where TOML allows one, else a quoted one (a path: path_map's keys)."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}"
                                for k, v in value.items()) + " }"
    raise TypeError(value)


def write_config(path: Path, daemon: dict[str, Any], inboxes: Sequence[dict[str, Any]],
                 **sections: dict[str, Any]) -> Path:
    lines = ["[daemon]"] + [f"{k} = {toml_value(v)}" for k, v in daemon.items()]
    for inbox in inboxes:
        lines += ["", "[[inbox]]"] + [f"{k} = {toml_value(v)}" for k, v in inbox.items()]
    for name, table in sections.items():
        lines += ["", f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def base_daemon(root: Path, **overrides: Any) -> dict[str, Any]:
    daemon: dict[str, Any] = {
        "state_dir": str(root / "state"), "workers": 2, "batch_interval": "0.2s",
        "settle_seconds": 0.3, "reconcile_interval": "2s", "metrics_address": "",
        "log_format": "json", "retry_backoff": "0.2s", "shutdown_grace": "5s",
    }
    daemon.update(overrides)
    return daemon


def files_under(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


class DaemonProcess:
    """`traxd run` as a real child process, its log in a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config, self.log, self.env = config, log, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "traxd", "run", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})})
        wait_until(lambda: '"ready"' in self.log_text() or self.proc is None
                   or self.proc.poll() is not None, 30, message="daemon ready")
        assert self.proc is not None and self.proc.poll() is None, self.log_text()
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextmanager
def running_daemon(config: Path, log: Path,
                   env: dict[str, str] | None = None) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(config, log, env).start()
    try:
        yield daemon
    finally:
        daemon.stop()
