"""Short garbage collections while many jobs are live.

A full collection walks every object the collector tracks; with 100,000 queued jobs that is
some 200,000 objects and 100 to 250 ms with the event loop held. Jobs hold no reference cycles
(they are freed by reference counting when they end), so once they have survived they can be
frozen (`gc.freeze`): later collections skip them. What a freeze would keep by mistake is
cyclic garbage that happened to be alive at that moment; a thaw, full collection and freeze
now and then (one pause of the old length) clears it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

FREEZE_GROWTH = 5_000  # live jobs more than at the last freeze: freeze again
THAW_EVERY = 3600.0  # seconds between full collections of what was frozen


class HeapKeeper:
    """`look(live)` once in a while (the daemon's one-second beat)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 growth: int = FREEZE_GROWTH, thaw_every: float = THAW_EVERY) -> None:
        self.clock, self.growth, self.thaw_every = clock, growth, thaw_every
        self._live_at_freeze = 0
        self._thawed = clock()

    def settle(self, live: int) -> None:
        """After start-up: collect once, then freeze what is left (the jobs loaded)."""
        gc.collect()
        gc.freeze()
        self._live_at_freeze, self._thawed = live, self.clock()

    def look(self, live: int) -> None:
        if self.clock() - self._thawed >= self.thaw_every:
            gc.unfreeze()
            self.settle(live)
        elif live - self._live_at_freeze >= self.growth:
            gc.freeze()
            self._live_at_freeze = live
        elif live < self._live_at_freeze:
            self._live_at_freeze = live  # a backlog that drains: the next growth counts anew
