"""Fixtures of the fault-injection suite and the tally printed at the end of the run."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _pytest.terminal import TerminalReporter

from tests.faults.kit import TALLY, Tally


@pytest.fixture(scope="session")
def tally() -> Tally:
    """The session's collector: fault tests add what they tried and found."""
    return TALLY


@pytest.fixture(autouse=True)
def _count_the_run() -> None:
    """Any fault test that runs makes the tally print at the end."""
    TALLY.ran = True


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A short temporary directory: the control socket path must stay under 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="traxd-f-", dir="/tmp") as name:
        yield Path(name)


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    if not TALLY.ran:
        return
    terminalreporter.write_sep("=", "traxd fault injection tally")
    for line in TALLY.lines():
        terminalreporter.write_line(line)
