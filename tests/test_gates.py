"""Which inboxes may start jobs: paused, draining, paused backends, schedule windows."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

import pytest

from traxd.config import Settings
from traxd.gates import InboxGates
from traxd.jobs import BackendGate
from traxd.schedule import Window


def two_inboxes(settings: Settings, tmp_path: Path, schedule: str = "always") -> Settings:
    first = dataclasses.replace(settings.inboxes[0], name="talks", pipeline=("transcribe",))
    second = dataclasses.replace(settings.inboxes[0], name="night", path=tmp_path / "n" / "in",
                                 pipeline=("preprocess",), schedule=schedule)
    return dataclasses.replace(settings, inboxes=(first, second))


def test_paused_draining_and_paused_backends_close_an_inbox(settings: Settings,
                                                            tmp_path: Path) -> None:
    backends = BackendGate()
    gates = InboxGates(two_inboxes(settings, tmp_path), backends)
    assert gates.open(0.0) == ["talks", "night"]
    gates.paused.add("night")
    assert gates.open(0.0) == ["talks"]
    gates.paused.clear()
    gates.draining.add("talks")
    assert gates.open(0.0) == ["night"]
    gates.draining.clear()
    backends.pause(settings.transcribe.backend, "401")
    assert gates.open(0.0) == ["night"]  # only the inbox that transcribes waits


def test_a_window_that_never_opens_is_worked_out_once(settings: Settings, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Given an inbox whose window can never open (30 February)
    gates = InboxGates(two_inboxes(settings, tmp_path, "0 0 30 2 *"), BackendGate())
    calls: list[datetime] = []
    real = Window.next_open

    def counted(self: Window, now: datetime) -> datetime | None:
        calls.append(now)
        return real(self, now)

    monkeypatch.setattr(Window, "next_open", counted)
    # When the pool asks again and again, over hours
    answers = [gates.open(1_800_000_000.0 + n * 600) for n in range(50)]
    # Then it is closed every time, and the cron search ran once
    assert all(a == ["talks"] for a in answers)
    assert len(calls) == 1


def test_a_paused_optional_step_leaves_the_inbox_open(settings: Settings,
                                                      tmp_path: Path) -> None:
    # Given an inbox that transcribes, then enhances
    enhancing = dataclasses.replace(settings.inboxes[0], name="talks",
                                    pipeline=("transcribe", "enhance"))
    backends = BackendGate()
    gates = InboxGates(dataclasses.replace(settings, inboxes=(enhancing,)), backends)
    # When the enhance backend is paused, its files still start (to publish transcripts)
    backends.pause("enhance", "no API key")
    assert gates.open(0.0) == ["talks"]
    # But not when the transcription backend is
    backends.pause(settings.transcribe.backend, "401")
    assert gates.open(0.0) == []
