from __future__ import annotations

import signal
from pathlib import Path

import pytest

from traxd.config import DaemonSettings, InboxSettings, Settings


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C reaches the programs the tests start as it does from a terminal, also when
    the suite itself runs in the background (a non-interactive shell starts background
    jobs with SIGINT ignored, and the children inherit that: `traxd batch` would not
    stop on the test's Ctrl-C)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """One inbox under tmp_path, fast timers, no metrics server."""
    inbox = InboxSettings(name="main", path=tmp_path / "box" / "inbox", pipeline=("preprocess",))
    daemon = DaemonSettings(state_dir=tmp_path / "state", workers=2, settle_seconds=0.2,
                            batch_interval=0.2, metrics_address="", retry_backoff=0.1,
                            retry_backoff_max=0.5)
    return Settings(daemon=daemon, inboxes=(inbox,))
