"""One OpenAI-compatible API as a step uses it: client, rate limit, error mapping, metrics."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import openai
from openai import AsyncOpenAI

from traxd import metrics
from traxd.errors import BackendFatal, Category, Permanent, Retry, TraxdError, classify_http_status
from traxd.logs import get_logger, redact_text
from traxd.ratelimit import make_limiter

T = TypeVar("T")
DEFAULT_HOST = "api.openai.com"
RATE_LIMIT_WAIT = 600.0  # seconds of 429 answers one request waits out before it fails
RATE_LIMIT_BACKOFF = (1.0, 60.0)  # first and longest wait after a 429 without Retry-After
CONNECT_TIMEOUT = 30.0
SLOT_LEASE_MARGIN = 30.0  # seconds a site-wide slot outlives its request's timeout


class UnusableAnswer(Exception):
    """A 2xx answer that is not what the endpoint promises: HTML, broken JSON, null fields."""


def excerpt(text: str, limit: int = 120) -> str:
    """The start of an answer, on one line, secrets hidden: enough to recognise it."""
    return redact_text(" ".join(text.split()))[:limit]


def provider_label(base_url: str | None) -> str:
    """The metrics label of a provider: the API's host name."""
    return (urlsplit(base_url).hostname if base_url else None) or DEFAULT_HOST


def retry_after(exc: openai.APIStatusError) -> float | None:
    """Seconds from Retry-After (seconds or an HTTP date) or retry-after-ms, if given."""
    values = exc.response.headers
    try:
        if (millis := values.get("retry-after-ms")) is not None:
            return max(0.0, float(millis) / 1000)
        if (value := values.get("retry-after")) is None:
            return None
        if value.strip().replace(".", "", 1).isdigit():
            return float(value)
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def translate(exc: openai.OpenAIError, *, provider: str, backend: str) -> TraxdError:
    """The traxd error for an openai client error: fatal, retry or permanent."""
    if isinstance(exc, openai.APITimeoutError):
        return Retry(f"{provider}: request timed out", reason="timeout")
    if isinstance(exc, openai.APIConnectionError):
        return Retry(f"{provider}: cannot connect: {_message(exc)}", reason="connection")
    if not isinstance(exc, openai.APIStatusError):
        return Retry(f"{provider}: unusable answer: {_message(exc)}", reason="bad_response")
    status = exc.status_code
    text = f"{provider} answered {status}: {_message(exc)}"
    category = classify_http_status(status)
    if category is Category.FATAL:
        return BackendFatal(text, backend=backend, reason=f"http_{status}")
    if category is Category.RETRY:
        return Retry(text, reason=f"http_{status}", defer=retry_after(exc))
    return Permanent(text, reason=f"http_{status}")


def _message(exc: openai.OpenAIError) -> str:
    """The provider's own words where its error body has them; secrets hidden."""
    body = getattr(exc, "body", None)
    said = body.get("message") if isinstance(body, dict) else None
    text = said if isinstance(said, str) and said else getattr(exc, "message", None) or str(exc)
    return redact_text(text)[:500]


class OpenAIEndpoint:
    """Client, limiter and error mapping for one configured API, shared by all jobs.

    `timeout` bounds a whole request, however slowly its answer trickles in; a request
    that receives nothing for `stall_seconds` (or `timeout`, if shorter) ends sooner.
    A 429 is waited out, up to `rate_limit_wait` seconds in all, before it fails.
    """

    def __init__(
        self, *, backend: str, base_url: str | None, api_key_env: str, timeout: float,
        requests_per_minute: int, max_concurrent: int, stall_seconds: float | None = None,
        rate_limit_wait: float = RATE_LIMIT_WAIT, api_key_file: Path | None = None,
    ) -> None:
        self.backend, self.base_url, self.api_key_env = backend, base_url, api_key_env
        self.api_key_file = api_key_file
        self._file_key: str | None = None  # read once; again after a fatal error (resume)
        self.timeout = timeout
        self.read_timeout = min(timeout, stall_seconds or timeout)
        self.rate_limit_wait = rate_limit_wait
        self.provider = provider_label(base_url)
        self.limiter = make_limiter(f"{backend}:{self.provider}", requests_per_minute,
                                    max_concurrent, lease=timeout + SLOT_LEASE_MARGIN)
        self._client: AsyncOpenAI | None = None
        self._key: str | None = None
        self._stale: list[AsyncOpenAI] = []

    def client(self) -> AsyncOpenAI:
        """The client for the current key: from `api_key_file` when one is named (read again
        after the backend was paused, so a key put there is picked up on `traxd resume`),
        else from the environment."""
        key = self._key_from_file() if self.api_key_file else \
            os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise BackendFatal(f"no API key for {self.provider}: {self._where_to_put_it()}, "
                               "then run `traxd resume`", backend=self.backend, reason="api_key")
        if self._client is None or key != self._key:
            if self._client is not None:
                self._stale.append(self._client)
            timeout = openai.Timeout(self.timeout, read=self.read_timeout,
                                     connect=min(CONNECT_TIMEOUT, self.timeout))
            self._client = AsyncOpenAI(api_key=key, base_url=self.base_url, max_retries=0,
                                       timeout=timeout)
            self._key = key
        return self._client

    def _key_from_file(self) -> str:
        assert self.api_key_file is not None
        if self._file_key is None:
            try:
                self._file_key = self.api_key_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                return ""
        return self._file_key

    def _where_to_put_it(self) -> str:
        if self.api_key_file is not None:
            return f"put the key in {self.api_key_file} (a file of its own, readable by traxd)"
        # A `traxd worker` (traxd.cluster.worker marks its processes) reads its own keys.
        whose = f"worker {worker}'s" if (worker := os.environ.get("TRAXD_WORKER")) else "daemon's"
        return (f"set {self.api_key_env} in the {whose} environment (the systemd unit's "
                "Environment= or EnvironmentFile=, the launchd plist's EnvironmentVariables), "
                "or name a file with api_key_file and put the key there")

    async def call(self, request: Callable[[AsyncOpenAI], Awaitable[T]]) -> T:
        """Run one request under the rate limit, waiting out 429 answers; count each
        attempt; map its failure. `request` validates the answer (UnusableAnswer)."""
        waited, attempt = 0.0, 0
        while True:
            try:
                return await self._attempt(request)
            except Retry as exc:
                wait = self._rate_limit_pause(exc, attempt)
                if wait is None or waited + wait > self.rate_limit_wait:
                    raise
            waited, attempt = waited + wait, attempt + 1
            get_logger(component="api", provider=self.provider).info(
                "rate_limited_waiting", seconds=round(wait, 3), waited=round(waited, 3),
                limit=self.rate_limit_wait)
            await asyncio.sleep(wait)

    async def _attempt(self, request: Callable[[AsyncOpenAI], Awaitable[T]]) -> T:
        client = self.client()
        async with self.limiter.slot():
            deadline = asyncio.timeout(self.timeout)
            try:
                async with deadline:
                    result = await request(client)
            except openai.OpenAIError as exc:
                failure = self._failed(exc)
                if isinstance(failure, BackendFatal):
                    self._file_key = None  # a key put in the file is read on resume
                raise failure from exc
            except TimeoutError as exc:
                if not deadline.expired():
                    raise
                self._count("timeout")
                raise Retry(f"{self.provider}: no complete answer within {self.timeout:g} s "
                            "(timeout)", reason="timeout") from exc
            except (UnusableAnswer, json.JSONDecodeError) as exc:
                self._count("invalid")
                what = str(exc) if isinstance(exc, UnusableAnswer) else f"invalid JSON ({exc})"
                raise Retry(f"{self.provider}: unusable answer: {what}",
                            reason="bad_response") from exc
        self._count("200")
        return result

    @staticmethod
    def _rate_limit_pause(exc: Retry, attempt: int) -> float | None:
        """Seconds to wait before asking again after a 429; None for any other failure."""
        if exc.reason != "http_429":
            return None
        if exc.defer is not None:
            return exc.defer
        first, longest = RATE_LIMIT_BACKOFF
        return min(longest, first * 2.0 ** attempt)

    def _failed(self, exc: openai.OpenAIError) -> TraxdError:
        status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
        self._count(str(status or "error"))
        if isinstance(exc, openai.APITimeoutError):
            return Retry(f"{self.provider}: request stalled: nothing received for "
                         f"{self.read_timeout:g} s", reason="stall")
        error = translate(exc, provider=self.provider, backend=self.backend)
        if status in (401, 403) and isinstance(error, BackendFatal):
            return BackendFatal(f"{error.message}; if the key is wrong, "
                                f"{self._where_to_put_it()}, then run `traxd resume`",
                                backend=self.backend, reason=error.reason)
        if status == 429 and isinstance(error, Retry) and error.defer:
            held = self.limiter.hold(error.defer)
            get_logger(component="api", provider=self.provider).warning(
                "provider_rate_limited", retry_after=error.defer, holding_requests_for=held)
        return error

    def _count(self, status: str) -> None:
        metrics.API_REQUESTS.labels(provider=self.provider, status=status).inc()

    async def aclose(self) -> None:
        clients = [*self._stale, *([self._client] if self._client else [])]
        self._client, self._stale = None, []
        for client in clients:
            await client.close()
