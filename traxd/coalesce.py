"""Many callers, one batch: requests made in the same moment are handled together.

Claims and finishes of many jobs share one journal commit, one thread hop and one fsync per
folder this way, while each job still awaits just its own result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

I = TypeVar("I")  # noqa: E741 - an item
R = TypeVar("R")
# A batch's most items: large enough to share a commit and an fsync widely, small enough
# that handling one (a transition, a metric, a log line per item) keeps the loop turn short.
MAX_BATCH = 500


class Coalescer(Generic[I, R]):
    """`await submit(item)` -> its result; `handle` gets every item pending at once.

    `handle` returns one result or exception per item, in order. Items submitted while a
    batch is handled form the next one. A caller that is cancelled does not cancel the
    batch: the others still get their results.
    """

    def __init__(self, handle: Callable[[Sequence[I]], Awaitable[Sequence[R | BaseException]]],
                 max_batch: int = MAX_BATCH) -> None:
        self._handle = handle
        self._max = max_batch
        self._items: list[tuple[I, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: I) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._items.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="coalescer")
        return await future

    async def _drain(self) -> None:
        try:
            while self._items:
                await asyncio.sleep(0)  # one turn of the loop: let the others join in
                batch, self._items = self._items[:self._max], self._items[self._max:]
                await self._run(batch)
        finally:
            self._task = None

    async def _run(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        try:
            results = await self._handle([item for item, _ in batch])
        except Exception as exc:  # the whole batch failed: each caller gets the error
            results = [exc] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def close(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
