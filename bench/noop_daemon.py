"""`traxd run` with every inbox's pipeline replaced by one in-process step that does nothing.

    python -m bench.noop_daemon CONFIG

What is left to measure is the daemon itself: watching, settling, hashing, the journal,
batching, claiming, moving to done/ and logging. Started as a child process by the
benchmarks (bench.spine, bench.backlog); it logs as `traxd run` does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path

from traxd.config import Settings, load_settings
from traxd.daemon import Daemon
from traxd.logs import configure
from traxd.pipeline.base import StepContext, StepResult

STEP = "noop"


class NoopStep:
    name = STEP
    needs_workdir = False  # it writes nothing: no folder is made for it

    async def run(self, ctx: StepContext) -> StepResult:
        return StepResult()

    async def aclose(self) -> None:
        return None


def noop_settings(config: Path) -> Settings:
    settings = load_settings(config)
    inboxes = tuple(dataclasses.replace(inbox, pipeline=(STEP,)) for inbox in settings.inboxes)
    return dataclasses.replace(settings, inboxes=inboxes)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.noop_daemon CONFIG", file=sys.stderr)
        return 2
    settings = noop_settings(Path(argv[0]))
    configure(settings.daemon.log_format, settings.daemon.log_level)  # as `traxd run` does
    return asyncio.run(Daemon(settings, steps={STEP: NoopStep()}).serve())


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
