"""The daemon under a large backlog: status latency, event-loop lag, memory, and SIGTERM.

    python -m bench.backlog [FILES] [--step noop|true]        (default: 100000 files)

The daemon (bench.noop_daemon, 16 workers, /metrics on a loopback port) gets FILES files
renamed into its inbox at once. From then until a tenth of them is in done/ (intake and
then steady work, with nine tenths still to do):
- `python -m traxd status --json` runs STATUS_SAMPLES times in a row, then every
  STATUS_PERIOD seconds (target: the slowest < 1 s); the bare limit is `python -m traxd --help`
  (interpreter and imports), timed once in the same run;
- the daemon's resident memory is sampled every 0.1 s, from ready to exit (target: peak
  <= 150 MB).
Then the histogram traxd_event_loop_lag_seconds is read from /metrics (target: p99 over the
run so far, as Prometheus's histogram_quantile, < 100 ms), and the daemon gets SIGTERM
(target: exit within shutdown_grace + 5 s).
"""

from __future__ import annotations

import time
import urllib.error
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import kit

WORKERS = 16
STATUS_SAMPLES = 5  # at least
STATUS_PERIOD = 2.0  # seconds between `traxd status` calls (each costs a Python start-up)
PROGRESS = 0.1  # the share of the files in done/ at which the daemon gets SIGTERM
STATUS_TARGET = 1.0  # seconds
LAG_TARGET = 0.1  # seconds
LAG_METRIC = "traxd_event_loop_lag_seconds"
RSS_TARGET = 150.0  # MB
EXIT_TARGET = kit.SHUTDOWN_GRACE + 5.0


@dataclass
class Findings:
    help_seconds: float  # `python -m traxd --help`: the bare limit of a CLI call
    status_seconds: list[float]  # those that answered
    status_errors: list[str]  # those that failed, why
    lag_p99: float | str  # seconds, or why there is no figure
    left: int  # files not yet in done/ when SIGTERM was sent
    exit_seconds: float | None  # None: did not exit in time (it was then killed)
    peak_rss_mb: float


def status_until(config: Path, box: kit.Box, files: int) -> tuple[list[float], list[str]]:
    """`traxd status --json` STATUS_SAMPLES times in a row, then every STATUS_PERIOD s until
    PROGRESS of the files are done (or the time for that is up); the seconds of the calls
    that answered, the errors of those that did not."""
    seconds: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + kit.throughput_limit(files)
    while True:
        took, result = kit.traxd_cli("status", "--json", "--config", str(config))
        if result.returncode == 0:
            seconds.append(took)
        else:
            errors.append((result.stderr.strip().splitlines() or ["no message"])[-1])
        if len(seconds) + len(errors) < STATUS_SAMPLES:
            continue
        if box.done_count() >= files * PROGRESS or time.monotonic() > deadline:
            return seconds, errors
        time.sleep(STATUS_PERIOD)


def lag_p99(port: int) -> float | str:
    """p99 of the event-loop lag histogram, or why there is none."""
    try:
        text = kit.scrape(f"http://127.0.0.1:{port}/metrics")
    except (OSError, urllib.error.URLError) as exc:
        return f"/metrics did not answer: {exc}"
    p99 = kit.histogram_quantile(0.99, text, LAG_METRIC)
    return "metric missing" if p99 is None else p99


def sigterm(daemon: kit.DaemonProcess) -> float | None:
    try:
        return daemon.terminate(EXIT_TARGET + 30)
    except kit.TimedOut:
        return None


def measure(files: int, step: str) -> Findings:
    with kit.scratch() as root:
        box, names = kit.Box(root), kit.names_for(files)
        box.stage(names)
        port = kit.free_port()
        config = kit.config(root, [box.spec(kit.true_pipeline())], workers=WORKERS,
                            metrics_address=f"127.0.0.1:{port}")
        daemon = kit.daemon_for(step, config)
        with kit.running(daemon), kit.PeakRss(daemon.pid) as rss:
            box.drop_all(names)
            help_seconds, _ = kit.traxd_cli("--help")
            seconds, errors = status_until(config, box, files)
            lag = lag_p99(port)
            left = files - box.done_count()
            exit_seconds = sigterm(daemon)
        return Findings(help_seconds, seconds, errors, lag, left, exit_seconds, rss.peak_mb)


def report(figure: str, found: Findings) -> None:
    report_status(figure, found)
    if isinstance(found.lag_p99, str):
        kit.report(f"{figure}, event-loop lag", f"n/a ({found.lag_p99})",
                   f"p99 < {LAG_TARGET * 1000:.0f} ms", None)
    else:
        kit.report(f"{figure}, event-loop lag", f"p99 {found.lag_p99 * 1000:.0f} ms",
                   f"p99 < {LAG_TARGET * 1000:.0f} ms", found.lag_p99 < LAG_TARGET)
    kit.report(f"{figure}, daemon RSS", f"peak {found.peak_rss_mb:.0f} MB",
               f"<= {RSS_TARGET:.0f} MB", found.peak_rss_mb <= RSS_TARGET)
    report_exit(figure, found)


def report_status(figure: str, found: Findings) -> None:
    bare = f"bare python -m traxd --help: {found.help_seconds:.2f} s"
    asked = len(found.status_seconds) + len(found.status_errors)
    if found.status_errors:
        value = (f"{len(found.status_errors)} of {asked} failed, "
                 f"the first with: {found.status_errors[0]}")
        kit.report(f"{figure}, traxd status --json", value, f"< {STATUS_TARGET:g} s", False, bare)
        return
    slowest = max(found.status_seconds)
    kit.report(f"{figure}, traxd status --json", f"slowest of {asked}: {slowest:.2f} s",
               f"< {STATUS_TARGET:g} s", slowest < STATUS_TARGET, bare)


def report_exit(figure: str, found: Findings) -> None:
    target = f"<= {EXIT_TARGET:g} s = shutdown_grace {kit.SHUTDOWN_GRACE:g} s + 5 s"
    if found.exit_seconds is None:
        kit.report(f"{figure}, SIGTERM", f"still running after {EXIT_TARGET + 30:g} s",
                   target, False)
        return
    value = f"exit in {found.exit_seconds:.2f} s with {found.left} files not yet done"
    ok = found.exit_seconds <= EXIT_TARGET if found.left else None  # None: nothing in progress
    kit.report(f"{figure}, SIGTERM", value, target, ok)


def main(argv: Sequence[str] | None = None) -> int:
    parser = kit.arguments("bench.backlog", __doc__, (100_000,))
    parser.add_argument("--step", choices=sorted(kit.STEPS), default="noop")
    args = parser.parse_args(argv)
    for files in args.files:
        figure = f"backlog {files} files, {kit.STEPS[args.step]}, {WORKERS} workers"
        limit = kit.throughput_limit(files) + STATUS_SAMPLES * 30 + 240
        try:
            with kit.time_limit(limit, f"{files} files"):
                found = measure(files, args.step)
        except kit.BenchError as exc:
            kit.report_failure(figure, exc)
            continue
        report(figure, found)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
