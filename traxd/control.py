"""The control socket: `traxd status|pause|resume|drain|retry` (and `traxd doctor`, for
`keys`) talk to the running daemon.

Transport: a unix stream socket at ``state_dir/traxd.sock``, mode 0600 (only the
daemon's user may connect), one UTF-8 JSON object per line in each direction. A client
may send several requests on one connection; each gets one answer line, in order.

Request::

    {"command": "status" | "pause" | "resume" | "drain" | "retry" | "keys",
     "inbox": "podcasts" | null,        # pause/resume/drain: one inbox, null = all
     "names": ["talk.mp3"] | null}      # retry: failed files by name, null = all

Answer::

    {"ok": true, "result": {...}}       # the handler's dict; for status see `Status`
    {"ok": false, "error": "no inbox named 'x'; inboxes: podcasts"}

`keys` answers what the daemon itself sees of the API keys its pipelines need (its
environment may differ from the shell's), never a key::

    {"keys": [{"use": "enhance", "backend": "enhance",
               "source": "env" | "file",          # where the daemon reads it from
               "where": "DEEPSEEK_API_KEY" | "/home/me/.config/traxd/deepseek.key",
               "present": false, "problem": "not set",   # "" when present
               "local": false,                     # base_url on this machine
               "paused": "no API key for ..." | null,     # the backend's pause, if any
               "fix": "put DEEPSEEK_API_KEY=… in ~/.config/traxd/traxd.env, then ..."}],
     "manager": "systemd-user" | "systemd-system" | "launchd" | "none",
     "pid": 1234}

Times in answers are Unix seconds (floats) unless a field says ISO 8601.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, Protocol, TypedDict

from traxd.errors import AlreadyRunning, ControlRejected, ControlUnavailable, TraxdError
from traxd.logs import get_logger

COMMANDS = ("status", "pause", "resume", "drain", "retry", "keys")
SOCKET_NAME = "traxd.sock"
MAX_LINE = 1 << 20  # bytes; a status of thousands of running jobs still fits
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes on Linux (104 on macOS) with the NUL
_REQUEST_KEYS = frozenset({"command", "inbox", "names"})


# --- the status schema (what `status()` returns; the daemon fills it) --------------------


class RunningJob(TypedDict):
    file: str  # path relative to the inbox
    step: str  # the step running now ("" before the first)
    progress: float  # 0.0 … 1.0 within the job
    started_at: float | None  # Unix seconds
    job_id: NotRequired[int]


class InboxStatus(TypedDict):
    name: str
    paused: bool  # `traxd pause`: no new jobs start
    draining: bool  # `traxd drain`: running jobs finish, queued ones wait
    queued: int  # ready and waiting for a worker
    running: list[RunningJob]
    done: int  # finished (done or duplicate) as recorded in the journal
    failed: int
    rate_per_hour: float  # jobs finished per hour over the last hour
    eta_seconds: float | None  # until queued + running are done at that rate; None: unknown
    eta_basis: NotRequired[str]  # "media": media seconds left at media seconds/s; "files"
    schedule: str  # "always" or the cron window
    next_window: str | None  # ISO 8601: when the window is next open (now when open)
    waiting: NotRequired[int]  # held for a paused backend


class Status(TypedDict):
    version: str
    started_at: float  # Unix seconds
    inboxes: list[InboxStatus]
    backends_paused: dict[str, str]  # backend -> why ("openai": "401 invalid API key")
    throttled: dict[str, bool]  # {"memory": bool, "cpu": bool}
    workers_allowed: int  # what the resource governor admits now
    workers: NotRequired[int]  # the configured cap


class ControlHandler(Protocol):
    """What the daemon offers the socket; called on the event loop, never concurrently."""

    def status(self) -> dict[str, Any]: ...

    def pause(self, inbox: str | None) -> dict[str, Any]: ...

    def resume(self, inbox: str | None) -> dict[str, Any]: ...

    def drain(self, inbox: str | None) -> dict[str, Any]: ...

    async def retry(self, names: list[str] | None) -> dict[str, Any]: ...

    async def keys(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Request:
    command: str
    inbox: str | None = None
    names: list[str] | None = None


def parse_request(line: bytes) -> Request:
    """A request from one line; ValueError names what is wrong with it."""
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"a request is one JSON object per line: {exc}") from exc
    except RecursionError as exc:
        raise ValueError("a request is one flat JSON object; this one is nested too deeply") \
            from exc
    if not isinstance(data, dict):
        raise ValueError("a request is a JSON object")
    if unknown := sorted(set(data) - _REQUEST_KEYS):
        raise ValueError(f"unknown request keys: {', '.join(unknown)}")
    command, inbox, names = data.get("command"), data.get("inbox"), data.get("names")
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    if inbox is not None and not isinstance(inbox, str):
        raise ValueError("inbox must be a string or null")
    if names is not None and not (isinstance(names, list)
                                  and all(isinstance(n, str) for n in names)):
        raise ValueError("names must be a list of strings or null")
    return Request(command, inbox, names)


# --- server ------------------------------------------------------------------------------


class ControlServer:
    """Serves `handler` on a unix socket at `path` while started; with `registry` (what to
    tell clients about this daemon: its config and inboxes) it is recorded in the
    per-user runtime folder while it listens, so that commands find it without --config."""

    def __init__(self, handler: ControlHandler, path: Path,
                 registry: Mapping[str, Any] | None = None) -> None:
        self.handler = handler
        self.path = path
        self._registry = registry
        self._record: Path | None = None
        self._server: asyncio.Server | None = None
        self._identity: tuple[int, int] | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._log = get_logger(component="control")

    async def start(self) -> None:
        """Listen; a stale socket file is replaced, a live one raises AlreadyRunning."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_stale_socket(self.path)
        sock = _bind_private(self.path)
        info = self.path.stat()
        self._identity = (info.st_dev, info.st_ino)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)
        self._log.debug("control_listening", path=str(self.path))
        if self._registry is not None:
            self._record = await asyncio.to_thread(register, self.path, self._registry)

    async def close(self) -> None:
        """Stop listening, end open connections and remove the socket file."""
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None
        self._remove_own_socket()
        if self._record is not None:
            await asyncio.to_thread(unregister, self._record, self.path)
            self._record = None

    async def dispatch(self, line: bytes) -> dict[str, Any]:
        """The answer to one request line (never raises)."""
        try:
            request = parse_request(line)
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        try:
            result = await self._call(request)
        except (ValueError, LookupError, TraxdError) as exc:
            return {"ok": False, "error": _message(exc)}
        except Exception as exc:
            self._log.exception("control_failed", command=request.command)
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        return {"ok": True, "result": result}

    async def _call(self, request: Request) -> dict[str, Any]:
        handler = self.handler
        if request.command == "status":
            return handler.status()
        if request.command == "pause":
            return handler.pause(request.inbox)
        if request.command == "resume":
            return handler.resume(request.inbox)
        if request.command == "drain":
            return handler.drain(request.inbox)
        if request.command == "keys":
            return await handler.keys()
        return await handler.retry(request.names)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._converse(reader, writer)
        except (ConnectionError, ValueError) as exc:  # ValueError: a line over MAX_LINE
            self._log.debug("control_connection_ended", error=str(exc))
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(encode(await self.dispatch(line)))
            await writer.drain()

    def _remove_own_socket(self) -> None:
        """Unlink the socket file unless another process has replaced it meanwhile."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return
        if (info.st_dev, info.st_ino) == self._identity:
            self.path.unlink(missing_ok=True)


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps(message, default=str, separators=(",", ":")) + "\n").encode("utf-8")


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc) or type(exc).__name__


def remove_stale_socket(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse to touch anything else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket; move it out of the way")
    if _answers(path):
        raise AlreadyRunning(f"another traxd is listening on {path}")
    path.unlink(missing_ok=True)


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except PermissionError:
            return True  # someone else's socket: not ours to remove
    return True


def _bind_private(path: Path) -> socket.socket:
    """A bound, not yet listening socket whose file is mode 0600 before anyone can connect."""
    _check_length(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        path.chmod(0o600)
    except OSError:
        sock.close()
        raise
    return sock


def _check_length(path: Path) -> None:
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise OSError(f"socket path too long for a unix socket ({len(str(path))} bytes > "
                      f"{_MAX_SOCKET_PATH}): {path}; choose a shorter state_dir")


# --- where running daemons are found -------------------------------------------------------


@dataclass(frozen=True)
class RunningDaemon:
    """A daemon that recorded itself in the runtime folder and answers on its socket."""

    socket: Path
    config: str
    inboxes: tuple[str, ...]
    pid: int


def runtime_dir() -> Path:
    """Where daemons record their control sockets for this user: $XDG_RUNTIME_DIR/traxd,
    else ~/.local/state/traxd/run; on macOS ~/Library/Caches/traxd/run."""
    if sys.platform == "darwin":
        return Path("~/Library/Caches/traxd/run").expanduser()
    if base := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(base) / "traxd"
    return Path("~/.local/state/traxd/run").expanduser()


def register(socket_path: Path, about: Mapping[str, Any]) -> Path | None:
    """Record a listening daemon; None (logged) when the runtime folder cannot be written:
    the daemon runs all the same, and its commands need --config."""
    folder = runtime_dir()
    digest = hashlib.sha256(os.fsencode(socket_path)).hexdigest()[:16]
    record = folder / f"{digest}.json"
    data = {**about, "socket": str(socket_path), "pid": os.getpid()}
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        temp = folder / f"{digest}.{os.getpid()}.tmp"
        temp.write_text(json.dumps(data, default=str), encoding="utf-8")
        os.replace(temp, record)
    except OSError as exc:
        get_logger(component="control").warning(
            "runtime_record_failed", path=str(record), error=str(exc),
            consequence="traxd status, pause, … need --config to find this daemon")
        return None
    return record


def unregister(record: Path, socket_path: Path) -> None:
    """Remove this daemon's record unless another daemon has replaced it meanwhile."""
    found = _read_record(record)
    if found is not None and found.pid == os.getpid() and found.socket == socket_path:
        with contextlib.suppress(OSError):
            record.unlink()


def running_daemons() -> list[RunningDaemon]:
    """The daemons of this user that answer on their socket; records left by a daemon that
    was killed are removed."""
    try:
        records = sorted(runtime_dir().glob("*.json"))
    except OSError:
        return []
    found = []
    for record in records:
        daemon = _read_record(record)
        if daemon is None:
            continue
        try:
            listening = _answers(daemon.socket)
        except OSError:  # a timeout, a path too long: not one we can talk to
            listening = False
        if listening:
            found.append(daemon)
        elif not _alive(daemon.pid):
            with contextlib.suppress(OSError):
                record.unlink()
    return found


def _read_record(record: Path) -> RunningDaemon | None:
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        return RunningDaemon(Path(data["socket"]), str(data.get("config", "")),
                             tuple(str(i) for i in data.get("inboxes", ())), int(data["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- client ------------------------------------------------------------------------------


def request(socket_path: Path, command: str, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
    """Send one request and return its result.

    `args` are `inbox=` and `names=`. Raises ControlUnavailable when no daemon answers
    (not running, no permission, no answer within `timeout` seconds) and ControlRejected
    when the daemon answers with an error.
    """
    if unknown := sorted(set(args) - _REQUEST_KEYS):
        raise TypeError(f"unknown request arguments: {', '.join(unknown)}")
    payload = encode({"command": command, "inbox": args.get("inbox"),
                      "names": args.get("names")})
    deadline = time.monotonic() + timeout
    with _connect(socket_path, timeout) as sock:
        try:
            sock.sendall(payload)
            line = _read_line(sock, deadline)
        except TimeoutError as exc:
            raise ControlUnavailable(f"traxd did not answer within {timeout:g} s") from exc
        except OSError as exc:
            raise ControlUnavailable(f"lost the connection to traxd: {exc}") from exc
    return _result(line)


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        _check_length(path)
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise ControlUnavailable(f"traxd is not running (nothing listens on {path})") from exc
    except PermissionError as exc:
        sock.close()
        raise ControlUnavailable(f"permission denied on {path}: run this as the user "
                                 "the daemon runs as") from exc
    except OSError as exc:
        sock.close()
        raise ControlUnavailable(f"cannot reach traxd at {path}: {exc}") from exc
    return sock


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    data = bytearray()
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_LINE * 16:
            raise ControlUnavailable("the answer from traxd is too long")
    if not data:
        raise ControlUnavailable("traxd closed the connection without answering")
    return bytes(data.split(b"\n", 1)[0])


def _result(line: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(line)
    except ValueError as exc:
        raise ControlUnavailable(f"traxd sent an unreadable answer: {exc}") from exc
    if not isinstance(answer, dict) or "ok" not in answer:
        raise ControlUnavailable("traxd sent an answer without 'ok'")
    if not answer["ok"]:
        raise ControlRejected(str(answer.get("error", "request refused")))
    result = answer.get("result")
    return result if isinstance(result, dict) else {"value": result}
