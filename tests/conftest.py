from __future__ import annotations

from pathlib import Path

import pytest

from traxd.config import DaemonSettings, InboxSettings, Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """One inbox under tmp_path, fast timers, no metrics server."""
    inbox = InboxSettings(name="main", path=tmp_path / "box" / "inbox", pipeline=("preprocess",))
    daemon = DaemonSettings(state_dir=tmp_path / "state", workers=2, settle_seconds=0.2,
                            batch_interval=0.2, metrics_address="", retry_backoff=0.1,
                            retry_backoff_max=0.5)
    return Settings(daemon=daemon, inboxes=(inbox,))
