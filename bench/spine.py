"""Spine throughput: files through an in-process no-op step, from the drop to all in done/.

    python -m bench.spine [FILES ...] [--step noop|true]        (default: 10000 100000)

For each size: stage FILES files of 1 KiB, start the daemon (bench.noop_daemon, 16 workers,
settle 0.2 s, batch tick 0.5 s), rename them all into the inbox and time from the first drop
until all are in done/. The bare limit, measured in the same run for the same files, is a
plain loop of the same renames: staging -> inbox -> processing -> done. From the second size
on, the time per file is compared with the first size's (target: within 1.3x).
`--step true` runs `traxd run` with command = ["true"] instead of the no-op step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from bench import kit

WORKERS = 16
TARGET = 5000.0  # files/s
PER_FILE_RATIO = 1.3  # time per file of a larger run over that of the first


def bare_rate(root: Path, names: Sequence[str]) -> float:
    """Files/s of a plain loop renaming each file staging -> inbox -> processing -> done."""
    box = kit.Box(root, "bare")
    box.stage(names)
    processing, done = box.root / box.name / "processing", box.done
    processing.mkdir()
    done.mkdir()
    started = time.monotonic()
    for name in names:
        os.rename(box.staging / name, box.inbox / name)
        os.rename(box.inbox / name, processing / name)
        os.rename(processing / name, done / name)
    return len(names) / (time.monotonic() - started)


def daemon_rate(root: Path, names: Sequence[str], step: str, timeout: float) -> float:
    """Files/s through the daemon, from the first drop until all are in done/."""
    box = kit.Box(root)
    box.stage(names)
    config = kit.config(root, [box.spec(kit.true_pipeline())], workers=WORKERS)
    with kit.running(kit.daemon_for(step, config)):
        started = time.monotonic()
        box.drop_all(names)
        finished = box.wait_done(len(names), timeout)
    return len(names) / (finished - started)


def measure(files: int, step: str) -> tuple[float, float]:
    """(daemon files/s, bare loop files/s) for `files` files."""
    names = kit.names_for(files)
    limit = kit.throughput_limit(files)
    with kit.scratch() as root, kit.time_limit(limit + 60, f"{files} files"):
        bare = bare_rate(root, names)
        return daemon_rate(root, names, step, limit), bare


def main(argv: Sequence[str] | None = None) -> int:
    parser = kit.arguments("bench.spine", __doc__, (10_000, 100_000))
    parser.add_argument("--step", choices=sorted(kit.STEPS), default="noop")
    args = parser.parse_args(argv)
    first: tuple[int, float] | None = None  # (files, files/s) of the first size measured
    for files in args.files:
        figure = f"spine {files} files, {kit.STEPS[args.step]}, {WORKERS} workers"
        try:
            rate, bare = measure(files, args.step)
        except kit.BenchError as exc:
            kit.report_failure(figure, exc)
            continue
        kit.report(figure, f"{rate:.0f} files/s", f">= {TARGET:.0f}", rate >= TARGET,
                   f"bare rename loop: {bare:.0f} files/s")
        if first is None:
            first = (files, rate)
            continue
        ratio = first[1] / rate  # (1 / rate) / (1 / first rate): time per file
        kit.report(f"spine {files} files vs {first[0]}", f"time per file {ratio:.2f}x",
                   f"<= {PER_FILE_RATIO}x", ratio <= PER_FILE_RATIO)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
