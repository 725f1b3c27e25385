"""HTTP endpoints for operators: /metrics (Prometheus), /healthz and /readyz.

- ``/metrics``: traxd.metrics.REGISTRY in the text format (OpenMetrics when asked for).
- ``/healthz``: 200 while `health.alive()` (the event loop's heartbeat is recent), else 503.
  Meant for liveness checks: restart the daemon when it fails.
- ``/readyz``: 200 when `health.ready()` is ``(True, "")``, else 503 with the reason as
  the body (a watcher stopped, the journal is not writable, a backend is paused).
- ``/`` and its forms: the status page (traxd.web.app), when one is handed in.

The server runs in a daemon thread. When `start_http` is called inside a running event
loop, `ready()` is run on that loop, so the daemon's state is only ever touched from its
own thread; a loop that does not answer within READY_TIMEOUT makes /readyz fail.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, cast

from prometheus_client.exposition import choose_encoder

from traxd.logs import get_logger
from traxd.metrics import REGISTRY

READY_TIMEOUT = 2.0
_POLL_INTERVAL = 0.25


class HealthSource(Protocol):
    def alive(self) -> bool: ...

    def ready(self) -> tuple[bool, str]: ...


class _Probe:
    """Asks a HealthSource, on its event loop when it has one."""

    def __init__(self, health: HealthSource, loop: asyncio.AbstractEventLoop | None,
                 timeout: float = READY_TIMEOUT) -> None:
        self.health, self.loop, self.timeout = health, loop, timeout

    def alive(self) -> bool:
        try:
            return bool(self.health.alive())
        except Exception:
            get_logger(component="exporter").exception("healthz_failed")
            return False

    def ready(self) -> tuple[bool, str]:
        try:
            return self._on_loop(self.health.ready)
        except FutureTimeout:
            return False, f"the event loop did not answer within {self.timeout:g} s"
        except Exception as exc:
            get_logger(component="exporter").exception("readyz_failed")
            return False, f"readiness check failed: {type(exc).__name__}: {exc}"

    def _on_loop(self, check: Callable[[], tuple[bool, str]]) -> tuple[bool, str]:
        if self.loop is None or not self.loop.is_running():
            return check()
        future = asyncio.run_coroutine_threadsafe(_call(check), self.loop)
        return future.result(timeout=self.timeout)


async def _call(check: Callable[[], tuple[bool, str]]) -> tuple[bool, str]:
    return check()


class PageAnswer(Protocol):
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str]


class WebPage(Protocol):
    """The status page (traxd.web.app.WebApp): it answers the paths that are its own."""

    def get(self, target: str, headers: Mapping[str, str]) -> PageAnswer | None: ...

    def post(self, target: str, headers: Mapping[str, str], body: bytes) -> PageAnswer: ...


MAX_BODY = 4096  # the page's forms are small; a bigger body is refused unread


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    probe: _Probe
    page: WebPage | None = None


class _Handler(BaseHTTPRequestHandler):
    server_version = "traxd"

    def do_POST(self) -> None:
        page = cast(_Server, self.server).page
        length = self.headers.get("Content-Length", "0")
        if page is None:
            self._send_text(404, "not found")
        elif not length.isdigit() or int(length) > MAX_BODY:
            self._send_text(413, "the form is too large")
        else:
            body = self.rfile.read(int(length))
            self._send_page(lambda: page.post(self.path, self._header_map(), body))

    def _header_map(self) -> dict[str, str]:
        """The request's headers under one spelling ("Cookie", "Authorization")."""
        return {name.title(): value for name, value in self.headers.items()}

    def _send_page(self, answer_of: Callable[[], PageAnswer | None]) -> bool:
        """Send the page's answer; False when the path is not the page's."""
        try:
            answer = answer_of()
        except Exception:
            get_logger(component="exporter").exception("status_page_failed", path=self.path)
            self._send_text(500, "the status page failed; the daemon's log says why")
            return True
        if answer is None:
            return False
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)
        return True

    def do_GET(self) -> None:
        route = self.path.split("?", 1)[0]
        server = cast(_Server, self.server)
        probe, page = server.probe, server.page
        if route not in ("/metrics", "/healthz", "/readyz") and page is not None and (
                self._send_page(lambda: page.get(self.path, self._header_map()))):
            return
        if route == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, encoder(REGISTRY), content_type)
        elif route == "/healthz":
            alive = probe.alive()
            self._send_text(200 if alive else 503, "ok" if alive else "event loop is stuck")
        elif route == "/readyz":
            ready, reason = probe.ready()
            self._send_text(200 if ready else 503, "ready" if ready else reason or "not ready")
        elif route == "/":
            self._send_text(200, "traxd: /metrics /healthz /readyz")
        else:
            self._send_text(404, "not found")

    def _send_text(self, status: int, text: str) -> None:
        self._send(status, (text + "\n").encode("utf-8"), "text/plain; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        get_logger(component="exporter").debug("http_request", request=format % args)


class HttpServerHandle:
    """The running server: `.host`, `.port` (the bound one, also for port 0), `.close()`."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever,
                                        kwargs={"poll_interval": _POLL_INTERVAL},
                                        name="traxd-http", daemon=True)
        self._thread.start()
        address = server.server_address
        self.host, self.port = str(address[0]), int(address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def parse_address(address: str) -> tuple[str, int]:
    """("127.0.0.1", 9108) from "127.0.0.1:9108"; "[::1]:9108" and ":9108" (all) too."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port, not {address!r}")
    return host.strip("[]"), int(port)


def start_http(address: str, health: HealthSource,
               loop: asyncio.AbstractEventLoop | None = None,
               ready_timeout: float = READY_TIMEOUT,
               page: WebPage | None = None) -> HttpServerHandle:
    """Serve the endpoints at `address` ("host:port"; port 0 picks a free port).

    `loop` (default: the running loop, if any) is where `health.ready()` runs; `page`,
    when given, answers / and its own paths (the status page).
    """
    host, port = parse_address(address)
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None

    class Server(_Server):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = Server((host, port), _Handler)
    server.probe = _Probe(health, loop, ready_timeout)
    server.page = page
    handle = HttpServerHandle(server)
    get_logger(component="exporter").info("http_listening", url=handle.url)
    return handle
