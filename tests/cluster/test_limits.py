"""Provider rate limits shared across machines: limiters on separate connections to a real
redis-server count together."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aredis
import structlog.testing

from tests.cluster.kit import RedisServer, free_port
from traxd.cluster.limits import SharedRateLimiter

KEY = "traxd:test:limit:openai:api.example"


@pytest.fixture
async def connections(redis_server: RedisServer) -> AsyncIterator[list[aredis.Redis]]:
    """Two clients, each with its own connections: as two worker machines have."""
    clients = [aredis.Redis.from_url(redis_server.url) for _ in range(2)]
    yield clients
    for client in clients:
        await client.aclose()


async def starts_of(limiter: SharedRateLimiter, count: int, hold: float = 0.0) -> list[float]:
    """Start `count` requests at once through `limiter`; when each got its slot."""
    started: list[float] = []

    async def request() -> None:
        async with limiter.slot():
            started.append(time.monotonic())
            await asyncio.sleep(hold)

    await asyncio.gather(*(request() for _ in range(count)))
    return started


async def test_two_limiters_together_never_exceed_the_limit_per_window(
        connections: list[aredis.Redis]) -> None:
    # Given a limit of 4 per 0.5 s, shared by two processes asking at once
    window, limit = 0.5, 4
    first, second = (SharedRateLimiter(c, KEY, limit, 100, lease=10, window=window)
                     for c in connections)
    # When each starts 6 requests
    a, b = await asyncio.gather(starts_of(first, 6), starts_of(second, 6))
    # Then no window holds more than 4 starts of the two together (each alone would have
    # started 4 at once), and both got some of the first window
    starts = sorted(a + b)
    assert len(starts) == 12
    spans = [later - earlier for earlier, later in zip(starts, starts[limit:], strict=False)]
    assert min(spans) >= window - 0.05, spans
    assert starts[-1] - starts[0] >= 2 * window - 0.05
    assert a and b


async def test_requests_in_flight_are_bounded_across_processes(
        connections: list[aredis.Redis]) -> None:
    first, second = (SharedRateLimiter(c, KEY, 0, 2, lease=10) for c in connections)
    inside = most = 0

    async def request(limiter: SharedRateLimiter) -> None:
        nonlocal inside, most
        async with limiter.slot():
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.1)
            inside -= 1

    await asyncio.gather(*(request(limiter) for limiter in (first, second) for _ in range(4)))
    assert most == 2  # each alone would have let 2 in: 4 together


async def test_a_retry_after_seen_by_one_process_holds_the_other(
        connections: list[aredis.Redis], redis_server: RedisServer) -> None:
    first, second = (SharedRateLimiter(c, KEY, 0, 10, lease=10) for c in connections)
    assert first.hold(0.6) == 0.6
    async with asyncio.timeout(5):
        while not redis_server.client().exists(f"{KEY}:hold"):
            await asyncio.sleep(0.01)
    asked = time.monotonic()
    (started,) = await starts_of(second, 1)
    assert started - asked >= 0.4


async def test_a_slot_its_holder_never_gives_back_lapses_after_the_lease(
        connections: list[aredis.Redis]) -> None:
    # Given a holder that keeps its only slot far beyond the lease (a worker that died)
    stuck, other = (SharedRateLimiter(c, KEY, 0, 1, lease=0.3) for c in connections)
    holding = asyncio.create_task(starts_of(stuck, 1, hold=5.0))
    await asyncio.sleep(0.1)
    asked = time.monotonic()
    # Then another process gets the slot once the lease ran out, not after 5 s
    (started,) = await asyncio.wait_for(starts_of(other, 1), 3)
    assert 0.1 <= started - asked < 1.5
    holding.cancel()


async def test_without_redis_the_process_counts_on_its_own() -> None:
    client = aredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0",
                                   socket_connect_timeout=1)
    limiter = SharedRateLimiter(client, KEY, 0, 1, lease=10)
    try:
        with structlog.testing.capture_logs() as logs:
            assert len(await asyncio.wait_for(starts_of(limiter, 3), 10)) == 3
    finally:
        await client.aclose()
    events = [e["event"] for e in logs]
    assert events.count("shared_rate_limit_unreachable") == 1
