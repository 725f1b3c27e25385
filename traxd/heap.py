"""Short garbage collections while many jobs are live.

A full collection walks every object the collector tracks; with 100,000 queued jobs that is
some 200,000 objects and 100 to 250 ms with the event loop held. Jobs hold no reference cycles
(they are freed by reference counting when they end), so once they have survived they can be
frozen (`gc.freeze`): later collections skip them. Every transition makes a new Job object,
so what counts is how many were made since the last freeze, not how many are live: a backlog
whose 100,000 jobs all moved from seen to queued is 100,000 objects the collector walks again.
What a freeze would keep by mistake is cyclic garbage that happened to be alive at that
moment; a thaw, full collection and freeze now and then (one pause of the old length) clears
it. With fewer than `growth` live jobs nothing is frozen: their collections are short.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

FREEZE_GROWTH = 5_000  # job objects made since the last freeze: freeze again
THAW_EVERY = 3600.0  # seconds between full collections of what was frozen


class HeapKeeper:
    """`look(live)` once in a while (the daemon's one-second beat)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 growth: int = FREEZE_GROWTH, thaw_every: float = THAW_EVERY) -> None:
        self.clock, self.growth, self.thaw_every = clock, growth, thaw_every
        self._made_at_freeze = 0
        self._thawed = clock()

    def settle(self, made: int) -> None:
        """After start-up: collect once, then freeze what is left (the jobs loaded)."""
        gc.collect()
        gc.freeze()
        self._made_at_freeze, self._thawed = made, self.clock()

    def look(self, live: int, made: int) -> None:
        """`live`: jobs in memory now; `made`: job objects made so far (the journal's
        transitions)."""
        if self.clock() - self._thawed >= self.thaw_every:
            gc.unfreeze()
            self.settle(made)
        elif live >= self.growth and made - self._made_at_freeze >= self.growth:
            gc.freeze()
            self._made_at_freeze = made
