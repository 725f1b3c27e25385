"""The control socket: round trips, permissions, stale sockets, and no daemon at all."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from traxd.control import ControlServer, parse_request, request
from traxd.errors import AlreadyRunning, ControlRejected, ControlUnavailable

T = TypeVar("T")


class FakeDaemon:
    """A ControlHandler that records calls and answers like the daemon would."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.inboxes = ["podcasts", "lectures"]

    def status(self) -> dict[str, Any]:
        self.calls.append(("status", None))
        return {"version": "0.1.0", "inboxes": [{"name": n} for n in self.inboxes]}

    def pause(self, inbox: str | None) -> dict[str, Any]:
        self.calls.append(("pause", inbox))
        return {"paused": self._names(inbox)}

    def resume(self, inbox: str | None) -> dict[str, Any]:
        self.calls.append(("resume", inbox))
        return {"resumed": self._names(inbox)}

    def drain(self, inbox: str | None) -> dict[str, Any]:
        self.calls.append(("drain", inbox))
        return {"draining": self._names(inbox)}

    async def retry(self, names: list[str] | None) -> dict[str, Any]:
        self.calls.append(("retry", names))
        if names == ["boom"]:
            raise RuntimeError("disk on fire")
        return {"retried": names or []}

    async def keys(self) -> dict[str, Any]:
        self.calls.append(("keys", None))
        return {"keys": [{"use": "enhance", "present": False}]}

    def _names(self, inbox: str | None) -> list[str]:
        if inbox is not None and inbox not in self.inboxes:
            raise ValueError(f"no inbox named {inbox!r}")
        return [inbox] if inbox else self.inboxes


def serving(path: Path, handler: FakeDaemon,
            client: Callable[[], Awaitable[T]]) -> T:
    """Run `client` while a ControlServer serves `handler` at `path`."""

    async def scenario() -> T:
        server = ControlServer(handler, path)
        await server.start()
        try:
            return await client()
        finally:
            await server.close()

    return asyncio.run(scenario())


def call(path: Path, command: str, **args: Any) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def client() -> dict[str, Any]:
        return await asyncio.to_thread(request, path, command, **args)

    return client


def test_each_command_reaches_the_handler_and_returns_its_result(short_tmp: Path) -> None:
    # Given a server with a fake daemon
    path, daemon = short_tmp / "traxd.sock", FakeDaemon()

    # When the client sends every command
    async def client() -> list[dict[str, Any]]:
        results = []
        commands: list[tuple[str, dict[str, Any]]] = [
            ("status", {}), ("pause", {"inbox": "podcasts"}), ("resume", {}),
            ("drain", {"inbox": "lectures"}), ("retry", {"names": ["a.mp3"]}), ("keys", {})]
        for command, args in commands:
            results.append(await asyncio.to_thread(request, path, command, **args))
        return results

    results = serving(path, daemon, client)

    # Then each answer is the handler's result, and the handler saw the arguments
    assert results == [{"version": "0.1.0", "inboxes": [{"name": "podcasts"},
                                                        {"name": "lectures"}]},
                       {"paused": ["podcasts"]}, {"resumed": ["podcasts", "lectures"]},
                       {"draining": ["lectures"]}, {"retried": ["a.mp3"]},
                       {"keys": [{"use": "enhance", "present": False}]}]
    assert daemon.calls == [("status", None), ("pause", "podcasts"), ("resume", None),
                            ("drain", "lectures"), ("retry", ["a.mp3"]), ("keys", None)]


def test_the_socket_is_private_and_removed_at_close(short_tmp: Path) -> None:
    path = short_tmp / "state" / "traxd.sock"

    async def scenario() -> int:
        server = ControlServer(FakeDaemon(), path)
        await server.start()
        mode = stat.S_IMODE(path.stat().st_mode)
        await server.close()
        return mode

    assert asyncio.run(scenario()) == 0o600
    assert not path.exists()


def test_handler_errors_come_back_as_answers_not_crashes(short_tmp: Path) -> None:
    path = short_tmp / "traxd.sock"

    async def client() -> list[str]:
        errors = []
        commands: list[tuple[str, dict[str, Any]]] = [
            ("pause", {"inbox": "nope"}), ("retry", {"names": ["boom"]}), ("explode", {})]
        for command, args in commands:
            try:
                await asyncio.to_thread(request, path, command, **args)
            except ControlRejected as exc:
                errors.append(str(exc))
        # the server still answers after all that
        status = await asyncio.to_thread(request, path, "status")
        errors.append(status["version"])
        return errors

    errors = serving(path, FakeDaemon(), client)

    assert errors[0] == "no inbox named 'nope'"
    assert errors[1] == "internal error: RuntimeError: disk on fire"
    assert errors[2].startswith("unknown command 'explode'")
    assert errors[3] == "0.1.0"


def test_one_connection_carries_several_requests_and_bad_lines(short_tmp: Path) -> None:
    path = short_tmp / "traxd.sock"

    async def client() -> list[dict[str, Any]]:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"command": "status"}\nnot json\n[1]\n{"command": "pause", "x": 1}\n'
                     b'{"command": "drain", "inbox": 5}\n{"command": "resume", "inbox": null}\n'
                     + b'{"command": ' + b'[' * 200_000 + b'\n{"command": "status"}\n')
        await writer.drain()
        answers = [json.loads(await reader.readline()) for _ in range(8)]
        writer.close()
        await writer.wait_closed()
        return answers

    answers = serving(path, FakeDaemon(), client)

    assert [a["ok"] for a in answers] == [True, False, False, False, False, True, False, True]
    assert "nested too deeply" in answers[6]["error"]
    assert "JSON" in answers[1]["error"]
    assert answers[3]["error"] == "unknown request keys: x"
    assert answers[4]["error"] == "inbox must be a string or null"


def test_a_stale_socket_file_is_replaced(short_tmp: Path) -> None:
    # Given a socket file left by a daemon that died (bound, never unlinked)
    path = short_tmp / "traxd.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    assert path.exists()

    # When a new server starts there, Then it serves
    assert serving(path, FakeDaemon(), call(path, "pause"))["paused"] == ["podcasts", "lectures"]


def test_a_live_socket_is_not_stolen(short_tmp: Path) -> None:
    path = short_tmp / "traxd.sock"

    async def client() -> None:
        with pytest.raises(AlreadyRunning):
            await ControlServer(FakeDaemon(), path).start()
        # and the first server still answers
        await asyncio.to_thread(request, path, "status")

    serving(path, FakeDaemon(), client)


def test_a_file_that_is_not_a_socket_is_left_alone(short_tmp: Path) -> None:
    path = short_tmp / "traxd.sock"
    path.write_text("precious")

    async def scenario() -> None:
        await ControlServer(FakeDaemon(), path).start()

    with pytest.raises(FileExistsError):
        asyncio.run(scenario())
    assert path.read_text() == "precious"


def test_request_without_a_daemon_raises_control_unavailable(short_tmp: Path) -> None:
    with pytest.raises(ControlUnavailable, match="not running"):
        request(short_tmp / "traxd.sock", "status", timeout=1.0)


def test_request_to_a_dead_socket_raises_control_unavailable(short_tmp: Path) -> None:
    path = short_tmp / "traxd.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    with pytest.raises(ControlUnavailable, match="not running"):
        request(path, "status", timeout=1.0)


def test_a_daemon_that_never_answers_times_out(short_tmp: Path) -> None:
    # Given something that accepts connections but never replies
    path = short_tmp / "traxd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen(1)
        # When a client asks, Then it gives up within its timeout
        with pytest.raises(ControlUnavailable, match="did not answer"):
            request(path, "status", timeout=0.3)


def test_request_rejects_unknown_arguments(short_tmp: Path) -> None:
    with pytest.raises(TypeError, match="inboxes"):
        request(short_tmp / "traxd.sock", "pause", inboxes="x")


@pytest.mark.parametrize(("line", "message"), [
    (b'{"command": "retry", "names": "a.mp3"}', "names must be a list"),
    (b'{"command": "retry", "names": [1]}', "names must be a list"),
    (b'{"inbox": "a"}', "unknown command None"),
    (b'\xff', "JSON"),
])
def test_parse_request_rejects_malformed_requests(line: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_request(line)
