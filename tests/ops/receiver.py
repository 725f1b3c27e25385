"""A loopback HTTP server that takes JSON webhooks (what Apprise's json:// sends)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """Records every JSON body POSTed to it. `mode`: "ok" (200), "fail" (500), or "hang"
    (reads the request, then never answers until the test ends)."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self._server.server_address[1]}/"

    def messages(self, event_word: str) -> list[dict[str, Any]]:
        """Bodies whose title names an event (Apprise's JSON: title, message, type)."""
        with self._lock:
            return [b for b in self.bodies if event_word in str(b.get("title", ""))]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.attempts += 1
                    if receiver.mode == "ok":
                        receiver.bodies.append(json.loads(body))
                if receiver.mode == "hang":
                    receiver._release.wait(60)
                    return
                status = 200 if receiver.mode == "ok" else 500
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        return Handler

    @contextmanager
    def running(self) -> Iterator[Receiver]:
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._release.set()
            self._server.shutdown()
            self._server.server_close()
            thread.join()
