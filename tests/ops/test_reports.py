"""Per-batch reports: written by a real daemon (command steps, a preprocess step on real
media, a failure, a duplicate), shown by `traxd report`, pruned, and written by
`traxd batch` into its output folder."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults.kit import ffmpeg
from tests.helpers import DaemonProcess, base_daemon, copy_step, wait_until, write_config
from traxd.jobs import JobEnd
from traxd.reports import build_report, find_report, prune, render_markdown, write_report


def traxd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "traxd", *args], capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ,
                                                                   "COLUMNS": "200"})


def reports_in(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def total(reports: list[dict[str, Any]], key: str) -> int:
    return sum(int(r[key]) for r in reports)


@pytest.mark.integration
def test_daemon_writes_a_report_per_batch(tmp_path: Path) -> None:
    docs, talks = tmp_path / "docs" / "inbox", tmp_path / "talks" / "inbox"
    docs.mkdir(parents=True)
    talks.mkdir(parents=True)
    (docs / "a.txt").write_bytes(b"alpha")
    (docs / "b.txt").write_bytes(b"beta")
    (docs / "bad.txt").write_bytes(b"FAIL: refuse")
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=3", str(talks / "tone.wav"))
    ledger = tmp_path / "ledger"
    config = write_config(
        tmp_path / "traxd.toml", base_daemon(tmp_path, batch_interval="1s", max_retries=0),
        [{"name": "docs", "path": str(docs), "pipeline": [{"command": copy_step(ledger)}]},
         {"name": "talks", "path": str(talks),
          "pipeline": ["preprocess", {"command": copy_step(ledger)}]}])
    folder = tmp_path / "state" / "reports"
    daemon = DaemonProcess(config, tmp_path / "daemon.log").start()
    try:
        wait_until(lambda: total(reports_in(folder), "files") == 4, 90, message="4 reported")
        (docs / "again.txt").write_bytes(b"alpha")  # the content of a.txt, done already
        wait_until(lambda: total(reports_in(folder), "duplicate") == 1, 60,
                   message="the duplicate reported")
    finally:
        daemon.stop()
    reports = reports_in(folder)
    assert total(reports, "done") == 3 and total(reports, "failed") == 1
    tone = (tmp_path / "talks" / "done" / "tone.wav").stat().st_size
    assert sum(r["bytes"] for r in reports) == len(b"alpha" b"beta" b"FAIL: refuse") + tone
    media = next(r for r in reports if r["media_seconds"])
    assert media["media_seconds"] == pytest.approx(3.0, abs=0.1)
    assert media["real_time_factor"] == pytest.approx(media["wall_seconds"] / 3.0, rel=0.01)
    assert {"preprocess", "command"} <= set(media["steps"])
    failure = next(f for r in reports for f in r["failures"])
    assert failure["file"] == "bad.txt" and "refusing to copy" in failure["message"]
    assert Path(failure["sidecar"]).is_file()
    assert any(s["file"] == "tone.wav" for r in reports for s in r["slowest"])
    markdown = next(folder.glob("*.md")).read_text()
    assert markdown.startswith("# traxd batch ")
    # traxd report: the last one, one by id prefix, as JSON and as tables
    last = traxd("report", "--last", "--json", "--config", str(config))
    assert last.returncode == 0, last.stderr
    assert json.loads(last.stdout)["duplicate"] == 1
    with_failure = next(r for r in reports if r["failed"])
    shown = traxd("report", with_failure["batch_id"][:6], "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert "Failures" in shown.stdout and "bad.txt" in shown.stdout
    missing = traxd("report", "nosuchbatch", "--config", str(config))
    assert missing.returncode == 1 and "no report" in missing.stderr


def end(index: int, outcome: str = "done", seconds: float = 1.0) -> JobEnd:
    return JobEnd(index, "docs", f"f{index}.mp3", outcome, 1000, seconds, f"/x/{index}",
                  media_seconds=60.0, timings={"preprocess": 0.5, "transcribe": seconds})


def test_reports_are_pruned_after_the_retention(tmp_path: Path) -> None:
    now = time.time()
    old = build_report("old", now - 91 * 86400, 5.0, [end(1)])
    new = build_report("new", now - 89 * 86400, 5.0, [end(2)])
    for report in (old, new):
        write_report(tmp_path, report)
    assert prune(tmp_path, 90 * 86400, now) == 1
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md"]
    found = find_report(tmp_path, None)
    assert found is not None and "new" in found.name


def test_report_figures_and_markdown() -> None:
    guard = {"step": "enhance", "reason": "enhancement_rejected", "message": "words 0-900"}
    ends = [end(1, seconds=2.0), dataclasses.replace(end(2, seconds=9.0), warnings=(guard,)),
            end(3, "duplicate"),
            JobEnd(4, "docs", "bad|name.mp3", "failed", 10, 0.1, "/x/failed/bad|name.mp3",
                   error={"step": "transcribe", "reason": "undecodable", "message": "no audio"})]
    report = build_report("b1", 1_700_000_000.0, 30.0, ends, {"retry": 1})
    assert (report["done"], report["failed"], report["duplicate"]) == (2, 1, 1)
    assert report["files"] == 5 and report["other_outcomes"] == {"retry": 1}
    assert report["media_seconds"] == 120.0  # not the duplicate
    assert report["real_time_factor"] == pytest.approx(0.25)
    assert report["steps"]["transcribe"] == {"seconds": 11.0, "files": 2}
    assert report["slowest"][0]["file"] == "f2.mp3"
    assert report["failures"][0]["sidecar"] == "/x/failed/bad|name.mp3.error.json"
    assert report["warnings"] == [{"inbox": "docs", "file": "f2.mp3", **guard}]
    markdown = render_markdown(report)
    assert "bad\\|name.mp3" in markdown and "| 5 | 2 | 1 | 1 |" in markdown
    assert "## Warnings" in markdown and "words 0-900" in markdown


def test_traxd_batch_writes_the_report_into_its_output(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", {"state_dir": str(tmp_path / "state")}, [{
        "name": "x", "path": str(tmp_path / "unused" / "inbox"),
        "pipeline": [{"command": copy_step(tmp_path / "ledger")}]}])
    folder = tmp_path / "talks"
    folder.mkdir()
    for name, content in (("a.mp3", b"a"), ("b.mp3", b"bb"), ("bad.mp3", b"FAIL")):
        (folder / name).write_bytes(content)
    result = traxd("batch", str(folder), "--config", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    out = tmp_path / "talks.transcripts"
    report = json.loads((out / "report.json").read_text())
    assert (report["files"], report["done"], report["failed"], report["bytes"]) == (3, 2, 1, 7)
    assert report["failures"][0]["file"] == "bad.mp3"
    assert report["failures"][0]["sidecar"] == str(out / "failed.jsonl")
    assert report["steps"]["command"]["files"] == 2
    assert "## Failures" in (out / "report.md").read_text()
    shown = traxd("report", str(out / "report.json"))
    assert shown.returncode == 0 and "bad.mp3" in shown.stdout


def test_a_file_with_many_low_confidence_segments_is_a_quality_warning() -> None:
    # Given a transcript with 5 of 20 segments of low confidence, and one with 2 of 20
    unsure = dataclasses.replace(end(1), segments=20, low_confidence=5)
    fine = dataclasses.replace(end(2), segments=20, low_confidence=2)
    # Then only the first is named among the report's warnings
    report = build_report("b2", 1_700_000_000.0, 10.0, [unsure, fine])
    assert [(w["file"], w["reason"]) for w in report["warnings"]] == [
        ("f1.mp3", "low_confidence")]
    assert "5 of 20 segments" in report["warnings"][0]["message"]
