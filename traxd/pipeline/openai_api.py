"""One OpenAI-compatible API as a step uses it: client, rate limit, error mapping, metrics."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import TypeVar
from urllib.parse import urlsplit

import openai
from openai import AsyncOpenAI

from traxd import metrics
from traxd.errors import BackendFatal, Category, Permanent, Retry, TraxdError, classify_http_status
from traxd.logs import get_logger, redact_text
from traxd.ratelimit import RateLimiter

T = TypeVar("T")
DEFAULT_HOST = "api.openai.com"


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
    """Client, limiter and error mapping for one configured API, shared by all jobs."""

    def __init__(
        self, *, backend: str, base_url: str | None, api_key_env: str, timeout: float,
        requests_per_minute: int, max_concurrent: int,
    ) -> None:
        self.backend, self.base_url, self.api_key_env = backend, base_url, api_key_env
        self.timeout = timeout
        self.provider = provider_label(base_url)
        self.limiter = RateLimiter(requests_per_minute, max_concurrent)
        self._client: AsyncOpenAI | None = None
        self._key: str | None = None
        self._stale: list[AsyncOpenAI] = []

    def client(self) -> AsyncOpenAI:
        """The client for the current key; the key is read from the environment each time,
        so that a fixed key is picked up on `traxd resume`."""
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise BackendFatal(f"no API key for {self.provider}: set the environment variable "
                               f"{self.api_key_env}", backend=self.backend, reason="api_key")
        if self._client is None or key != self._key:
            if self._client is not None:
                self._stale.append(self._client)
            self._client = AsyncOpenAI(api_key=key, base_url=self.base_url, max_retries=0,
                                       timeout=self.timeout)
            self._key = key
        return self._client

    async def call(self, request: Callable[[AsyncOpenAI], Awaitable[T]]) -> T:
        """Run one request under the rate limit; count it; map its failure."""
        client = self.client()
        async with self.limiter.slot():
            try:
                result = await request(client)
            except openai.OpenAIError as exc:
                raise self._failed(exc) from exc
        self._count("200")
        return result

    def _failed(self, exc: openai.OpenAIError) -> TraxdError:
        status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
        self._count(str(status or "error"))
        error = translate(exc, provider=self.provider, backend=self.backend)
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
