"""What the status page shows of the past: the last files that ended, and files done and
failed per hour over the last day. Fed with job ends on the event loop; memory only."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from traxd.jobs import JobEnd

RECENT_FILES = 30
HOURS = 24


@dataclass(frozen=True)
class Ended:
    at: float
    inbox: str
    file: str
    outcome: str
    seconds: float
    step: str | None
    reason: str | None
    message: str | None


class History:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.recent: deque[Ended] = deque(maxlen=RECENT_FILES)
        self._hours: dict[int, dict[str, int]] = {}  # hour number since the epoch -> counts

    def add(self, end: JobEnd) -> None:
        now = self.clock()
        error = end.error or {}
        self.recent.appendleft(Ended(now, end.inbox, end.file, end.outcome, end.seconds,
                                     error.get("step"), error.get("reason"),
                                     error.get("message")))
        hour = int(now // 3600)
        counts = self._hours.setdefault(hour, {})
        counts[end.outcome] = counts.get(end.outcome, 0) + 1
        for old in [h for h in self._hours if h <= hour - HOURS]:
            del self._hours[old]

    def throughput(self) -> list[dict[str, Any]]:
        """The last 24 hours, oldest first: {"hour": start time, "done": n, "failed": n}."""
        current = int(self.clock() // 3600)
        return [{"hour": float(h * 3600), "done": self._hours.get(h, {}).get("done", 0),
                 "failed": self._hours.get(h, {}).get("failed", 0)}
                for h in range(current - HOURS + 1, current + 1)]

    def snapshot(self) -> dict[str, Any]:
        return {"recent": [vars(e) for e in self.recent], "throughput": self.throughput()}
