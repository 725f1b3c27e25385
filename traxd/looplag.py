"""How late the event loop wakes up: a blocked loop shows here before anything else."""

from __future__ import annotations

import asyncio

from traxd import metrics

LAG_INTERVAL = 0.25  # seconds between probes


async def watch_loop_lag(interval: float = LAG_INTERVAL) -> None:
    """Sleep `interval`, record how much later than asked the loop woke; until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time() + interval
        await asyncio.sleep(interval)
        metrics.EVENT_LOOP_LAG.observe(max(0.0, loop.time() - asked))
