"""Child processes: output read in chunks, and nothing left running when a command exits."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import psutil

from traxd.procs import PUMP_CHUNK, ProcessLimits, run_process

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
