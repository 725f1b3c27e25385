"""A real Prometheus scraping a real `traxd run`: the counts move as files are processed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import (
    base_daemon,
    copy_step,
    files_under,
    running_daemon,
    wait_until,
    write_config,
)
from tests.ops.conftest import PrometheusFactory, free_port, http_get

pytestmark = pytest.mark.integration


def sample(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == want:
            return float(match.group(2))
    return None


def _scraped_with(url: str, name: str, count: float) -> str | None:
    """/metrics, once its `name` series of inbox main has reached `count`; else None."""
    _, text = http_get(f"{url}/metrics")
    return text if (sample(text, name, inbox="main") or 0) >= count and (
        sample(text, "traxd_jobs_completed_total", inbox="main", outcome="failed") or 0) >= 1 \
        else None


def test_metrics_move_and_prometheus_scrapes_the_daemon(tmp_path: Path,
                                                         prometheus: PrometheusFactory) -> None:
    # Given a daemon serving /metrics on a free port
    port = free_port()
    root = tmp_path / "box"
    (root / "inbox").mkdir(parents=True)
    config = write_config(tmp_path / "traxd.toml", base_daemon(
        tmp_path, metrics_address=f"127.0.0.1:{port}"), [{
            "name": "main", "path": str(root / "inbox"),
            "pipeline": [{"command": copy_step(tmp_path / "ledger")}]}])
    url = f"http://127.0.0.1:{port}"
    with running_daemon(config, tmp_path / "log"):
        assert http_get(f"{url}/healthz")[0] == 200
        assert http_get(f"{url}/readyz")[0] == 200
        _, before = http_get(f"{url}/metrics")
        assert 'traxd_build_info{version="' in before
        assert sample(before, "traxd_jobs_completed_total", inbox="main", outcome="done") == 0
        # When two files are processed and one fails
        for name, data in (("a.mp3", b"a"), ("b.mp3", b"b"), ("bad.mp3", b"FAIL")):
            (root / "inbox" / name).write_bytes(data)
        wait_until(lambda: len(files_under(root / "done")) == 2
                   and "bad.mp3" in files_under(root / "failed"), 30, message="processed")
        # Then /metrics counts them (a job is counted once the journal has it finished,
        # just after its file moved)
        after = wait_until(lambda: _scraped_with(url, "traxd_job_duration_seconds_count", 2),
                           30, message="both jobs counted")
        assert after is not None
        assert sample(after, "traxd_jobs_completed_total", inbox="main", outcome="done") == 2
        assert sample(after, "traxd_jobs_completed_total", inbox="main", outcome="failed") == 1
        assert sample(after, "traxd_files_discovered_total", inbox="main") == 3
        assert sample(after, "traxd_bytes_processed_total", inbox="main") == 2
        assert sample(after, "traxd_job_duration_seconds_count", inbox="main") == 2
        # And a real Prometheus scraping the daemon answers a query on them
        server = prometheus([f"127.0.0.1:{port}"])
        result = server.wait_for_sample('traxd_jobs_completed_total{outcome="done"}')
        assert float(result[0]["value"][1]) == 2


def test_series_known_at_start_are_exported_from_the_start(tmp_path: Path) -> None:
    # Given a daemon with two inboxes, one using the openai backend, that did one file
    port = free_port()
    roots = {name: tmp_path / name for name in ("main", "talks")}
    for root in roots.values():
        (root / "inbox").mkdir(parents=True)
    config = write_config(tmp_path / "traxd.toml", base_daemon(
        tmp_path, metrics_address=f"127.0.0.1:{port}"), [
            {"name": "main", "path": str(roots["main"] / "inbox"),
             "pipeline": [{"command": copy_step(tmp_path / "ledger")}]},
            {"name": "talks", "path": str(roots["talks"] / "inbox"),
             "pipeline": ["preprocess", "transcribe"]}],
        transcribe={"backend": "openai", "base_url": "http://127.0.0.1:9/v1"})
    url = f"http://127.0.0.1:{port}"
    with running_daemon(config, tmp_path / "log"):
        (roots["main"] / "inbox" / "a.mp3").write_bytes(b"a")
        wait_until(lambda: files_under(roots["main"] / "done") == ["a.mp3"], 30, message="done")
        wait_until(lambda: sample(http_get(f"{url}/metrics")[1],
                                  "traxd_last_success_timestamp_seconds", inbox="main"), 10,
                   message="last success")
        done_at = sample(http_get(f"{url}/metrics")[1], "traxd_last_success_timestamp_seconds",
                         inbox="main")
    # When it is started again and scraped before anything happens
    with running_daemon(config, tmp_path / "log2"):
        _, text = http_get(f"{url}/metrics")
    # Then every series whose labels are known is there, at 0 ...
    for inbox in roots:
        for outcome in ("done", "failed", "duplicate"):
            assert sample(text, "traxd_jobs_completed_total", inbox=inbox,
                          outcome=outcome) == 0, (inbox, outcome)
        for name in ("traxd_files_discovered_total", "traxd_reconcile_found_total",
                     "traxd_inbox_paused", "traxd_queue_depth", "traxd_jobs_in_progress"):
            assert sample(text, name, inbox=inbox) == 0, (name, inbox)
    assert sample(text, "traxd_backend_paused", backend="openai") == 0
    assert sample(text, "traxd_throttled", reason="disk_full") == 0
    # ... the last success is the one before the restart, and nothing is `_created`
    assert sample(text, "traxd_last_success_timestamp_seconds",
                  inbox="main") == pytest.approx(done_at, abs=1)
    assert sample(text, "traxd_last_success_timestamp_seconds", inbox="talks") is None
    assert "_created" not in text
