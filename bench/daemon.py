"""Daemon overhead: files per second through a real daemon with a trivial step, and its RSS.

    python -m bench.daemon [FILES] [WORKERS]

Drops FILES small files into a fresh inbox of a real `traxd run` process whose pipeline
is one `command` step (`cp`), and reports the wall time from the first drop to the last
file in done/, files per second, and the daemon's peak resident memory.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.helpers import base_daemon, running_daemon, wait_until, write_config


def run(files: int, workers: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="traxd-bench-"))
    try:
        inbox = root / "box" / "inbox"
        inbox.mkdir(parents=True)
        cp = shutil.which("cp") or "cp"
        config = write_config(root / "traxd.toml", base_daemon(
            root, workers=workers, settle_seconds=0.2, batch_interval="0.5s",
            reconcile_interval="60s"),
            [{"name": "bench", "path": str(inbox),
              "pipeline": [{"command": [cp, "{input}", "{output_dir}/{stem}.txt"]}]}])
        with running_daemon(config, root / "log") as daemon:
            assert daemon.proc is not None
            proc = psutil.Process(daemon.proc.pid)
            peak = proc.memory_info().rss
            started = time.monotonic()
            for n in range(files):
                (inbox / f"f{n:05d}.mp3").write_bytes(b"x" * 1024)
            done = root / "box" / "done"

            def finished() -> bool:
                nonlocal peak
                peak = max(peak, proc.memory_info().rss)
                return sum(1 for _ in done.iterdir()) == files if done.exists() else False

            wait_until(finished, timeout=600, interval=0.1, message="all files done")
            wall = time.monotonic() - started
        return {"files": files, "workers": workers, "wall_s": wall, "files_per_s": files / wall,
                "peak_rss_mb": peak / 2**20}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    files = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    result = run(files, workers)
    cpu = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"daemon: {result['files']:.0f} files, {result['workers']:.0f} workers, {cpu} CPUs: "
          f"{result['wall_s']:.1f} s wall, {result['files_per_s']:.1f} files/s "
          f"(settle 0.2 s and batch tick 0.5 s included), "
          f"daemon peak RSS {result['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
