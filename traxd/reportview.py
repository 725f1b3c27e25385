"""`traxd report`: one batch's report (see traxd.reports) as rich tables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from traxd.reports import format_bytes, format_seconds


def report_renderable(report: Mapping[str, Any]) -> RenderableType:
    parts: list[RenderableType] = [_headline(report), _counts(report)]
    if report.get("steps"):
        table = _table("Time per step", ("Step", "Files", "Seconds"))
        for step, entry in report["steps"].items():
            table.add_row(step, str(entry["files"]), f"{entry['seconds']:.1f}")
        parts.append(table)
    if report.get("failures"):
        table = _table("Failures", ("File", "Step", "Reason", "Message"))
        for failure in report["failures"]:
            table.add_row(f"{failure['inbox']}/{failure['file']}", failure["step"] or "",
                          Text(failure["reason"] or "", style="red"), failure["message"] or "")
        parts.append(table)
        parts.append(Text("Sidecars: " + ", ".join(
            f["sidecar"] for f in report["failures"] if f.get("sidecar")), style="dim"))
    if report.get("warnings"):
        table = _table("Warnings", ("File", "Step", "Message"))
        for warning in report["warnings"]:
            table.add_row(f"{warning['inbox']}/{warning['file']}", warning["step"] or "",
                          warning["message"] or "")
        parts.append(table)
    if report.get("slowest"):
        table = _table("Slowest files", ("File", "Seconds", "Media"))
        for entry in report["slowest"]:
            media = entry.get("media_seconds")
            table.add_row(f"{entry['inbox']}/{entry['file']}", f"{entry['seconds']:.1f}",
                          "-" if media is None else format_seconds(media))
        parts.append(table)
    return Group(*parts)


def _headline(report: Mapping[str, Any]) -> Text:
    line = Text(f"batch {report['batch_id']}", style="bold")
    line.append(f"  {report['started_at']}  {format_seconds(report['wall_seconds'])}")
    return line


def _counts(report: Mapping[str, Any]) -> Table:
    table = _table("Files", ("Files", "Done", "Failed", "Duplicate", "Bytes", "Media",
                             "Real-time factor"))
    media = report.get("media_seconds")
    factor = report.get("real_time_factor")
    table.add_row(str(report["files"]), Text(str(report["done"]), style="green"),
                  Text(str(report["failed"]), style="red" if report["failed"] else ""),
                  str(report["duplicate"]), format_bytes(report["bytes"]),
                  "unknown" if media is None else format_seconds(media),
                  "-" if factor is None else f"{factor:.3f}")
    return table


def _table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table
