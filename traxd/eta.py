"""How long the work left takes: in media seconds when durations are known, else in files.

A file's media duration says more about its cost than its count does (a two-hour recording
next to a one-minute memo), so the rate is media seconds done per second of wall time and
the work left is the media seconds left. A file whose duration is not known yet counts as
the mean duration of those done: with no duration known at all, the estimate is the one
counting files. When a file done had no duration (not media, a command pipeline), the
estimate counts files.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

WINDOW = 3600.0  # seconds of finishes the rate is measured over


@dataclass(frozen=True)
class Eta:
    seconds: float
    basis: Literal["media", "files"]


def estimate(known: Sequence[float], unknown: int, finished: Sequence[float | None],
             span: float) -> Eta | None:
    """The time left for the files pending (`known`: the media seconds of those whose
    duration is known; `unknown`: how many others) at the rate of `finished` (the media
    seconds of each file done in the last `span` seconds, None: not known); None when
    nothing is pending or nothing was done to measure by."""
    count = len(known) + unknown
    if not count or not finished or span <= 0:
        return None
    durations = [m for m in finished if m is not None]
    media = sum(durations)
    if len(durations) == len(finished) and media > 0:
        left = sum(max(k, 0.0) for k in known) + unknown * media / len(durations)
        return Eta(left * span / media, "media")
    return Eta(count * span / len(finished), "files")


class Throughput:
    """The files done (with their media seconds) over the last `window` seconds, on
    `clock`. The rate is measured from `started` (a batch's start) when given, else from
    the first finish in the window, over at least `min_span` seconds."""

    def __init__(self, clock: Callable[[], float] = time.time, window: float = WINDOW,
                 min_span: float = 60.0, started: float | None = None) -> None:
        self.clock, self.window, self.min_span, self.started = clock, window, min_span, started
        self._done: deque[tuple[float, float | None]] = deque()

    def finished(self, media_seconds: float | None) -> None:
        self._done.append((self.clock(), media_seconds))

    def eta(self, known: Sequence[float], unknown: int = 0) -> Eta | None:
        now = self.clock()
        while self._done and self._done[0][0] < now - self.window:
            self._done.popleft()
        if not self._done:
            return None
        since = max(self.started, now - self.window) if self.started is not None \
            else self._done[0][0]
        span = max(now - since, self.min_span)
        return estimate(known, unknown, [media for _, media in self._done], span)
