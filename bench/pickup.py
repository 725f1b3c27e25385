"""Pickup latency: from a file's drop into the inbox to the start of its job.

    python -m bench.pickup [FILES] [--gap 0.2]        (default: 500 files)

`traxd run` (settle 0.2 s, batch tick 0.5 s, command = ["true"], 2 workers) gets FILES
files one at a time (the next is dropped once the previous is in done/), then FILES more
dropped every `gap` seconds without waiting. Drop = the wall time of the rename into the
inbox; start = the "timestamp" of the job's `job_started` log event (JSON logs).
Target: p95 <= settle_seconds + batch_interval + 0.1 s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from bench import kit

TARGET = kit.SETTLE_SECONDS + kit.BATCH_SECONDS + 0.1
WORKERS = 2
FILE_TIMEOUT = 30.0  # seconds one file may take to reach done/
SEQ_ALLOWANCE = 2.0  # seconds per file one at a time before the whole figure gives up

Dropper = Callable[[kit.Box, Sequence[str], float], dict[str, float]]


def one_at_a_time(box: kit.Box, names: Sequence[str], gap: float) -> dict[str, float]:
    """Drop each file once the previous one is in done/; name -> drop time."""
    dropped: dict[str, float] = {}
    for name in names:
        dropped[name] = box.drop(name)
        target = box.done / name
        kit.wait_for(target.exists, FILE_TIMEOUT, f"{name} in done/", 0.005)
    return dropped


def spaced(box: kit.Box, names: Sequence[str], gap: float) -> dict[str, float]:
    """Drop a file every `gap` seconds, not waiting for any; name -> drop time."""
    dropped: dict[str, float] = {}
    origin = time.monotonic()
    for index, name in enumerate(names):
        time.sleep(max(0.0, origin + index * gap - time.monotonic()))
        dropped[name] = box.drop(name)
    return dropped


MODES: dict[str, tuple[str, Dropper]] = {
    "seq": ("one at a time", one_at_a_time),
    "gap": ("{gap:g} s apart", spaced),
}


def latencies(daemon: kit.DaemonProcess, dropped: dict[str, float]) -> tuple[list[float], int]:
    """Drop-to-start seconds of the dropped files that started, and how many did not."""
    started = {str(event.get("file")): kit.event_time(event)
               for event in kit.log_events(daemon.log, "job_started")}
    found = [started[name] - at for name, at in dropped.items() if name in started]
    return found, len(dropped) - len(found)


def measure(files: int, gap: float) -> dict[str, tuple[list[float], int]]:
    """Mode -> (latencies, files with no job_started event)."""
    results: dict[str, tuple[list[float], int]] = {}
    with kit.scratch() as root:
        box = kit.Box(root)
        config = kit.config(root, [box.spec(kit.true_pipeline())], workers=WORKERS)
        with kit.running(kit.DaemonProcess.traxd(config)) as daemon:
            total = 0
            for mode, (_, drop) in MODES.items():
                names = kit.names_for(files, prefix=f"{mode}-")
                box.stage(names)
                dropped = drop(box, names, gap)
                total += len(dropped)
                box.wait_done(total, FILE_TIMEOUT + files * gap)
                results[mode] = latencies(daemon, dropped)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = kit.arguments("bench.pickup", __doc__, (500,))
    parser.add_argument("--gap", type=float, default=0.2, help="seconds between spaced drops")
    args = parser.parse_args(argv)
    for files in args.files:
        limit = 120 + files * (SEQ_ALLOWANCE + args.gap)
        try:
            with kit.time_limit(limit, f"{files} files, twice"):
                results = measure(files, args.gap)
        except kit.BenchError as exc:
            kit.report_failure(f"pickup {files} files", exc)
            continue
        for mode, (found, missing) in results.items():
            label = MODES[mode][0].format(gap=args.gap)
            report(f"pickup {files} files, {label}", found, missing)
    return 0


def report(figure: str, found: list[float], missing: int) -> None:
    if not found:
        kit.report(figure, "no job_started events", f"p95 <= {TARGET:.1f} s", False)
        return
    p95 = kit.percentile(found, 0.95)
    note = f", {missing} without job_started" if missing else ""
    kit.report(figure, f"p95 {p95:.3f} s (p50 {kit.percentile(found, 0.5):.3f}, "
               f"max {max(found):.3f}{note})", f"p95 <= {TARGET:.1f} s",
               p95 <= TARGET and not missing)


if __name__ == "__main__":
    raise SystemExit(main())
