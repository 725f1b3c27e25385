"""sd_notify against a real unix datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from traxd import sdnotify


@pytest.fixture
def listener(short_tmp: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(short_tmp / "notify.sock"))
        sock.settimeout(5.0)
        yield sock


def test_states_arrive_as_one_datagram(listener: socket.socket,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Given systemd's socket in NOTIFY_SOCKET
    monkeypatch.setenv("NOTIFY_SOCKET", listener.getsockname())

    # When traxd reports ready with a status line
    sent = sdnotify.notify("READY=1", "STATUS=watching 2 inboxes")

    # Then systemd receives both states, newline-separated, in one message
    assert sent is True
    assert listener.recv(4096) == b"READY=1\nSTATUS=watching 2 inboxes"


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"traxd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_without_notify_socket_it_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


def test_a_missing_socket_is_reported_not_raised(short_tmp: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_tmp / "gone.sock"))
    assert sdnotify.notify("STOPPING=1") is False


def test_a_relative_notify_socket_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "relative.sock")
    assert sdnotify.notify("READY=1") is False


def test_watchdog_interval_for_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 60.0
    monkeypatch.delenv("WATCHDOG_PID")
    assert sdnotify.watchdog_interval() == 60.0


def test_watchdog_meant_for_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None


@pytest.mark.parametrize("usec", [None, "", "0", "soon"])
def test_no_watchdog(usec: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if usec is None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert sdnotify.watchdog_interval() is None
