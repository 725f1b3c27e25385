"""Run every benchmark in turn."""

from __future__ import annotations

import runpy
import sys

BENCHMARKS = ("bench.daemon", "bench.transcribe")


def main() -> int:
    for name in sys.argv[1:] or BENCHMARKS:
        print(f"== {name}", flush=True)
        runpy.run_module(name, run_name="__main__")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
