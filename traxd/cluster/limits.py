"""Provider rate limits shared by every worker of a site: RateLimiter's interface over Redis.

Per provider (`<ns>:limit:<backend>:<host>`) three keys: `:starts`, a sorted set of the
requests started in the last window (a sliding window); `:slots`, the requests in flight,
each scored with the moment its slot lapses (a worker that dies frees its slots after
the lease); `:hold`, the moment a provider's Retry-After ends. One Lua script looks at all
three and takes a slot, or says how long to wait, atomically, on Redis's own clock (the
machines' clocks may differ). Waiters of one process are served in arrival order; across
processes, whoever asks first after a slot frees gets it. While Redis cannot be reached
the process counts on its own (RateLimiter), so steps do not stall.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aredis
from redis.exceptions import RedisError

from traxd.cluster.broker import CONNECT_TIMEOUT, SOCKET_TIMEOUT
from traxd.cluster.protocol import Keys
from traxd.logs import get_logger
from traxd.ratelimit import MAX_HOLD, WINDOW, Limiter, RateLimiter

POLL_MS = 100  # while every slot is taken, ask again this often (a release is not announced)

# KEYS: starts, slots, hold. ARGV: per_minute (0: none), max_concurrent, window ms, token,
# lease ms, poll ms. Returns 0 when the slot is taken, else the milliseconds to wait.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local per_minute, most = tonumber(ARGV[1]), tonumber(ARGV[2])
local window, lease = tonumber(ARGV[3]), tonumber(ARGV[5])
local wait = tonumber(redis.call('GET', KEYS[3]) or '0') - now
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= most then
  wait = math.max(wait, tonumber(ARGV[6]))
end
if per_minute > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= per_minute then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    wait = math.max(wait, tonumber(first[2]) + window - now)
  end
end
if wait > 0 then
  return math.ceil(wait)
end
redis.call('ZADD', KEYS[2], now + lease, ARGV[4])
redis.call('PEXPIRE', KEYS[2], lease)
if per_minute > 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
end
return 0
"""

# KEYS: hold. ARGV: milliseconds. The later of the hold there and now + ARGV[1].
HOLD = """
local t = redis.call('TIME')
local till = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
if till > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], till, 'PX', tonumber(ARGV[1]) + 1000)
end
return till
"""


class SharedRateLimiter:
    """At most `max_concurrent` requests in flight and `per_minute` started in any
    `window` seconds, counted over every process that uses the same `key` in Redis."""

    def __init__(self, client: aredis.Redis, key: str, per_minute: int, max_concurrent: int,
                 *, lease: float, window: float = WINDOW) -> None:
        self.client, self.key = client, key
        self.per_minute, self.max_concurrent = per_minute, max_concurrent
        self.lease, self.window = lease, window
        self._acquire = client.register_script(ACQUIRE)
        self._hold = client.register_script(HOLD)
        self._turn = asyncio.Lock()
        self._local = RateLimiter(per_minute, max_concurrent)  # while Redis is away
        self._hold_until = 0.0  # monotonic: this process's own hold, before Redis has it
        self._tasks: set[asyncio.Task[None]] = set()
        self._reachable = True
        self.log = get_logger(component="ratelimit", limit=key)

    @property
    def keys(self) -> list[str]:
        return [f"{self.key}:starts", f"{self.key}:slots", f"{self.key}:hold"]

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a free slot and a free place in the window, site-wide, then run."""
        token = uuid.uuid4().hex
        if not await self._take(token):
            async with self._local.slot():
                yield
            return
        try:
            yield
        finally:
            await self._give_back(token)

    def hold(self, seconds: float) -> float:
        """No request of the site starts during the next `seconds` (at most MAX_HOLD)."""
        held = min(max(seconds, 0.0), MAX_HOLD)
        self._hold_until = max(self._hold_until, time.monotonic() + held)
        self._local.hold(held)
        try:
            task = asyncio.get_running_loop().create_task(self._share_hold(held))
        except RuntimeError:  # no loop: this process holds on its own
            return held
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return held

    async def _take(self, token: str) -> bool:
        """True once the slot is ours in Redis; False when Redis cannot be reached."""
        async with self._turn:
            while True:
                if (own := self._hold_until - time.monotonic()) > 0:
                    await asyncio.sleep(own)
                    continue
                try:
                    wait = int(await self._acquire(keys=self.keys, args=[
                        self.per_minute, self.max_concurrent, int(self.window * 1000), token,
                        int(self.lease * 1000), POLL_MS]))
                except RedisError as exc:
                    self._unreachable(exc)
                    return False
                self._back()
                if wait <= 0:
                    return True
                await asyncio.sleep(wait / 1000)

    async def _give_back(self, token: str) -> None:
        try:
            await self.client.zrem(f"{self.key}:slots", token)
        except RedisError as exc:  # the slot lapses after the lease
            self._unreachable(exc)

    async def _share_hold(self, held: float) -> None:
        try:
            await self._hold(keys=[f"{self.key}:hold"], args=[int(held * 1000)])
        except RedisError as exc:
            self._unreachable(exc)

    def _unreachable(self, exc: RedisError) -> None:
        if self._reachable:
            self.log.warning("shared_rate_limit_unreachable", error=str(exc),
                             fallback="this process counts its own requests until Redis is back")
        self._reachable = False

    def _back(self) -> None:
        if not self._reachable:
            self.log.info("shared_rate_limit_reachable")
        self._reachable = True


class SharedLimits:
    """The limiter factory of one worker process (traxd.ratelimit.share_limits): one Redis
    client for all its providers' limiters."""

    def __init__(self, url: str, keys: Keys) -> None:
        self.keys = keys
        self.client = aredis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT,
                                            socket_connect_timeout=CONNECT_TIMEOUT)

    def __call__(self, name: str, per_minute: int, max_concurrent: int,
                 lease: float) -> Limiter:
        return SharedRateLimiter(self.client, self.keys.limit(name), per_minute,
                                 max_concurrent, lease=lease)

    async def aclose(self) -> None:
        await self.client.aclose()
