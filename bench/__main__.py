"""Run the benchmarks in turn, each in a process of its own, and print their figures.

    python -m bench [--quick] [NAME ...]

NAME is a module under bench/ (idle, spine, commands, pickup, startup, backlog, transcribe,
long, cluster);
the default is all of them at their full sizes; --quick runs small sizes (a smoke test of
the harness; its figures are not the ones the targets are about). Every benchmark is bounded
in time by its own limits; a benchmark that outlives its backstop below is killed with its
process group and reported as MISSED. Targets missed are reported, never an error: the
exit status is 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from bench import kit

CLEAN_UP_SECONDS = 60.0


@dataclass(frozen=True)
class Benchmark:
    name: str
    backstop: float  # seconds: the benchmark's own limits end it well before this
    quick: tuple[str, ...]  # arguments for a quick run


BENCHMARKS = (
    Benchmark("idle", 300, ("3",)),
    Benchmark("spine", 1800, ("200", "500")),
    Benchmark("commands", 1200, ("200",)),
    Benchmark("pickup", 1500, ("20",)),
    Benchmark("startup", 1200, ("500",)),
    Benchmark("backlog", 1200, ("500",)),
    Benchmark("transcribe", 1800, ("--files", "2", "--sentences", "1")),
    Benchmark("long", 1800, ("--minutes", "1.5", "--files", "4")),
    Benchmark("cluster", 1200, ("50",)),
)


def run(bench: Benchmark, quick: bool) -> None:
    argv = [sys.executable, "-m", f"bench.{bench.name}", *(bench.quick if quick else ())]
    print(f"== {' '.join(argv[1:])}", flush=True)
    proc = subprocess.Popen(argv, cwd=kit.REPO, start_new_session=True)
    try:
        proc.wait(bench.backstop)
    except subprocess.TimeoutExpired:
        stop(proc)
        print(f"bench.{bench.name}: MISSED: timed out after {bench.backstop:.0f} s", flush=True)
        return
    except KeyboardInterrupt:  # its own session does not get the terminal's Ctrl-C
        stop(proc)
        raise
    if proc.returncode != 0:
        print(f"bench.{bench.name}: MISSED: exit status {proc.returncode}", flush=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C for the benchmark (it stops its daemons and removes its scratch folder), then
    SIGKILL for its whole process group if that did not end it."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(CLEAN_UP_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # still the leader: the group is its own
        proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = kit.command_line("bench", __doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test")
    parser.add_argument("names", nargs="*", metavar="NAME", help="default: all")
    args = parser.parse_args(argv)
    known = [b.name for b in BENCHMARKS]
    if unknown := sorted(set(args.names) - set(known)):
        parser.error(f"no benchmark named {', '.join(unknown)}; there are {', '.join(known)}")
    print(f"machine: {kit.machine()}", flush=True)
    for bench in BENCHMARKS:
        if not args.names or bench.name in args.names:
            run(bench, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
