"""The throughput chart's geometry: one bar per hour, done below failed, as SVG numbers."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

WIDTH, HEIGHT, GAP = 480, 80, 2


def throughput_bars(hours: Sequence[dict[str, Any]]) -> dict[str, Any]:
    peak = max((int(h["done"]) + int(h["failed"]) for h in hours), default=0)
    step = WIDTH / max(1, len(hours))
    bars = []
    for index, hour in enumerate(hours):
        done, failed = int(hour["done"]), int(hour["failed"])
        done_h = HEIGHT * done / peak if peak else 0.0
        failed_h = HEIGHT * failed / peak if peak else 0.0
        start = datetime.fromtimestamp(float(hour["hour"])).astimezone().strftime("%H:00")
        bars.append({
            "x": round(index * step, 1), "width": round(step - GAP, 1),
            "done_y": round(HEIGHT - done_h, 1), "done_h": round(done_h, 1),
            "failed_y": round(HEIGHT - done_h - failed_h, 1), "failed_h": round(failed_h, 1),
            "label": f"{start}: {done} done, {failed} failed"})
    total = sum(int(h["done"]) for h in hours)
    return {"width": WIDTH, "height": HEIGHT, "bars": bars, "peak": peak, "done": total,
            "failed": sum(int(h["failed"]) for h in hours)}
