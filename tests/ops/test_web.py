"""The status page over real HTTP: what it shows, its headers, who may read it and who may
press its buttons. (The headless-browser tests are in test_web_browser.py.)"""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.ops.conftest import FakeHealth
from traxd.config import WebSettings
from traxd.exporter import HttpServerHandle, start_http
from traxd.jobs import JobEnd
from traxd.web.app import WebApp
from traxd.web.history import History

TOKEN = "web-token-0123456789"


class FakeOperations:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.paused: set[str] = set()

    def status(self) -> dict[str, Any]:
        return {
            "version": "0.1.0", "started_at": 1_700_000_000.0, "workers": 4,
            "workers_allowed": 3, "throttled": {"memory": False, "cpu": True},
            "backends_paused": {"openai": "HTTP 401: invalid key; fix the key"},
            "inboxes": [{
                "name": "talks", "paused": "talks" in self.paused, "draining": False,
                "queued": 7, "waiting": 0, "done": 3, "failed": 1, "rate_per_hour": 12.0,
                "eta_seconds": 600.0, "schedule": "always", "next_window": None,
                "running": [{"file": "<script>alert(1)</script>.mp3", "job_id": 5,
                             "step": "transcribe", "progress": 0.42, "started_at": None}]}],
        }

    def pause(self, inbox: str | None) -> dict[str, Any]:
        self.calls.append(("pause", inbox))
        self.paused.add(inbox or "talks")
        return {"paused": [inbox]}

    def resume(self, inbox: str | None) -> dict[str, Any]:
        self.calls.append(("resume", inbox))
        self.paused.discard(inbox or "talks")
        return {"resumed": [inbox]}

    async def retry(self, names: list[str] | None) -> dict[str, Any]:
        self.calls.append(("retry", names))
        return {"retried": []}


@contextmanager
def serving(*, control: bool = False, token: str | None = None, loopback: bool = True
            ) -> Iterator[tuple[HttpServerHandle, FakeOperations]]:
    ops = FakeOperations()
    history = History()
    history.add(JobEnd(1, "talks", "broken.mp3", "failed", 10, 0.5, "/x/failed/broken.mp3",
                       error={"step": "preprocess", "reason": "undecodable",
                              "message": "no audio stream"}))
    page = WebApp(WebSettings(control=control), ops, history, token=token, loopback=loopback)
    handle = start_http("127.0.0.1:0", FakeHealth(), page=page)
    try:
        yield handle, ops
    finally:
        handle.close()


def request(handle: HttpServerHandle, method: str, path: str, body: dict[str, str] | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection(handle.host, handle.port, timeout=10)
    data = urlencode(body).encode() if body is not None else None
    extra = {"Content-Type": "application/x-www-form-urlencoded"} if data is not None else {}
    conn.request(method, path, body=data, headers={**extra, **(headers or {})})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, text


def test_page_shows_status_escaped_with_security_headers() -> None:
    with serving() as (handle, _):
        status, headers, html = request(handle, "GET", "/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert "<script>alert(1)</script>" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;.mp3" in html
        assert 'value="42"' in html  # the running job's progress
        assert "broken.mp3" in html and "no audio stream" in html
        assert "HTTP 401: invalid key" in html and "openai" in html
        assert "throttled: cpu" in html
        assert re.search(r'<meta http-equiv="refresh" content="\d+">', html)  # no JS needed
        assert "<button" not in html  # no buttons: control is off
        _, _, fragment = request(handle, "GET", "/?fragment=1")
        assert "<html" not in fragment and "broken.mp3" in fragment
        for path in ("/app.css", "/app.js"):
            status, headers, _ = request(handle, "GET", path)
            assert status == 200 and headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["/../../etc/passwd", "/static/app.css", "/app.css/../../x",
                                  "/templates/page.html", "/%2e%2e/pyproject.toml"])
def test_no_file_is_served(path: str) -> None:
    with serving() as (handle, _):
        status, _, body = request(handle, "GET", path)
        assert status == 404 and "root:" not in body and "{%" not in body


def test_buttons_need_the_token_and_the_csrf_value() -> None:
    with serving(control=True, token=TOKEN) as (handle, ops):
        _, _, html = request(handle, "GET", "/")
        assert 'action="/login"' in html and "/control/pause" not in html
        assert request(handle, "POST", "/control/pause", {"inbox": "talks"})[0] == 403
        assert request(handle, "POST", "/login", {"token": "wrong"})[0] == 403
        status, headers, _ = request(handle, "POST", "/login", {"token": TOKEN})
        assert status == 303 and TOKEN not in headers["set-cookie"]
        assert "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
        cookie = {"Cookie": headers["set-cookie"].split(";")[0]}
        _, _, html = request(handle, "GET", "/", headers=cookie)
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
        assert csrf is not None and "/control/pause" in html
        # Logged in, but a form without the CSRF value, or from another origin, is refused.
        assert request(handle, "POST", "/control/pause", {"inbox": "talks"}, cookie)[0] == 403
        other = {**cookie, "Origin": "http://evil.example"}
        form = {"inbox": "talks", "csrf": csrf.group(1)}
        assert request(handle, "POST", "/control/pause", form, other)[0] == 403
        assert ops.calls == []
        assert request(handle, "POST", "/control/pause", form, cookie)[0] == 303
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert request(handle, "POST", "/control/retry", {}, bearer)[0] == 303
        assert ops.calls == [("pause", "talks"), ("retry", None)]


def test_control_off_refuses_even_with_the_token() -> None:
    with serving(control=False, token=TOKEN) as (handle, ops):
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert request(handle, "POST", "/control/pause", {}, bearer)[0] == 403
        assert ops.calls == []


def test_beyond_loopback_the_page_needs_a_token() -> None:
    with serving(loopback=False) as (handle, _):
        status, _, html = request(handle, "GET", "/")
        assert status == 403 and "TRAXD_WEB_TOKEN" in html and "talks" not in html
        assert request(handle, "GET", "/metrics")[0] == 200  # Prometheus still scrapes
    with serving(loopback=False, token=TOKEN) as (handle, _):
        _, _, html = request(handle, "GET", "/")
        assert 'action="/login"' in html and "talks" not in html
        _, _, html = request(handle, "GET", "/", headers={"Authorization": f"Bearer {TOKEN}"})
        assert "talks" in html
