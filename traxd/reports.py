"""Per-batch reports: what a batch did, as JSON for scripts and Markdown for people.

A report is built from the batch's job ends (traxd.jobs.JobEnd) and written beside the
state (`reports/<time>-<batch_id>.json` and `.md`; `traxd batch` writes the same into its
output folder). Reports older than `report_retention` are pruned. Everything here that
touches the disk is blocking: the daemon calls it in a thread.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from traxd.folders import sidecar_path, write_atomic
from traxd.jobs import JobEnd

SLOWEST = 5  # files named as the slowest
LOW_CONFIDENCE_FILES = (3, 0.2)  # a file is flagged from 3 such segments and a fifth of all
REPORT_NAME = re.compile(r"^(\d{8}T\d{6}Z)-([A-Za-z0-9_.-]+)\.json$")
ENDED = ("done", "failed", "duplicate")


def build_report(batch_id: str, started_at: float, wall_seconds: float,
                 ends: Sequence[JobEnd], outcomes: Mapping[str, int] | None = None
                 ) -> dict[str, Any]:
    """The report of one batch. `outcomes` adds what ended otherwise (retry, waiting...)."""
    counts = {name: sum(1 for e in ends if e.outcome == name) for name in ENDED}
    others = {k: v for k, v in (outcomes or {}).items() if k not in ENDED and v}
    media = [e.media_seconds for e in ends
             if e.media_seconds is not None and e.outcome != "duplicate"]
    media_seconds = sum(media) if media else None
    return {
        "batch_id": batch_id,
        "started_at": _iso(started_at),
        "finished_at": _iso(started_at + wall_seconds),
        "wall_seconds": round(wall_seconds, 3),
        "files": len(ends) + sum(others.values()),
        **counts,
        "other_outcomes": others,
        "bytes": sum(e.size for e in ends if e.outcome != "duplicate"),
        "media_seconds": round(media_seconds, 3) if media_seconds is not None else None,
        "media_hours": round(media_seconds / 3600, 4) if media_seconds is not None else None,
        # Wall time per second of media: 0.1 means ten times faster than real time.
        "real_time_factor": (round(wall_seconds / media_seconds, 4)
                             if media_seconds else None),
        "steps": _steps(e for e in ends if e.outcome != "duplicate"),
        "failures": [_failure(e) for e in ends if e.outcome == "failed"],
        "warnings": [*(_warning(e, w) for e in ends if e.outcome == "done" for w in e.warnings),
                     *(_low_confidence(e) for e in ends if e.outcome == "done"
                       and _mostly_unsure(e))],
        "slowest": [{"inbox": e.inbox, "file": e.file, "seconds": round(e.seconds, 3),
                     "media_seconds": e.media_seconds}
                    for e in sorted((e for e in ends if e.outcome != "duplicate"),
                                    key=lambda e: e.seconds, reverse=True)[:SLOWEST]],
    }


def _steps(ends: Iterable[JobEnd]) -> dict[str, dict[str, float]]:
    steps: dict[str, dict[str, float]] = {}
    for end in ends:
        for step, seconds in end.timings.items():
            entry = steps.setdefault(step, {"seconds": 0.0, "files": 0})
            entry["seconds"] = round(entry["seconds"] + seconds, 3)
            entry["files"] += 1
    return steps


def _failure(end: JobEnd) -> dict[str, Any]:
    error = end.error or {}
    return {"inbox": end.inbox, "file": end.file, "step": error.get("step"),
            "category": error.get("category"), "reason": error.get("reason"),
            "message": error.get("message"), "attempts": error.get("attempts"),
            "path": end.final_path,
            "sidecar": str(sidecar_path(Path(end.final_path))) if end.final_path else None}


def _mostly_unsure(end: JobEnd) -> bool:
    return end.low_confidence >= LOW_CONFIDENCE_FILES[0] and \
        end.low_confidence >= LOW_CONFIDENCE_FILES[1] * end.segments


def _low_confidence(end: JobEnd) -> dict[str, Any]:
    return {"inbox": end.inbox, "file": end.file, "step": "transcribe",
            "reason": "low_confidence",
            "message": f"{end.low_confidence} of {end.segments} segments of low confidence: "
                       "check the transcript (json output: each segment's confidence)"}


def _warning(end: JobEnd, warning: Mapping[str, Any]) -> dict[str, Any]:
    return {"inbox": end.inbox, "file": end.file, "step": warning.get("step"),
            "reason": warning.get("reason"), "message": warning.get("message")}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


# --- Markdown -----------------------------------------------------------------------------


def render_markdown(report: Mapping[str, Any]) -> str:
    lines = [f"# traxd batch {report['batch_id']}", "",
             f"{report['started_at']} to {report['finished_at']} "
             f"({format_seconds(report['wall_seconds'])})", "",
             "| files | done | failed | duplicate | bytes | media | real-time factor |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| {report['files']} | {report['done']} | {report['failed']} | "
             f"{report['duplicate']} | {format_bytes(report['bytes'])} | "
             f"{_media(report)} | {_factor(report)} |"]
    if report["other_outcomes"]:
        lines += ["", "Not ended in this batch: " + ", ".join(
            f"{n} {k}" for k, n in sorted(report["other_outcomes"].items()))]
    if report["steps"]:
        lines += ["", "## Time per step", "", "| step | files | seconds |", "| --- | ---: | ---: |"]
        lines += [f"| {_cell(step)} | {v['files']} | {v['seconds']:.1f} |"
                  for step, v in report["steps"].items()]
    lines += _failure_lines(report)
    if report["warnings"]:
        lines += ["", "## Warnings", ""]
        lines += [f"- `{_code(w['inbox'])}/{_code(w['file'])}`: {_cell(w['step'] or '')}: "
                  f"{_cell(w['message'] or '')}" for w in report["warnings"]]
    if report["slowest"]:
        lines += ["", "## Slowest files", "", "| file | seconds | media seconds |",
                  "| --- | ---: | ---: |"]
        lines += [f"| `{_code(s['inbox'])}/{_code(s['file'])}` | {s['seconds']:.1f} | "
                  f"{'' if s['media_seconds'] is None else round(s['media_seconds'], 1)} |"
                  for s in report["slowest"]]
    return "\n".join(lines) + "\n"


def _failure_lines(report: Mapping[str, Any]) -> list[str]:
    if not report["failures"]:
        return []
    lines = ["", "## Failures", "", "| file | step | reason | message | sidecar |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| `{_code(f['inbox'])}/{_code(f['file'])}` | {_cell(f['step'] or '')} | "
              f"{_cell(f['reason'] or '')} | {_cell(f['message'] or '')} | "
              f"`{_code(f['sidecar'] or '')}` |" for f in report["failures"]]
    return lines


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(text: object) -> str:
    return _cell(text).replace("`", "'")


def _media(report: Mapping[str, Any]) -> str:
    seconds = report.get("media_seconds")
    return "unknown" if seconds is None else format_seconds(float(seconds))


def _factor(report: Mapping[str, Any]) -> str:
    factor = report.get("real_time_factor")
    return "" if factor is None else f"{factor:.3f}"


def format_seconds(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02} min" if hours else f"{minutes} min {secs:02} s"


def format_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


# --- files --------------------------------------------------------------------------------


def write_report(folder: Path, report: Mapping[str, Any], *, stem: str | None = None) -> Path:
    """`<folder>/<time>-<batch_id>.json` and `.md` (or `<stem>.json`/`.md`); the JSON path."""
    if stem is None:
        started = datetime.fromisoformat(str(report["started_at"]))
        stem = f"{started.strftime('%Y%m%dT%H%M%SZ')}-{report['batch_id']}"
    path = folder / f"{stem}.json"
    write_atomic(folder / f"{stem}.md", render_markdown(report).encode())
    write_atomic(path, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode())
    return path


def report_files(folder: Path) -> list[Path]:
    """The reports in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if REPORT_NAME.match(p.name))


def find_report(folder: Path, batch_id: str | None) -> Path | None:
    """The report of `batch_id` (a unique prefix is enough), or the newest for None."""
    reports = report_files(folder)
    if batch_id is None:
        return reports[-1] if reports else None
    found = [p for p in reports if (m := REPORT_NAME.match(p.name)) and
             m.group(2).startswith(batch_id)]
    return found[-1] if len(found) == 1 else None


def prune(folder: Path, retention_seconds: float, now: float) -> int:
    """Remove reports (both files) whose batch started longer ago than the retention."""
    removed = 0
    for path in report_files(folder):
        match = REPORT_NAME.match(path.name)
        assert match is not None
        started = datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        if now - started.timestamp() > retention_seconds:
            path.with_suffix(".md").unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            removed += 1
    return removed
