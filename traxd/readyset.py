"""The one queue: queued jobs in the order they run (inbox priority, then largest first).

Jobs the journal queues wait in `fresh` until the batch tick releases them; jobs with a
back-off wait in `deferred` until due. Released jobs sit in one heap per inbox, and `pop`
takes the best head among the inboxes open now. Entries are never searched for: a job that
left the queued state is skipped when it surfaces (`is_current` says whether it still is).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection
from typing import NamedTuple

OrderKey = tuple[int, int, int]  # (priority, -size, id)


class Entry(NamedTuple):
    """A queued job in the ready set. Entries compare as the order the jobs run in (the
    first three fields: lower priority value first, then the largest file first (LPT), then
    the oldest); the id is unique, so the rest never takes part. A plain tuple: small, and
    left alone by the garbage collector."""

    priority: int
    neg_size: int
    job_id: int
    version: int  # which time the job was queued: an older entry of the same job is stale
    inbox: str
    not_before: float

    @property
    def key(self) -> OrderKey:
        return (self.priority, self.neg_size, self.job_id)


def order_key(priority: int, size: int, job_id: int) -> OrderKey:
    """The order jobs run in (Entry compares the same way)."""
    return (priority, -size, job_id)


class ReadySet:
    def __init__(self, is_current: Callable[[Entry], bool]) -> None:
        self._is_current = is_current
        self._fresh: list[Entry] = []
        self._deferred: list[tuple[float, int, Entry]] = []
        self._heaps: dict[str, list[Entry]] = {}

    def add(self, entry: Entry) -> None:
        """A job became queued; it runs after the next release."""
        self._fresh.append(entry)

    def release(self, now: float, limit: int | None = None) -> list[Entry]:
        """Make fresh and due deferred jobs available to `pop`; returns those released.
        With `limit`, at most that many fresh ones (`waiting` says whether more are left)."""
        released: list[Entry] = []
        cut = len(self._fresh) if limit is None else limit
        fresh, self._fresh = self._fresh[:cut], self._fresh[cut:]
        for entry in fresh:
            if entry.not_before > now:
                heapq.heappush(self._deferred, (entry.not_before, entry.job_id, entry))
            elif self._is_current(entry):
                released.append(entry)
        while self._deferred and self._deferred[0][0] <= now:
            entry = heapq.heappop(self._deferred)[2]
            if self._is_current(entry):
                released.append(entry)
        by_inbox: dict[str, list[Entry]] = {}
        for entry in released:
            by_inbox.setdefault(entry.inbox, []).append(entry)
        for inbox, items in by_inbox.items():
            self._merge(self._heaps.setdefault(inbox, []), items)
        return released

    @staticmethod
    def _merge(heap: list[Entry], items: list[Entry]) -> None:
        """Add many at once in linear time (a whole archive released by one tick); a few,
        one by one."""
        if len(items) > len(heap) // 8:
            heap.extend(items)
            heapq.heapify(heap)
        else:
            for item in items:
                heapq.heappush(heap, item)

    def pop(self, inboxes: Collection[str]) -> Entry | None:
        """The next job to run among these inboxes, or None."""
        best: list[Entry] | None = None
        for name in inboxes:
            heap = self._heaps.get(name)
            while heap and not self._is_current(heap[0]):
                heapq.heappop(heap)
            if heap and (best is None or heap[0] < best[0]):
                best = heap
        return heapq.heappop(best) if best else None

    @property
    def waiting(self) -> bool:
        """Whether fresh entries wait for a release."""
        return bool(self._fresh)
