"""The status page: server-rendered HTML (Jinja2, escaped), refreshed by a small script
that fetches the page's main part again, or without JavaScript by a meta refresh.

Routes: `GET /` (the page; `?fragment=1` its main part), `GET /app.css`, `GET /app.js`,
`POST /login`, `POST /control/pause|resume|retry`. Nothing else: no file is ever served,
and the page shows only inbox-relative names. Every answer carries a strict CSP, no
framing, no sniffing, no referrer, no caching.

Access: on a loopback address anyone on this machine may read the page; on any other
address the token is needed to read it (and without a token the page is not served).
The buttons exist only with `[web] control = true`, and then need the token: a person
logs in once (an HttpOnly, SameSite=Strict cookie holding an HMAC of the token, never the
token) and every form carries a CSRF value; a script sends `Authorization: Bearer TOKEN`.
The handlers run on the HTTP server's threads; the daemon's state is read on its loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit

from traxd.config import WebSettings
from traxd.logs import get_logger
from traxd.web.chart import throughput_bars

LOOP_TIMEOUT = 3.0
MAX_FORM = 4096
COOKIE = "traxd_session"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" makes browsers send Origin: null
    "Cache-Control": "no-store",
}
T = TypeVar("T")


class PageSource(Protocol):
    """What the page reads and the buttons do (traxd.operations.Operations)."""

    def status(self) -> dict[str, Any]: ...

    def pause(self, inbox: str | None) -> dict[str, Any]: ...

    def resume(self, inbox: str | None) -> dict[str, Any]: ...

    def retry(self, names: list[str] | None) -> Awaitable[dict[str, Any]]: ...


class HistorySource(Protocol):
    def snapshot(self) -> dict[str, Any]: ...


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebApp:
    def __init__(self, settings: WebSettings, source: PageSource, history: HistorySource,
                 *, token: str | None, loopback: bool,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        import jinja2

        self.settings, self.source, self.history = settings, source, history
        self.token = token or None
        self.loopback = loopback
        self.loop = loop
        self.control = settings.control and self.token is not None
        self._env = jinja2.Environment(
            loader=jinja2.PackageLoader("traxd.web", "templates"), autoescape=True)
        static = resources.files("traxd.web") / "static"
        self._static = {"/app.css": ((static / "app.css").read_bytes(), "text/css; charset=utf-8"),
                        "/app.js": ((static / "app.js").read_bytes(),
                                    "text/javascript; charset=utf-8")}
        self._log = get_logger(component="web")

    # --- access -----------------------------------------------------------------------------

    def _mac(self, purpose: bytes) -> str:
        assert self.token is not None
        return hmac.new(self.token.encode(), purpose, hashlib.sha256).hexdigest()

    def _session(self, headers: Mapping[str, str]) -> bool:
        """Logged in by cookie (a person) or by bearer token (a script)."""
        if self.token is None:
            return False
        bearer = headers.get("Authorization", "")
        if bearer.startswith("Bearer ") and hmac.compare_digest(
                bearer[7:].strip().encode(), self.token.encode()):
            return True
        cookie = _cookie(headers.get("Cookie", ""), COOKIE)
        return cookie is not None and hmac.compare_digest(cookie, self._mac(b"session"))

    def _may_read(self, headers: Mapping[str, str]) -> bool:
        return self.loopback or self._session(headers)

    # --- GET --------------------------------------------------------------------------------

    def get(self, target: str, headers: Mapping[str, str]) -> Response | None:
        """The page's answer to a GET, or None for a path that is not the page's."""
        parts = urlsplit(target)
        if parts.path in self._static:
            body, kind = self._static[parts.path]
            return self._answer(200, body, kind)
        if parts.path != "/":
            return None
        fragment = parse_qs(parts.query).get("fragment") == ["1"]
        if (refused := self._refuse(headers, fragment)) is not None:
            return refused
        try:
            data = self._on_loop(self._snapshot)
        except FutureTimeout:
            return self._answer(503, b"the daemon's event loop did not answer in time")
        context = self._context(data, self._session(headers))
        return self._answer(200, self._render("main.html" if fragment else "page.html",
                                              **context))

    def _refuse(self, headers: Mapping[str, str], fragment: bool) -> Response | None:
        """Why this reader may not see the page (as the answer), or None."""
        if not self.loopback and self.token is None:
            return self._answer(403, self._render("locked.html", token_env=self.settings.token_env))
        if self._may_read(headers):
            return None
        if fragment:
            return self._answer(403, b"log in again", "text/plain; charset=utf-8")
        return self._answer(200, self._render("login.html", failed=False))

    def _snapshot(self) -> dict[str, Any]:
        return {"status": self.source.status(), "history": self.history.snapshot()}

    def _context(self, data: Mapping[str, Any], session: bool) -> dict[str, Any]:
        status, history = data["status"], data["history"]
        now = time.time()
        running = [dict(job, inbox=inbox["name"], percent=round(100 * float(job["progress"])),
                        elapsed=_ago(now, job.get("started_at")))
                   for inbox in status["inboxes"] for job in inbox["running"]]
        return {
            "status": status, "running": running, "now": now,
            "updated": datetime.fromtimestamp(now).astimezone().strftime("%H:%M:%S"),
            "up_since": datetime.fromtimestamp(status["started_at"]).astimezone()
            .strftime("%Y-%m-%d %H:%M"),
            "recent": [dict(e, when=datetime.fromtimestamp(e["at"]).astimezone()
                            .strftime("%H:%M:%S")) for e in history["recent"]],
            "chart": throughput_bars(history["throughput"]),
            "failed_total": sum(int(i["failed"]) for i in status["inboxes"]),
            "control": self.control and session, "login": self.control and not session,
            "csrf": self._mac(b"csrf") if self.control and session else "",
            "refresh_ms": int(self.settings.refresh_seconds * 1000),
            "refresh_noscript": max(1, round(self.settings.refresh_seconds * 2)),
        }

    # --- POST -------------------------------------------------------------------------------

    def post(self, target: str, headers: Mapping[str, str], body: bytes) -> Response:
        path = urlsplit(target).path
        form = {k: v[0] for k, v in parse_qs(body[:MAX_FORM].decode("utf-8", "replace")).items()}
        if path == "/login":
            return self._login(form)
        verb = path.removeprefix("/control/")
        if not path.startswith("/control/") or verb not in ("pause", "resume", "retry"):
            return self._answer(404, b"not found", "text/plain; charset=utf-8")
        if not self.control:
            return self._answer(403, b"control is off: [web] control = true and a token turn "
                                b"it on", "text/plain; charset=utf-8")
        session = self._session(headers)
        if not session or not self._same_site(headers, form):
            self._log.warning("web_control_refused", verb=verb,
                              why="no valid session" if not session else "CSRF or origin")
            return self._answer(403, b"not allowed: log in with the token",
                                "text/plain; charset=utf-8")
        return self._control(verb, form.get("inbox") or None)

    def _same_site(self, headers: Mapping[str, str], form: Mapping[str, str]) -> bool:
        """A script with the bearer token needs no CSRF value; a browser form does, and
        its Origin, when sent, must be this server."""
        if headers.get("Authorization", "").startswith("Bearer "):
            return True
        origin = headers.get("Origin")
        if origin and urlsplit(origin).netloc != headers.get("Host", ""):
            return False
        return hmac.compare_digest(form.get("csrf", "").encode(), self._mac(b"csrf").encode())

    def _login(self, form: Mapping[str, str]) -> Response:
        given = form.get("token", "").encode()
        if self.token is None or not hmac.compare_digest(given, self.token.encode()):
            self._log.warning("web_login_failed")
            return self._answer(403, self._render("login.html", failed=True))
        cookie = f"{COOKIE}={self._mac(b'session')}; Path=/; HttpOnly; SameSite=Strict"
        return self._answer(303, b"", headers={"Location": "/", "Set-Cookie": cookie})

    def _control(self, verb: str, inbox: str | None) -> Response:
        try:
            if verb == "retry":
                result = self._on_loop_async(lambda: self.source.retry(None), timeout=30.0)
            else:
                act = self.source.pause if verb == "pause" else self.source.resume
                result = self._on_loop(lambda: act(inbox))
        except ValueError as exc:
            return self._answer(400, str(exc).encode(), "text/plain; charset=utf-8")
        except FutureTimeout:
            return self._answer(503, b"the daemon did not answer in time")
        self._log.info("web_control", verb=verb, inbox=inbox, result=result)
        return self._answer(303, b"", headers={"Location": "/"})

    # --- plumbing ---------------------------------------------------------------------------

    def _on_loop(self, call: Callable[[], T]) -> T:
        async def wrapped() -> T:
            return call()

        return self._on_loop_async(wrapped)

    def _on_loop_async(self, make: Callable[[], Awaitable[T]], timeout: float = LOOP_TIMEOUT
                       ) -> T:
        async def run() -> T:
            return await make()

        if self.loop is None or not self.loop.is_running():
            return asyncio.run(run())
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def _render(self, name: str, **context: Any) -> bytes:
        return self._env.get_template(name).render(**context).encode()

    @staticmethod
    def _answer(status: int, body: bytes, content_type: str = "text/html; charset=utf-8",
                headers: Mapping[str, str] | None = None) -> Response:
        return Response(status, body, content_type, {**SECURITY_HEADERS, **(headers or {})})


def _cookie(header: str, name: str) -> str | None:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


def _ago(now: float, then: object) -> str:
    if not isinstance(then, int | float):
        return ""
    seconds = max(0, int(now - then))
    minutes, secs = divmod(seconds, 60)
    return f"{minutes} min {secs:02} s" if minutes else f"{secs} s"
