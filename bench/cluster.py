"""Scale-out: files through `command = ["true"]` on 1 and 2 `traxd worker`s over Redis.

    python -m bench.cluster [FILES] [--threads 4]        (default: 500 files)

For each worker count: a redis-server of its own on a free loopback port, `traxd run` with
`[cluster] broker` set, N `traxd worker --threads T` processes, FILES files renamed into the
inbox at once, timed from the first drop until all are in done/. The bare limit, in the same
run: the same daemon with no [cluster] (the steps run in the daemon). Target: 2 workers at
least as fast as 1. On one 2-core machine the workers share the CPUs with the daemon and
Redis, so the figure is the cost of the round trip per step (send, fetch, reply, collect);
on several machines each worker brings its own CPUs and the step time dominates for media.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bench import kit
from tests.helpers import base_daemon, write_config


@contextmanager
def redis_server(root: Path) -> Iterator[str]:
    port = kit.free_port()
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        ping = ["redis-cli", "-p", str(port), "ping"]
        kit.wait_for(lambda: subprocess.run(ping, check=False, capture_output=True).returncode
                     == 0 or None, 10, "redis-server", 0.05)
        yield url
    finally:
        proc.kill()
        proc.wait(10)


@contextmanager
def workers(config: Path, count: int, threads: int) -> Iterator[None]:
    procs = []
    try:
        for n in range(count):
            log = (config.parent / f"worker{n}.log").open("ab")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "traxd", "worker", "--config", str(config),
                 "--threads", str(threads)], stdout=log, stderr=subprocess.STDOUT, cwd=kit.REPO))
            log.close()
        logs = [config.parent / f"worker{n}.log" for n in range(count)]

        def ready() -> bool | None:
            return all("worker_ready" in log.read_text() for log in logs) or None

        kit.wait_for(ready, 60, "workers ready", 0.05)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def rate(root: Path, files: int, count: int, threads: int, timeout: float) -> float:
    """Files/s with `count` workers (0: no cluster, the steps in the daemon)."""
    box = kit.Box(root)
    names = kit.names_for(files)
    box.stage(names)
    daemon = base_daemon(root, **{**kit.THROUGHPUT, "workers": 8})
    inbox = [box.spec(kit.true_pipeline())]
    with redis_server(root) as url:
        sections = {"cluster": {"broker": url, "lease": 10.0}} if count else {}
        config = write_config(root / "traxd.toml", daemon, inbox, **sections)
        with workers(config, count, threads), kit.running(kit.DaemonProcess.traxd(config)):
            started = time.monotonic()
            box.drop_all(names)
            finished = box.wait_done(files, timeout)
    return files / (finished - started)


def measure(files: int, count: int, threads: int) -> float:
    limit = kit.throughput_limit(files, floor_rate=5.0)
    with kit.scratch() as root, kit.time_limit(limit + 120, f"{files} files"):
        return rate(root, files, count, threads, limit)


def main(argv: Sequence[str] | None = None) -> int:
    parser = kit.arguments("bench.cluster", __doc__, (500,))
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    print(f"machine: {kit.machine()}", flush=True)
    for files in args.files:
        try:
            local = measure(files, 0, args.threads)
            one = measure(files, 1, args.threads)
            two = measure(files, 2, args.threads)
        except kit.BenchError as exc:
            kit.report_failure(f"cluster {files} files", exc)
            continue
        bare = f"steps in the daemon (no cluster): {local:.1f} files/s"
        kit.report(f"cluster {files} files, command true, 1 worker x {args.threads} threads",
                   f"{one:.1f} files/s = {one / local:.2f}x in-daemon", "n/a", None, bare)
        kit.report(f"cluster {files} files, command true, 2 workers x {args.threads} threads",
                   f"{two:.1f} files/s = {two / one:.2f}x 1 worker", ">= 1.0x 1 worker",
                   two >= one, bare)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
