"""The event loop's lag is measured: a blocked loop shows in traxd_event_loop_lag_seconds."""

from __future__ import annotations

import asyncio
import time

from traxd import metrics
from traxd.looplag import watch_loop_lag


def lag_count_over(seconds: float) -> float:
    """How many lag samples were longer than `seconds` (a bucket boundary)."""
    [family] = list(metrics.EVENT_LOOP_LAG.collect())
    buckets = {float(s.labels["le"]): float(s.value) for s in family.samples
               if s.name.endswith("_bucket")}
    return buckets[float("inf")] - buckets[seconds]


async def test_a_blocked_loop_shows_in_the_lag_histogram() -> None:
    # Given the lag probe running
    before = lag_count_over(0.25)
    probe = asyncio.create_task(watch_loop_lag(interval=0.01))
    await asyncio.sleep(0.05)
    # When something holds the loop for 0.4 s
    time.sleep(0.4)  # the blocking under test, not synchronisation
    async with asyncio.timeout(5):
        while lag_count_over(0.25) == before:
            await asyncio.sleep(0.01)
    probe.cancel()
    # Then one sample of more than 0.25 s was recorded
    assert lag_count_over(0.25) == before + 1
