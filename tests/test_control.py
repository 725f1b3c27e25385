"""Steering the real daemon through its socket: status, pause, resume, drain, retry."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.faults.kit import ffmpeg
from tests.helpers import (
    DaemonProcess,
    base_daemon,
    copy_step,
    files_under,
    running_daemon,
    wait_until,
    write_config,
)
from tests.media.openai_server import FakeOpenAI, Reply, Request, verbose_json

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
        assert inbox["eta_basis"] == "files"  # a command step measures no duration
        text = traxd(config, "status")
        assert text.returncode == 0
        assert "main" in text.stdout


def test_pause_stops_new_work_and_resume_restarts_it(tmp_path: Path) -> None:
    root, config = make(tmp_path, delay=0.0)
    with running_daemon(config, tmp_path / "log"):
        paused = traxd(config, "pause")
        assert paused.returncode == 0
        assert paused.stdout.startswith("Paused inbox main: no new jobs start"), paused.stdout
        (root / "inbox" / "held.mp3").write_bytes(b"x")
        wait_until(lambda: status(config)["inboxes"][0]["queued"] == 1, 30, message="queued")
        assert status(config)["inboxes"][0]["paused"] is True
        assert files_under(root / "done") == []
        resumed = traxd(config, "resume", "--json")
        assert resumed.returncode == 0
        assert json.loads(resumed.stdout) == {"resumed": ["main"], "backends": []}
        wait_until(lambda: files_under(root / "done") == ["held.mp3"], 30, message="resumed")
        drained = traxd(config, "drain", "main")
        assert drained.stdout.startswith("Draining inbox main: 0 running jobs finish")
        bad = traxd(config, "pause", "nosuchinbox")
        assert bad.returncode == 1
        assert "no inbox named 'nosuchinbox'" in bad.stderr


def test_retry_puts_failed_files_back(tmp_path: Path) -> None:
    root, config = make(tmp_path, delay=0.0)
    with running_daemon(config, tmp_path / "log") as daemon:
        (root / "inbox" / "x.mp3").write_bytes(b"FAIL")
        wait_until(lambda: files_under(root / "failed") == ["x.mp3", "x.mp3.error.json"], 30,
                   message="failed")
        wait_until(lambda: '"failed_file_placed"' in daemon.log_text(), 30, message="logged")
        assert daemon.log_text().count('"job_failed"') == 1  # once per failure, with why
        (root / "failed" / "x.mp3").write_bytes(b"fixed")
        result = traxd(config, "retry", "x.mp3")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "Put 1 failed file back into the inbox: x.mp3.\n"
        wait_until(lambda: files_under(root / "done") == ["x.mp3"], 30, message="retried done")
        # A name that matches nothing fails, naming it; --json says the same for scripts
        nothing = traxd(config, "retry", "nosuch.mp3", "--json")
        assert nothing.returncode == 1, nothing.stderr
        assert json.loads(nothing.stdout) == {"retried": [], "unmatched": ["nosuch.mp3"]}
        assert "no failed file named 'nosuch.mp3'" in nothing.stderr
        none = traxd(config, "retry")
        assert (none.returncode, none.stdout) == (0, "Nothing to retry: no file has failed.\n")
    assert files_under(root / "failed") == []
    assert (root / "outputs" / "x.txt").read_bytes() == b"fixed"


def test_status_without_a_daemon_says_so(tmp_path: Path) -> None:
    _, config = make(tmp_path, delay=0.0)
    result = traxd(config, "status")
    assert result.returncode == 1
    assert "traxd is not running" in result.stderr


def user_env(tmp_path: Path) -> dict[str, str]:
    """A user with no config of their own and a runtime folder of the test's."""
    env = {k: v for k, v in os.environ.items() if k != "TRAXD_CONFIG"}
    return {**env, "XDG_RUNTIME_DIR": str(tmp_path / "run"),
            "XDG_CONFIG_HOME": str(tmp_path / "xdg-config")}


def bare(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`traxd ARGS` without --config, as a user types it in another terminal."""
    return subprocess.run([sys.executable, "-m", "traxd", *args], capture_output=True,
                          text=True, timeout=60, check=False, env=env)


def test_commands_find_the_running_daemon_without_config(tmp_path: Path) -> None:
    # Given a daemon started from its config, as `make run` does
    env = user_env(tmp_path)
    _, config = make(tmp_path, delay=0.0)
    daemon = DaemonProcess(config, tmp_path / "log", env=env).start()
    try:
        # When status and pause are typed without --config
        status_ = bare(env, "status", "--json")
        paused = bare(env, "pause")
        # Then they reach it
        assert status_.returncode == 0, status_.stderr
        assert [i["name"] for i in json.loads(status_.stdout)["inboxes"]] == ["main"]
        assert paused.stdout.startswith("Paused inbox main"), paused.stdout + paused.stderr
        assert len(list((tmp_path / "run" / "traxd").glob("*.json"))) == 1
        # And after a clean stop its record is gone, and status says how to start one
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
    assert list((tmp_path / "run" / "traxd").glob("*.json")) == []
    gone = bare(env, "status")
    assert gone.returncode == 1
    assert "traxd is not running" in gone.stderr and "traxd run" in gone.stderr


def test_several_daemons_are_listed_and_one_is_picked_with_config(tmp_path: Path) -> None:
    env = user_env(tmp_path)
    _, first = make(tmp_path / "one", delay=0.0)
    _, second = make(tmp_path / "two", delay=0.0)
    with contextlib.ExitStack() as stack:
        for config in (first, second):
            daemon = DaemonProcess(config, config.parent / "log", env=env).start()
            stack.callback(daemon.stop)
        listed = bare(env, "pause")
        assert listed.returncode == 1
        assert "2 daemons are running" in listed.stderr
        assert f"traxd pause --config {first}" in listed.stderr
        assert f"traxd pause --config {second}" in listed.stderr
        picked = bare(env, "pause", "--config", str(second))
        assert picked.returncode == 0, picked.stderr
        assert [status(c)["inboxes"][0]["paused"] for c in (first, second)] == [False, True]


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


def test_ctrl_c_says_what_the_daemon_waits_for(tmp_path: Path) -> None:
    root, config = make(tmp_path, delay=60)
    daemon = DaemonProcess(config, tmp_path / "log").start()
    try:
        (root / "inbox" / "a.mp3").write_bytes(b"a")
        wait_until(lambda: status(config)["inboxes"][0]["running"], 30, message="running")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGINT)
        wait_until(lambda: "finishing 1 job, up to 5 s; Ctrl-C (or SIGTERM) again to stop now"
                   in daemon.log_text(), 30, message="what the daemon waits for")
        daemon.proc.send_signal(signal.SIGINT)
        assert daemon.proc.wait(30) == 0
    finally:
        daemon.stop()
    assert "stopping 1 job now" in daemon.log_text()


def test_a_job_put_back_after_a_step_counts_as_resumed_at_the_next_start(tmp_path: Path) -> None:
    # Given a two-step job whose second step outlasts the stop's grace
    root = tmp_path / "box"
    (root / "inbox").mkdir(parents=True)
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    config = write_config(tmp_path / "traxd.toml", base_daemon(tmp_path, shutdown_grace="0.5s"),
                          [{"name": "main", "path": str(root / "inbox"),
                            "pipeline": [{"command": copy_step(tmp_path / "ledger")},
                                         {"command": slow}]}])
    first = DaemonProcess(config, tmp_path / "log").start()
    try:
        (root / "inbox" / "a.mp3").write_bytes(b"a")
        wait_until((tmp_path / "ledger").exists, 30, message="the first step done")
        assert first.terminate() == 0
    finally:
        first.stop()
    # When the daemon starts again
    with running_daemon(config, tmp_path / "log2") as second:
        recovered = [json.loads(line) for line in second.log_text().splitlines()
                     if '"recovered"' in line]
    # Then the job that goes on from its finished step is counted
    assert [r["resumed"] for r in recovered] == [1], recovered


def test_a_transcript_is_out_while_its_enhancement_waits_for_a_key(tmp_path: Path) -> None:
    # Given a daemon that transcribes and enhances, its enhance key named as a file that is
    # not written yet
    root, key_file = tmp_path / "box", tmp_path / "deepseek.key"
    (root / "inbox").mkdir(parents=True)
    with FakeOpenAI().running() as server:
        config = write_config(
            tmp_path / "traxd.toml", base_daemon(tmp_path),
            [{"name": "talks", "path": str(root / "inbox"),
              "pipeline": ["preprocess", "transcribe", "enhance"]}],
            transcribe={"backend": "openai", "base_url": server.base_url,
                        "api_key_env": "TRAXD_TEST_WAIT_TRANSCRIBE_KEY"},
            enhance={"base_url": server.base_url, "api_key_file": str(key_file)})
        daemon = DaemonProcess(config, tmp_path / "log", env={
            "TRAXD_TEST_WAIT_TRANSCRIBE_KEY": "sk-test-" + "t" * 24})
        with contextlib.ExitStack() as stack:
            stack.callback(daemon.stop)
            daemon.start()
            # When a recording arrives
            ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1",
                   str(tmp_path / "tone.wav"))
            os.replace(tmp_path / "tone.wav", root / "inbox" / "tone.wav")
            # Then its transcript is published while the file waits for the key
            inbox = wait_until(lambda: (s := status(config)["inboxes"][0])["waiting"] and s,
                               30, message="the job waiting for the enhance key")
            assert files_under(root / "outputs") == ["tone.json", "tone.srt", "tone.txt",
                                                     "tone.vtt"]
            assert (inbox["done"], files_under(root / "done")) == (0, [])
            assert files_under(root / "processing") == ["tone.wav"]
            assert str(key_file) in status(config)["backends_paused"]["enhance"]
            # When the key is put in the file and the daemon resumed
            key_file.write_text("sk-test-" + "e" * 24 + "\n")
            resumed = traxd(config, "resume")
            assert resumed.returncode == 0, resumed.stderr
            assert "and the enhance backend" in resumed.stdout
            # Then the enhanced text joins the transcript, and nothing is published twice
            wait_until(lambda: files_under(root / "done") == ["tone.wav"], 30,
                       message="the job done after resume")
        chats = [r for r in server.requests if r.path.endswith("/chat/completions")]
    assert files_under(root / "outputs") == ["tone.enhanced.md", "tone.json", "tone.srt",
                                             "tone.txt", "tone.vtt"]
    assert [r.headers["authorization"] for r in chats] == ["Bearer sk-test-" + "e" * 24]


def test_status_counts_the_eta_in_media_seconds_once_durations_are_known(
        tmp_path: Path) -> None:
    # Given a daemon that transcribes one file at a time, slowly after the first
    root = tmp_path / "box"
    (root / "inbox").mkdir(parents=True)
    with FakeOpenAI().running() as server:
        answered: list[int] = []

        def slow_after_the_first(request: Request) -> Reply:
            answered.append(1)
            reply = verbose_json(request)
            return reply if len(answered) == 1 else dataclasses.replace(reply, pause=2.0)

        server.transcribe = slow_after_the_first
        config = write_config(
            tmp_path / "traxd.toml", base_daemon(tmp_path, workers=1),
            [{"name": "talks", "path": str(root / "inbox"),
              "pipeline": ["preprocess", "transcribe"]}],
            transcribe={"backend": "openai", "base_url": server.base_url,
                        "api_key_env": "TRAXD_TEST_ETA_KEY"})
        with running_daemon(config, tmp_path / "log", env={
                "TRAXD_TEST_ETA_KEY": "sk-test-" + "t" * 24}):
            for name, pitch in (("a", 440), ("b", 550), ("c", 660)):  # not duplicates
                ffmpeg("-f", "lavfi", "-i", f"sine=frequency={pitch}:duration=1",
                       str(tmp_path / f"{name}.wav"))
            os.replace(tmp_path / "a.wav", root / "inbox" / "a.wav")
            wait_until(lambda: files_under(root / "done") == ["a.wav"], 30, message="a done")
            # When two more arrive while the first's duration is known
            for name in ("b", "c"):
                os.replace(tmp_path / f"{name}.wav", root / "inbox" / f"{name}.wav")
            # Then, once one of them is transcribing, the ETA counts media seconds
            inbox = wait_until(lambda: (s := status(config)["inboxes"][0])["running"]
                               and s["running"][0]["step"] == "transcribe" and s, 30,
                               message="b or c transcribing")
            assert inbox["eta_basis"] == "media", inbox
            assert inbox["eta_seconds"] is not None and inbox["eta_seconds"] > 0
