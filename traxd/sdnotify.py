"""sd_notify(3) without a dependency: tell systemd we are ready, alive, or stopping.

`notify("READY=1", "STATUS=watching 2 inboxes")` sends one datagram to $NOTIFY_SOCKET
(a path, or an abstract-namespace name starting with '@'). Without $NOTIFY_SOCKET, for
example in the foreground or under launchd, every call is a no-op that returns False.
"""

from __future__ import annotations

import os
import socket

from traxd.logs import get_logger


def notify(*states: str) -> bool:
    """Send states such as READY=1, STATUS=…, WATCHDOG=1, STOPPING=1; True when delivered."""
    address = _socket_address(os.environ.get("NOTIFY_SOCKET", ""))
    if address is None or not states:
        return False
    message = "\n".join(states).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:
        get_logger(component="sdnotify").debug("notify_failed", error=str(exc), states=states)
        return False
    return True


def watchdog_interval() -> float | None:
    """The service watchdog timeout in seconds (WatchdogSec=), or None when not watched.

    systemd sets WATCHDOG_USEC, and WATCHDOG_PID when the watchdog is meant for one
    process only; a process that is not WATCHDOG_PID is not watched. Send WATCHDOG=1
    at least every half of the returned time.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000


def _socket_address(value: str) -> str | None:
    """A connectable AF_UNIX address from $NOTIFY_SOCKET, or None when unset or invalid."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None
