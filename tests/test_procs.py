"""Child processes: output read in chunks, and nothing left running when a command exits."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import psutil

from traxd.procs import PUMP_CHUNK, ProcessLimits, _Watch, _watch, run_process

PROGRESS = (
    "import sys\n"
    "for n in range(20000):\n"
    "    sys.stdout.write(f'frame={n:08d} fps=25\\r')\n"
    "    sys.stderr.write(f'size={n:08d}kB time=00:00:01\\r')\n"
    "sys.stdout.write('done\\n')\n"
)


async def test_progress_written_with_carriage_returns_only_is_read_to_the_end() -> None:
    # Given a program that writes ~600 KB of `\r` progress on both streams and no newline
    lines: list[str] = []
    # When it runs
    result = await run_process([sys.executable, "-c", PROGRESS], on_stdout_line=lines.append,
                               limits=ProcessLimits(timeout=60))
    # Then it succeeds, every byte reached the handler, and the stderr tail is its last words
    assert result.returncode == 0
    assert "".join(lines).replace("\r", "").endswith("frame=00019999 fps=25done")
    assert all(len(line.encode()) <= PUMP_CHUNK for line in lines)
    assert result.stderr_tail.endswith("size=00019999kB time=00:00:01")


async def test_whole_lines_reach_the_handler_whatever_the_chunks() -> None:
    script = "import sys\nfor n in range(3000):\n    print(f'line {n}', flush=n % 7 == 0)\n"
    lines: list[str] = []
    await run_process([sys.executable, "-c", script], on_stdout_line=lines.append)
    assert lines == [f"line {n}" for n in range(3000)]


async def test_a_command_that_leaves_a_child_behind_ends_when_it_exits(tmp_path: Path) -> None:
    # Given a command that starts a long sleep holding its pipes, then exits
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys\n"
              "child = subprocess.Popen(['sleep', '300'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
              "sys.exit(0)\n")
    # When it runs
    result = await asyncio.wait_for(
        run_process([sys.executable, "-c", script], limits=ProcessLimits(timeout=120)), 30)
    # Then the step is over at once, and the child it left is gone too
    assert result.returncode == 0
    child = int(pid_file.read_text())
    async with asyncio.timeout(10):  # SIGKILL is delivered asynchronously
        while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
            await asyncio.sleep(0.01)


async def test_time_the_daemon_did_not_run_is_not_counted_as_a_stall() -> None:
    # Given a quiet child (1 s asleep) watched with a 5 s stall limit, and a clock that
    # jumps 60 s between two looks, as when the daemon itself was stopped (SIGSTOP)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c",
                                                "import time; time.sleep(1)")
    jumps, ahead = iter([0.0, 0.0, 60.0]), [0.0]

    def stopped_clock() -> float:
        ahead[0] += next(jumps, 0.0)
        return time.monotonic() + ahead[0]

    watch = _Watch(stopped_clock())
    limits = ProcessLimits(timeout=None, stall_seconds=5.0)
    # When it is watched until it exits
    watcher = asyncio.create_task(_watch(proc, limits, watch, clock=stopped_clock))
    await proc.wait()
    await asyncio.wait_for(watcher, 10)
    # Then it was not judged stalled
    assert watch.verdict is None
