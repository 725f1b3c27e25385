"""Notifications: a real daemon sending through Apprise to a loopback JSON webhook, the
command notifier, grouping, retries, and that a bad receiver never slows the jobs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults.kit import ffmpeg, log_events
from tests.helpers import DaemonProcess, base_daemon, copy_step, wait_until, write_config
from tests.media.openai_server import FakeOpenAI, error
from tests.ops.receiver import Receiver
from traxd import metrics
from traxd.config import NOTIFY_EVENTS, NotifySettings, parse_settings
from traxd.errors import ConfigError
from traxd.jobs import JobEnd
from traxd.logs import Redactor
from traxd.notify import CommandSender, Notifier

SECRET = "sk-live-notify-secret-12345"


def failed_count(message: dict[str, Any]) -> int:
    return int(str(message["title"]).rsplit(": ", 1)[1].split()[0])


def drop(inbox: Path, names: list[str], content: bytes) -> None:
    inbox.mkdir(parents=True, exist_ok=True)
    for name in names:
        (inbox / name).write_bytes(content)


@pytest.mark.integration
def test_daemon_notifies_batches_grouped_failures_and_paused_backend(tmp_path: Path) -> None:
    docs, talks = tmp_path / "docs" / "inbox", tmp_path / "talks" / "inbox"
    drop(docs, [f"good{i}.txt" for i in range(3)], b"hello")
    drop(docs, [f"bad{i:02}.txt" for i in range(20)], b"FAIL: not copyable")
    talks.mkdir(parents=True)
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", str(talks / "tone.wav"))
    fake = FakeOpenAI()
    fake.transcribe = lambda _: error(401, f"invalid key {SECRET}")
    with Receiver().running() as receiver, fake.running():
        config = write_config(
            tmp_path / "traxd.toml", base_daemon(tmp_path, batch_interval="2s"),
            [{"name": "docs", "path": str(docs), "pipeline": [{"command": copy_step(
                tmp_path / "ledger")}]},
             {"name": "talks", "path": str(talks), "pipeline": ["preprocess", "transcribe"]}],
            transcribe={"backend": "openai", "base_url": fake.base_url, "model": "whisper-1"},
            notify={"urls": [receiver.url], "events": list(NOTIFY_EVENTS), "retries": 1})
        daemon = DaemonProcess(config, tmp_path / "daemon.log",
                               env={"OPENAI_API_KEY": SECRET}).start()
        try:
            def told() -> bool:
                failing = [e for e in log_events(daemon.log) if e.get("event") ==
                           "batch_finished" and e.get("failed")]
                told_batches = [b for b in receiver.messages("batch") if " failed" in
                                b["message"]]
                return (sum(map(failed_count, receiver.messages("failed"))) == 20
                        and bool(receiver.messages("paused")) and bool(failing)
                        and len(told_batches) == len(failing))

            wait_until(told, 90, message="failures, their batches and the pause told")
            failures = receiver.messages("failed")
            batches = [b for b in receiver.messages("batch") if " failed" in b["message"]]
            # Grouped: one message per batch that had failures, never one per file.
            assert len(failures) == len(batches) < 20
            assert all(b["type"] == "failure" for b in failures)
            assert "bad00.txt" in "".join(f["message"] for f in failures)
            paused = receiver.messages("paused")[0]
            assert "openai" in paused["title"] and "[redacted]" in paused["message"]
            assert daemon.terminate() == 0
        finally:
            daemon.stop()
        wait_until(lambda: receiver.messages("stopped"), 10, message="daemon_stopped told")
        assert SECRET not in json.dumps(receiver.bodies)
        assert SECRET not in daemon.log_text()


def time_second_wave(tmp_path: Path, notify: dict[str, Any] | None,
                     sending: Receiver | None = None) -> float:
    """Seconds that 15 files dropped after a first batch (whose notification is being sent,
    when `sending` is given) take to be done."""
    inbox, done = tmp_path / "box" / "inbox", tmp_path / "box" / "done"
    drop(inbox, [f"a{i:03}.txt" for i in range(5)], b"data")
    sections = {"notify": notify} if notify else {}
    config = write_config(
        tmp_path / "traxd.toml", base_daemon(tmp_path),
        [{"name": "box", "path": str(inbox), "pipeline": [{"command": copy_step(
            tmp_path / "ledger")}]}], **sections)
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        wait_until(lambda: done.is_dir() and len(list(done.iterdir())) == 5, 60,
                   message="first wave done")
        if sending is not None:
            wait_until(lambda: sending.attempts >= 1, 30, message="a notification in flight")
        started = time.monotonic()
        drop(inbox, [f"b{i:03}.txt" for i in range(15)], b"data")
        wait_until(lambda: len(list(done.iterdir())) == 20, 120, message="second wave done")
        return time.monotonic() - started
    finally:
        daemon.stop()


@pytest.mark.integration
def test_hanging_and_failing_receivers_do_not_slow_jobs(tmp_path: Path) -> None:
    baseline = time_second_wave(tmp_path / "plain", None)
    with Receiver("hang").running() as hanging, Receiver("fail").running() as failing:
        notify = {"urls": [hanging.url + "?rto=60", failing.url], "events": ["batch_finished"],
                  "timeout": "20s", "retries": 2}
        slowed = time_second_wave(tmp_path / "notified", notify, hanging)
        assert failing.attempts >= 1
    print(f"15 files: {baseline:.2f} s without notifications, {slowed:.2f} s while a "
          "receiver hangs and another answers 500")
    # A send that held up the pipeline would cost the whole 20 s timeout at least once.
    assert slowed < baseline + 10.0


# --- the Notifier in this process ---------------------------------------------------------

RECORD = ("import json, os, sys\n"
          "out, event = sys.argv[1], sys.argv[2]\n"
          "body = json.load(sys.stdin)\n"
          "body['child_has_key'] = 'TRAXD_TEST_TOKEN' in os.environ\n"
          "marker = out + '.tried'\n"
          "if body['event'] == 'backend_paused' and not os.path.exists(marker):\n"
          "    open(marker, 'w').close()\n"
          "    sys.exit('flaky receiver')\n"
          "with open(out, 'a') as f:\n"
          "    f.write(json.dumps(dict(body, argv_event=event)) + '\\n')\n")


def failure(index: int) -> JobEnd:
    return JobEnd(index, "docs", f"bad{index}.txt", "failed", 10, 0.1, f"/x/failed/bad{index}.txt",
                  error={"step": "convert", "reason": "exit_1", "category": "permanent",
                         "message": f"exit 1 using {SECRET}"})


async def test_command_notifier_groups_retries_and_redacts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAXD_TEST_TOKEN", "token-value-1234567")
    out = tmp_path / "events.jsonl"
    settings = NotifySettings(command=(sys.executable, "-c", RECORD, str(out), "{event}"),
                              events=NOTIFY_EVENTS, group_seconds=0.3, retries=2)
    notifier = Notifier(settings, [CommandSender(settings.command, 10, Redactor([SECRET]))],
                        Redactor([SECRET]))
    sent_before = metrics.NOTIFICATIONS.labels(event="backend_paused", outcome="sent")._value.get()
    notifier.start()
    for index in range(5):
        notifier.job_ended(failure(index))
    notifier.backend_changed("openai", f"HTTP 401: bad key {SECRET}")

    def lines() -> list[dict[str, Any]]:
        return [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []

    await asyncio.to_thread(wait_until, lambda: len(lines()) == 2, 20, 0.05, "two messages")
    await notifier.close(5)
    grouped = next(line for line in lines() if line["event"] == "file_failed")
    assert grouped["count"] == 5 and len(grouped["failures"]) == 5
    assert grouped["failures"][0]["sidecar"] == "/x/failed/bad0.txt.error.json"
    paused = next(line for line in lines() if line["event"] == "backend_paused")
    assert paused["argv_event"] == "backend_paused" and paused["backend"] == "openai"
    assert (tmp_path / "events.jsonl.tried").exists()  # failed once, then retried
    assert not any(line["child_has_key"] for line in lines())
    assert SECRET not in out.read_text()
    after = metrics.NOTIFICATIONS.labels(event="backend_paused", outcome="sent")._value.get()
    assert after == sent_before + 1


async def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    settings = NotifySettings(command=("true",), events=("backend_resumed",))
    notifier = Notifier(settings, [CommandSender(settings.command, 5, Redactor())], Redactor())
    dropped = metrics.NOTIFICATIONS.labels(event="backend_resumed", outcome="dropped")
    before = dropped._value.get()
    for _ in range(1005):  # not started: nothing is taken off the queue
        notifier.backend_changed("openai", None)
    assert dropped._value.get() == before + 5
    await notifier.close(0)


def test_notify_section_is_validated(tmp_path: Path) -> None:
    raw: dict[str, Any] = {"notify": {"urls": ["json://127.0.0.1:9/"],
                                      "events": ["batch_finished"], "command": ["notify-me"]}}
    parsed = parse_settings(raw).notify
    assert parsed.urls == ("json://127.0.0.1:9/",) and parsed.command == ("notify-me",)
    assert parsed.enabled
    for bad, key in (({"events": ["batch_done"]}, "notify.events"),
                     ({"urls": "ntfy://x"}, "notify.urls"), ({"command": []}, "notify.command"),
                     ({"retries": 99}, "notify.retries"), ({"colour": 1}, "notify.colour")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_settings({"notify": bad})
    inbox = {"name": "a", "path": str(tmp_path / "a" / "inbox")}
    assert parse_settings({"inbox": [{**inbox, "notify": []}]}).inboxes[0].notify == ()
    with pytest.raises(ConfigError, match=r"inbox\[0\]\.notify"):
        parse_settings({"inbox": [{**inbox, "notify": ["everything"]}]})


def test_daemon_refuses_an_unknown_apprise_url(tmp_path: Path) -> None:
    config = write_config(tmp_path / "traxd.toml", base_daemon(tmp_path),
                          [{"name": "a", "path": str(tmp_path / "a" / "inbox")}],
                          notify={"urls": ["nosuchscheme://secret-token-value"]})
    result = subprocess.run([sys.executable, "-m", "traxd", "run", "--config", str(config)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "notify.urls[0]" in result.stderr + result.stdout
    assert "secret-token-value" not in result.stderr + result.stdout


async def test_disk_full_is_told_when_the_journal_disk_fills(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    settings = NotifySettings(command=(sys.executable, "-c", RECORD, str(out), "{event}"),
                              events=("disk_full", "daemon_stopped"))
    notifier = Notifier(settings, [CommandSender(settings.command, 10, Redactor())], Redactor())
    full = False
    notifier.start()
    notifier.watch_disk(lambda: full, "/var/lib/traxd")
    full = True
    await asyncio.to_thread(wait_until, out.exists, 20, 0.05, "disk_full told")
    notifier.daemon_stopped(0)
    await notifier.close(10)
    told = [json.loads(line) for line in out.read_text().splitlines()]
    assert [t["event"] for t in told] == ["disk_full", "daemon_stopped"]
    assert told[0]["path"] == "/var/lib/traxd" and "full" in told[0]["message"]


async def test_an_inbox_may_name_its_own_events(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    settings = NotifySettings(command=(sys.executable, "-c", RECORD, str(out), "{event}"),
                              events=NOTIFY_EVENTS)
    notifier = Notifier(settings, [CommandSender(settings.command, 10, Redactor())], Redactor(),
                        {"scratch": ()})  # [[inbox]] notify = [] for "scratch"
    notifier.start()
    notifier.job_ended(dataclasses.replace(failure(1), inbox="scratch"))
    notifier.job_ended(failure(2))
    notifier.batch_finished("b1", 1, 10, 1.0, {"failed": 1}, inboxes={"scratch"})
    notifier.batch_finished("b2", 1, 10, 1.0, {"failed": 1}, inboxes={"docs"})
    await notifier.close(10)
    told = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(t["event"], t.get("batch_id"), t.get("count")) for t in told] == [
        ("file_failed", None, 1), ("batch_finished", "b2", None)]
    assert told[0]["failures"][0]["file"] == "bad2.txt"
