"""A per-provider request limiter: requests started per minute and requests in flight.

`RateLimiter` counts in this process. A `traxd worker` shares the limits of the whole
site instead (traxd.cluster.limits): `share_limits` makes `make_limiter` build those.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

MAX_HOLD = 120.0  # seconds a provider's Retry-After may hold all its requests
WINDOW = 60.0  # seconds


class Limiter(Protocol):
    """What a provider's endpoint asks of its limiter."""

    def slot(self) -> AbstractAsyncContextManager[None]: ...

    def hold(self, seconds: float) -> float: ...


# (name, per_minute, max_concurrent, lease: seconds one request may hold a slot at most)
LimiterFactory = Callable[[str, int, int, float], Limiter]


def local_limiter(name: str, per_minute: int, max_concurrent: int, lease: float) -> Limiter:
    return RateLimiter(per_minute, max_concurrent)


_factory: list[LimiterFactory] = [local_limiter]


def make_limiter(name: str, per_minute: int, max_concurrent: int, *, lease: float) -> Limiter:
    """The limiter of one provider (`name`: backend and host): this process's own, or the
    site's when this process is a worker that shares them."""
    return _factory[0](name, per_minute, max_concurrent, lease)


def share_limits(factory: LimiterFactory | None) -> None:
    """From now on, this process's limiters are made by `factory` (None: its own again)."""
    _factory[0] = factory or local_limiter


class RateLimiter:
    """At most `max_concurrent` requests in flight and `per_minute` started in any 60 s
    (0: no per-minute limit). `hold` pauses every caller, e.g. after a 429 with Retry-After.

    Shared by all jobs of one step; waiters are served in arrival order.
    """

    def __init__(
        self,
        per_minute: int,
        max_concurrent: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.per_minute = per_minute
        self.max_concurrent = max_concurrent
        self._clock, self._sleep = clock, sleep
        self._slots = asyncio.Semaphore(max_concurrent)
        self._turn = asyncio.Lock()
        self._starts: deque[float] = deque()
        self._hold_until = 0.0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a free slot and a free place in the minute, then run the request."""
        async with self._slots:
            await self._wait_turn()
            yield

    def hold(self, seconds: float) -> float:
        """No request starts during the next `seconds`, at most MAX_HOLD: one answer's
        Retry-After must not stall every job of the provider for a day. Returns the hold."""
        held = min(max(seconds, 0.0), MAX_HOLD)
        self._hold_until = max(self._hold_until, self._clock() + held)
        return held

    def delay(self) -> float:
        """Seconds the next request would wait now."""
        now = self._clock()
        while self._starts and now - self._starts[0] >= WINDOW:
            self._starts.popleft()
        wait = self._hold_until - now
        if self.per_minute and len(self._starts) >= self.per_minute:
            wait = max(wait, self._starts[0] + WINDOW - now)
        return max(wait, 0.0)

    async def _wait_turn(self) -> None:
        async with self._turn:
            while (wait := self.delay()) > 0:
                await self._sleep(wait)
            self._starts.append(self._clock())
