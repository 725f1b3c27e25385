"""Command steps: files through `command = ["true"]`, against a plain asyncio spawning loop.

    python -m bench.commands [FILES] [--workers 2 4]        (default: 5000 files)

For each worker count: `traxd run` with one inbox whose pipeline runs the `true` binary,
FILES files of 1 KiB renamed into the inbox at once, timed from the first drop until all
are in done/. The bare limit, in the same run: a plain asyncio loop spawning `true` FILES
times (asyncio.create_subprocess_exec, bounded by a Semaphore of the same worker count).
Target: the daemon reaches at least 0.8x the bare loop's rate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

from bench import kit

TARGET_RATIO = 0.8


async def _spawn_all(argv: Sequence[str], times: int, workers: int) -> None:
    gate = asyncio.Semaphore(workers)

    async def one() -> None:
        async with gate:
            proc = await asyncio.create_subprocess_exec(*argv)
            await proc.wait()

    await asyncio.gather(*(one() for _ in range(times)))


def bare_rate(files: int, workers: int) -> float:
    """Spawns/s of a plain asyncio loop running `true` with `workers` at a time."""
    argv = kit.true_pipeline()[0]["command"]
    started = time.monotonic()
    asyncio.run(_spawn_all(argv, files, workers))
    return files / (time.monotonic() - started)


def daemon_rate(root: Path, files: int, workers: int, timeout: float) -> float:
    """Files/s through `traxd run` with the `true` command step, drop to all in done/."""
    box = kit.Box(root)
    names = kit.names_for(files)
    box.stage(names)
    config = kit.config(root, [box.spec(kit.true_pipeline())], workers=workers)
    with kit.running(kit.DaemonProcess.traxd(config)):
        started = time.monotonic()
        box.drop_all(names)
        finished = box.wait_done(files, timeout)
    return files / (finished - started)


def measure(files: int, workers: int) -> tuple[float, float]:
    """(daemon files/s, bare spawns/s)."""
    limit = kit.throughput_limit(files, floor_rate=50.0)
    with kit.scratch() as root, kit.time_limit(limit + 60, f"{files} files"):
        bare = bare_rate(files, workers)
        return daemon_rate(root, files, workers, limit), bare


def main(argv: Sequence[str] | None = None) -> int:
    parser = kit.arguments("bench.commands", __doc__, (5000,))
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args(argv)
    for files in args.files:
        for workers in args.workers:
            figure = f"commands {files} files, command true, {workers} workers"
            try:
                rate, bare = measure(files, workers)
            except kit.BenchError as exc:
                kit.report_failure(figure, exc)
                continue
            ratio = rate / bare
            kit.report(figure, f"{rate:.0f} files/s = {ratio:.2f}x bare",
                       f">= {TARGET_RATIO}x bare", ratio >= TARGET_RATIO,
                       f"bare asyncio spawn loop: {bare:.0f} spawns/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
