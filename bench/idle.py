"""Idle memory: `traxd run` watching three empty inboxes, no model loaded.

    python -m bench.idle [SECONDS]        (default: 30 s)

Three inboxes with the default pipeline (download, preprocess, transcribe: steps are built
when first used, so no model is loaded), /metrics on a loopback port. The daemon's
resident memory is sampled every 0.1 s for SECONDS seconds after "ready". Target: peak
<= 50 MB.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from bench import kit

TARGET = 50.0  # MB
INBOXES = ("talks", "films", "notes")
PIPELINE = ("download", "preprocess", "transcribe")


def measure(seconds: float) -> float:
    """Peak RSS in MB over `seconds` of idling."""
    with kit.scratch() as root:
        boxes = [kit.Box(root, name) for name in INBOXES]
        config = kit.config(root, [box.spec(PIPELINE) for box in boxes],
                            metrics_address=f"127.0.0.1:{kit.free_port()}")
        daemon = kit.DaemonProcess.traxd(config)
        with kit.running(daemon), kit.PeakRss(daemon.pid) as rss:
            time.sleep(seconds)
        return rss.peak_mb


def main(argv: Sequence[str] | None = None) -> int:
    parser = kit.command_line("bench.idle", __doc__)
    parser.add_argument("seconds", type=float, nargs="?", default=30.0,
                        help="how long to sample (default: 30)")
    args = parser.parse_args(argv)
    figure = f"idle {len(INBOXES)} inboxes, no model loaded, {args.seconds:g} s"
    try:
        with kit.time_limit(args.seconds + 120, "idle daemon"):
            peak = measure(args.seconds)
    except kit.BenchError as exc:
        kit.report_failure(figure, exc)
        return 0
    kit.report(figure, f"peak RSS {peak:.0f} MB", f"<= {TARGET:.0f} MB", peak <= TARGET)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
