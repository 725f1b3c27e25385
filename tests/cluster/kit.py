"""Helpers of the cluster tests: our own redis-server, `traxd worker` processes, configs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis

from tests.faults.kit import Box, log_events
from tests.helpers import DaemonProcess, base_daemon, files_under, wait_until, write_config


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A redis-server of the test's own on a free loopback port, keeping nothing on disk
    (a restart loses every key, as a crash of an unpersisted Redis does)."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.ping, 10, message="redis-server answers")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=2)

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        """Killed and started again on the same port: every key is gone."""
        self.stop()
        self.start()


class WorkerProcess:
    """`traxd worker` as a real child process, its JSON log in a file."""

    def __init__(self, config: Path, log: Path, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.config, self.log, self.args = config, log, args
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "traxd", "worker", "--config", str(self.config),
                 *self.args], stdout=out, stderr=subprocess.STDOUT, env=self.env)
        wait_until(lambda: self.events_named("worker_ready") or self.proc is None
                   or self.proc.poll() is not None, 30, message="worker ready")
        assert self.proc is not None and self.proc.poll() is None, self.log_text()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in log_events(self.log) if e.get("event") == name]

    def files_run(self) -> list[str]:
        """The files whose steps this worker replied to, in order."""
        return [str(e["file"]) for e in self.events_named("step_replied")]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def cluster_config(root: Path, redis_url: str, pipeline: list[Any], *, lease: float = 3.0,
                   name: str = "traxd.toml", daemon: dict[str, Any] | None = None,
                   **sections: dict[str, Any]) -> Path:
    """A daemon (and worker) config: one inbox under root/box, steps on the cluster."""
    cluster = {"broker": redis_url, "lease": lease, **sections.pop("cluster", {})}
    return write_config(
        root / name, {**base_daemon(root), **(daemon or {})},
        [{"name": "main", "path": str(root / "box" / "inbox"), "pipeline": pipeline}],
        cluster=cluster, **sections)


class Site:
    """One daemon and its workers under one root; everything stopped at the end."""

    def __init__(self, root: Path, config: Path) -> None:
        self.root, self.config = root, config
        self.box = Box(root / "box").make()
        self.daemon = DaemonProcess(config, root / "daemon.log")
        self.workers: list[WorkerProcess] = []

    def worker(self, *args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(self.config, self.root / f"worker{len(self.workers)}.log",
                               "--threads", "1", *args, env=env).start()
        self.workers.append(worker)
        return worker

    def drop(self, names: list[str]) -> None:
        for name in names:
            (self.box.inbox / name).write_text(f"content of {name}\n")

    def wait_done(self, names: list[str], timeout: float = 90) -> None:
        wait_until(lambda: set(files_under(self.box.done)) >= set(names), timeout,
                   message=f"{len(names)} files done; daemon log:\n"
                   f"{self.daemon.log_text()[-3000:]}")

    def stop(self) -> None:
        self.daemon.stop()
        for worker in self.workers:
            worker.stop()


def make_site(sites: list[Site], root: Path, redis: RedisServer, pipeline: list[object],
          **kw: object) -> Site:
    site = Site(root, cluster_config(root, redis.url, pipeline, **kw))  # type: ignore[arg-type]
    sites.append(site)
    return site


# A command step that blocks until a marker file exists, then copies the input to
# {output_dir}/{stem}.txt and appends its name to a ledger: a kill lands at a known point.
BLOCK_SCRIPT = (
    "import os, shutil, sys, time\n"
    "src, dest, ledger, marker = sys.argv[1:5]\n"
    "while not os.path.exists(marker):\n"
    "    time.sleep(0.05)\n"
    "shutil.copyfile(src, dest)\n"
    "with open(ledger, 'a') as f:\n"
    "    f.write(os.path.basename(src) + '\\n')\n"
)


def block_step(ledger: Path, marker: Path) -> list[str]:
    return [sys.executable, "-c", BLOCK_SCRIPT, "{input}", "{output_dir}/{stem}.txt",
            str(ledger), str(marker)]
