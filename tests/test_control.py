"""Steering the real daemon through its socket: status, pause, resume, drain, retry."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    base_daemon,
    copy_step,
    files_under,
    running_daemon,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration


def traxd(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "traxd", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


def status(config: Path) -> dict[str, Any]:
    result = traxd(config, "status", "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def make(tmp_path: Path, delay: float) -> tuple[Path, Path]:
    root = tmp_path / "box"
    (root / "inbox").mkdir(parents=True)
    config = write_config(tmp_path / "traxd.toml", base_daemon(tmp_path, workers=1), [{
        "name": "main", "path": str(root / "inbox"),
        "pipeline": [{"command": copy_step(tmp_path / "ledger", delay)}]}])
    return root, config


def test_status_shows_a_running_job_and_the_queue(tmp_path: Path) -> None:
    root, config = make(tmp_path, delay=1.5)
    with running_daemon(config, tmp_path / "log"):
        for name in ("a.mp3", "b.mp3", "c.mp3"):
            (root / "inbox" / name).write_bytes(name.encode())
        inbox = wait_until(lambda: (s := status(config)["inboxes"][0])["running"] and s, 30,
                           message="a running job in status")
        assert inbox["name"] == "main"
        assert inbox["running"][0]["step"] == "command"
        assert inbox["running"][0]["file"] in ("a.mp3", "b.mp3", "c.mp3")
        assert inbox["queued"] + len(inbox["running"]) + inbox["done"] == 3
        text = traxd(config, "status")
        assert text.returncode == 0
        assert "main" in text.stdout


def test_pause_stops_new_work_and_resume_restarts_it(tmp_path: Path) -> None:
    root, config = make(tmp_path, delay=0.0)
    with running_daemon(config, tmp_path / "log"):
        assert traxd(config, "pause").returncode == 0
        (root / "inbox" / "held.mp3").write_bytes(b"x")
        wait_until(lambda: status(config)["inboxes"][0]["queued"] == 1, 30, message="queued")
        assert status(config)["inboxes"][0]["paused"] is True
        assert files_under(root / "done") == []
        assert traxd(config, "resume").returncode == 0
        wait_until(lambda: files_under(root / "done") == ["held.mp3"], 30, message="resumed")
        bad = traxd(config, "pause", "nosuchinbox")
        assert bad.returncode == 1
        assert "no inbox named 'nosuchinbox'" in bad.stderr


def test_retry_puts_failed_files_back(tmp_path: Path) -> None:
    root, config = make(tmp_path, delay=0.0)
    with running_daemon(config, tmp_path / "log"):
        (root / "inbox" / "x.mp3").write_bytes(b"FAIL")
        wait_until(lambda: files_under(root / "failed") == ["x.mp3", "x.mp3.error.json"], 30,
                   message="failed")
        (root / "failed" / "x.mp3").write_bytes(b"fixed")
        result = traxd(config, "retry", "x.mp3")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["retried"] == ["x.mp3"]
        wait_until(lambda: files_under(root / "done") == ["x.mp3"], 30, message="retried done")
    assert files_under(root / "failed") == []
    assert (root / "outputs" / "x.txt").read_bytes() == b"fixed"


def test_status_without_a_daemon_says_so(tmp_path: Path) -> None:
    _, config = make(tmp_path, delay=0.0)
    result = traxd(config, "status")
    assert result.returncode == 1
    assert "traxd is not running" in result.stderr


def test_files_wait_outside_the_schedule_window(tmp_path: Path) -> None:
    # Given an inbox whose window is a whole hour two hours from now
    root = tmp_path / "box"
    (root / "inbox").mkdir(parents=True)
    hour = (datetime.now().hour + 2) % 24
    config = write_config(tmp_path / "traxd.toml", base_daemon(tmp_path), [{
        "name": "night", "path": str(root / "inbox"), "schedule": f"0 {hour} * * *",
        "pipeline": [{"command": copy_step(tmp_path / "ledger")}]}])
    with running_daemon(config, tmp_path / "log"):
        # When a file arrives
        (root / "inbox" / "later.mp3").write_bytes(b"x")
        inbox = wait_until(lambda: (s := status(config)["inboxes"][0])["queued"] == 1 and s, 30,
                           message="queued")
        # Then it waits (across many batch ticks), and status names the next window
        for _ in range(5):
            again = status(config)["inboxes"][0]
            assert (again["queued"], again["running"], again["done"]) == (1, [], 0)
        assert datetime.fromisoformat(inbox["next_window"]).hour == hour
    assert files_under(root / "inbox") == ["later.mp3"]
