"""Start-up with a large journal: from process start to the "ready" log event.

    python -m bench.startup [FILES]        (default: 100000 files)

First a `traxd run` whose only inbox has a schedule window that never opens
("0 0 30 2 *", 30 February) queues FILES dropped files without running any, and is
stopped with SIGTERM once `traxd status` counts them all queued. Then a new daemon starts
on the same state; the figure is the time from its process start to the "timestamp" of its
"ready" log event. Target: <= 5 s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench import kit
from traxd.errors import ControlUnavailable

TARGET = 5.0  # seconds
NEVER = "0 0 30 2 *"
READY_TIMEOUT = 60.0


def queued(config: Path) -> int:
    """Files queued, as `traxd status` counts them; 0 while the daemon is too busy to say."""
    try:
        status = kit.status(config, timeout=10.0)
    except ControlUnavailable:
        return 0
    return sum(int(inbox["queued"]) for inbox in status["inboxes"])


def fill_journal(root: Path, files: int) -> Path:
    """Queue `files` files in a journal with a closed inbox; the config path."""
    box = kit.Box(root)
    names = kit.names_for(files)
    box.stage(names)
    config = kit.config(root, [box.spec(kit.true_pipeline(), schedule=NEVER)])
    daemon = kit.DaemonProcess.traxd(config)
    with kit.running(daemon):
        box.drop_all(names)
        kit.wait_for(lambda: queued(config) >= files, kit.throughput_limit(files),
                     f"{files} files queued", 1.0)
        daemon.terminate(kit.SHUTDOWN_GRACE + 60)
    return config


def measure(files: int) -> float:
    """Seconds from process start to ready, with `files` queued in the journal."""
    with kit.scratch() as root:
        config = fill_journal(root, files)
        daemon = kit.DaemonProcess.traxd(config)
        try:
            return daemon.start(READY_TIMEOUT)
        finally:
            daemon.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = kit.arguments("bench.startup", __doc__, (100_000,)).parse_args(argv)
    for files in args.files:
        figure = f"startup with {files} files in the journal"
        try:
            with kit.time_limit(kit.throughput_limit(files) + 2 * READY_TIMEOUT + 120,
                                f"{files} files"):
                seconds = measure(files)
        except kit.BenchError as exc:
            kit.report_failure(figure, exc)
            continue
        kit.report(figure, f"ready in {seconds:.2f} s", f"<= {TARGET:g} s", seconds <= TARGET)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
