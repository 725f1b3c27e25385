"""Signals: SIGTERM once (finish within shutdown_grace), twice (stop at once), SIGHUP (reload
with a new inbox, work in flight kept); after each, every file is processed exactly once."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults.kit import Box, FaultDaemon, Tally, processes_mentioning
from tests.helpers import base_daemon, copy_step, files_under, wait_until, write_config

pytestmark = pytest.mark.faults


def inbox(name: str, box: Box, ledger: Path, delay: float) -> dict[str, Any]:
    return {"name": name, "path": str(box.inbox), "pipeline": [{"command": copy_step(ledger,
                                                                                     delay)}]}


def started(daemon: FaultDaemon, name: str) -> bool:
    return any(e["event"] == "step_started" and e.get("file") == name for e in daemon.events())


def runs(ledger: Path) -> list[str]:
    return sorted(ledger.read_text().split()) if ledger.exists() else []


def test_first_sigterm_lets_the_running_step_finish_then_exits_0(short_root: Path,
                                                                  tally: Tally) -> None:
    # Given one worker busy with a 1.5 s step and another file waiting for it (the grace is
    # long enough for the step on a busy machine)
    box, ledger = Box(short_root / "box").make(), short_root / "ledger"
    config = write_config(short_root / "traxd.toml", base_daemon(
        short_root, workers=1, shutdown_grace="30s", settle_seconds=0.1),
        [inbox("main", box, ledger, 1.5)])
    daemon = FaultDaemon(config, short_root / "log").start()
    try:
        (box.inbox / "running.mp3").write_bytes(b"running")
        wait_until(lambda: started(daemon, "running.mp3"), 30, message="step started")
        (box.inbox / "waiting.mp3").write_bytes(b"waiting")
        wait_until(lambda: any(e["event"] == "file_queued" and e["file"] == "waiting.mp3"
                               for e in daemon.events()), 30, message="second file queued")
        # When SIGTERM arrives once
        sent = time.monotonic()
        daemon.signal(signal.SIGTERM)
        code = daemon.proc.wait(60) if daemon.proc else None
        took = time.monotonic() - sent
    finally:
        daemon.stop()
    tally.files_dropped += 2
    # Then the running step finished and its file is done, within the grace, exit status 0,
    # and the waiting file was not started
    assert code == 0
    assert took < 30, f"took {took:.1f} s, longer than shutdown_grace"
    assert files_under(box.done) == ["running.mp3"]
    assert runs(ledger) == ["running.mp3"]
    assert files_under(box.inbox) + files_under(box.processing) == ["waiting.mp3"]
    # And a restart completes the rest, each file exactly once
    finish_and_check(config, short_root / "log2", box, ledger, ["running.mp3", "waiting.mp3"])


def test_second_sigterm_cancels_running_steps_at_once(short_root: Path, tally: Tally) -> None:
    # Given two workers each in a 120 s step and a long shutdown_grace
    box, ledger = Box(short_root / "box").make(), short_root / "ledger"
    slow = [inbox("main", box, ledger, 120.0)]
    config = write_config(short_root / "traxd.toml", base_daemon(
        short_root, workers=2, shutdown_grace="300s", settle_seconds=0.1), slow)
    daemon = FaultDaemon(config, short_root / "log").start()
    names = ["one.mp3", "two.mp3"]
    try:
        for name in names:
            (box.inbox / name).write_bytes(name.encode())
        wait_until(lambda: all(started(daemon, n) for n in names), 30, message="both running")
        # When SIGTERM arrives, and again while the daemon waits for the steps
        daemon.signal(signal.SIGTERM)
        wait_until(lambda: any(e["event"] == "stopping" for e in daemon.events()), 10,
                   message="stopping")
        sent = time.monotonic()
        daemon.signal(signal.SIGTERM)
        code = daemon.proc.wait(60) if daemon.proc else None
        took = time.monotonic() - sent
    finally:
        daemon.stop()
    tally.files_dropped += len(names)
    # Then it stops without waiting for the steps (the steps' processes are stopped too),
    # exit status 0, and the files stay claimed in processing/, to be resumed
    assert code == 0
    assert took < 60, f"took {took:.1f} s after the second SIGTERM"
    assert processes_mentioning(str(ledger)) == []
    assert files_under(box.processing) == names
    assert runs(ledger) == []
    # And a restart (with a quick step now) completes both, each exactly once
    write_config(config, base_daemon(short_root, settle_seconds=0.1),
                 [inbox("main", box, ledger, 0.0)])
    finish_and_check(config, short_root / "log2", box, ledger, names)


def test_sighup_adds_an_inbox_without_dropping_work_in_flight(short_root: Path,
                                                              tally: Tally) -> None:
    # Given a daemon with one inbox, busy with a 2 s step
    first, second = Box(short_root / "a").make(), Box(short_root / "b").make()
    ledger = short_root / "ledger"
    daemon_table = base_daemon(short_root, settle_seconds=0.1)
    config = write_config(short_root / "traxd.toml", daemon_table,
                          [inbox("first", first, ledger, 2.0)])
    daemon = FaultDaemon(config, short_root / "log").start()
    try:
        (first.inbox / "inflight.mp3").write_bytes(b"in flight")
        wait_until(lambda: started(daemon, "inflight.mp3"), 30, message="step started")
        # When the config gains a second inbox and SIGHUP is sent
        write_config(config, daemon_table, [inbox("first", first, ledger, 2.0),
                                            inbox("second", second, ledger, 0.0)])
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: any(e["event"] == "reloaded" for e in daemon.events()), 30,
                   message="reloaded")
        (second.inbox / "new.mp3").write_bytes(b"new inbox")
        # Then a file dropped into the new inbox is processed without a restart
        wait_until(lambda: files_under(second.done) == ["new.mp3"], 30, message="new.mp3 done")
        # And the job in flight in the first inbox finishes, its step run only once
        wait_until(lambda: files_under(first.done) == ["inflight.mp3"], 30,
                   message="inflight.mp3 done")
        assert daemon.alive()
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
    tally.files_dropped += 2
    assert runs(ledger) == ["inflight.mp3", "new.mp3"]
    assert [e["file"] for e in daemon.events() if e["event"] == "step_started"] == [
        "inflight.mp3", "new.mp3"]
    assert files_under(first.outputs) == ["inflight.txt"]
    assert files_under(second.outputs) == ["new.txt"]


def test_sighup_removing_an_inbox_lets_its_running_job_finish(short_root: Path,
                                                              tally: Tally) -> None:
    # Given two inboxes, the first with two steps and busy with its 2 s first one
    first, second = Box(short_root / "a").make(), Box(short_root / "b").make()
    ledger = short_root / "ledger"
    daemon_table = base_daemon(short_root, settle_seconds=0.1)
    two_steps = inbox("first", first, ledger, 2.0)
    two_steps["pipeline"] = [*two_steps["pipeline"], {"command": ["true"]}]
    config = write_config(short_root / "traxd.toml", daemon_table,
                          [two_steps, inbox("second", second, ledger, 0.0)])
    daemon = FaultDaemon(config, short_root / "log").start()
    try:
        (first.inbox / "inflight.mp3").write_bytes(b"in flight")
        wait_until(lambda: started(daemon, "inflight.mp3"), 30, message="step started")
        # When the first inbox is removed from the config and SIGHUP is sent
        write_config(config, daemon_table, [inbox("second", second, ledger, 0.0)])
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: any(e["event"] == "reloaded" for e in daemon.events()), 30,
                   message="reloaded")
        # Then its running job still finishes whole: original in done/, its output kept
        wait_until(lambda: files_under(first.done) == ["inflight.mp3"], 30,
                   message="inflight.mp3 done")
        assert daemon.alive()
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
    tally.files_dropped += 1
    assert files_under(first.outputs) == ["inflight.txt"]
    assert files_under(first.processing) == files_under(first.failed) == []
    assert runs(ledger) == ["inflight.mp3"]


def finish_and_check(config: Path, log: Path, box: Box, ledger: Path, names: list[str]) -> None:
    daemon = FaultDaemon(config, log).start()
    try:
        wait_until(lambda: files_under(box.done) == names, 30, message="all done after restart")
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
    assert runs(ledger) == names
    assert files_under(box.outputs) == [n.replace(".mp3", ".txt") for n in names]
    assert files_under(box.inbox) + files_under(box.processing) + files_under(box.failed) == []
