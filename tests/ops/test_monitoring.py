"""Grafana dashboard, Prometheus alert rules, and a real Prometheus scraping the exporter."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ops.conftest import REPO, FakeHealth, PrometheusFactory
from traxd import __version__, metrics
from traxd.exporter import HttpServerHandle, start_http

GRAFANA = REPO / "grafana"
DASHBOARD = GRAFANA / "traxd-dashboard.json"
ALERTS = GRAFANA / "alerts.yml"
METRIC_NAME = re.compile(r"\btraxd_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "info": ("_info",), "gauge": ("",), "summary": ("", "_sum", "_count")}
ALERT_NAMES = {"TraxdDown", "TraxdBackendPaused", "TraxdQueueNotDraining",
               "TraxdFailureRatioHigh", "TraxdNoSuccess"}


def exposed_names() -> set[str]:
    """Every series name traxd.metrics can expose, labelled metrics with no samples too."""
    names: set[str] = set()
    for family in metrics.REGISTRY.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed")
    return binary


# --- names -------------------------------------------------------------------------------


def test_exposed_names_follow_the_exposition_rules() -> None:
    names = exposed_names()
    assert {"traxd_jobs_completed_total", "traxd_job_duration_seconds_bucket",
            "traxd_build_info", "traxd_queue_depth"} <= names
    assert "traxd_jobs_completed" not in names


def test_every_metric_in_the_dashboard_exists() -> None:
    used = {name for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    assert len(used) >= 12
    assert used - exposed_names() == set()


def test_every_metric_in_the_alert_rules_exists() -> None:
    used = set(METRIC_NAME.findall(ALERTS.read_text()))
    assert used
    assert used - exposed_names() == set()


def test_the_name_check_catches_a_misspelt_metric() -> None:
    assert {"traxd_jobs_complete_total"} - exposed_names() == {"traxd_jobs_complete_total"}


# --- dashboard ---------------------------------------------------------------------------


def test_dashboard_is_provisioning_ready() -> None:
    board = dashboard()
    assert board["uid"] == "traxd"
    assert "__inputs" not in board and "__requires" not in board
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_every_panel_queries_the_chosen_datasource() -> None:
    for panel in dashboard()["panels"]:
        for item in [panel, *panel["targets"]]:
            assert item["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel


def test_dashboard_covers_the_operators_questions() -> None:
    exprs = "\n".join(dashboard_exprs())
    for needle in ["rate(traxd_jobs_completed_total", "traxd_queue_depth",
                   "traxd_jobs_in_progress", "histogram_quantile(0.9, sum by (le) "
                   "(rate(traxd_job_duration_seconds_bucket",
                   "traxd_step_duration_seconds_bucket", "traxd_job_retries_total",
                   "traxd_throttled", "traxd_backend_paused", "traxd_media_seconds_total",
                   "time() - max by (inbox) (traxd_last_success_timestamp_seconds"]:
        assert needle in exprs


def test_provisioning_files_point_at_the_dashboard_folder() -> None:
    dashboards = (GRAFANA / "provisioning/dashboards/traxd.yml").read_text()
    datasources = (GRAFANA / "provisioning/datasources/prometheus.yml").read_text()
    assert "apiVersion: 1" in dashboards and "type: file" in dashboards
    assert "type: prometheus" in datasources


# --- alert rules -------------------------------------------------------------------------


def test_promtool_accepts_the_alert_rules() -> None:
    done = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout + done.stderr


def test_promtool_accepts_the_example_prometheus_config() -> None:
    done = subprocess.run([promtool(), "check", "config", str(GRAFANA / "prometheus.yml")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(ALERTS.read_text().replace("== 0", "=== 0", 1))
    done = subprocess.run([promtool(), "check", "rules", str(broken)], capture_output=True,
                          text=True, check=False)
    assert done.returncode != 0


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in {"instance": "a", "job": "traxd", **labels}.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


INPUT_SERIES = [
    series("up", "1 1 0x10"),
    series("traxd_backend_paused", "0 1x10", backend="openai"),
    series("traxd_queue_depth", "3x500", inbox="stuck"),
    series("traxd_jobs_in_progress", "0x500", inbox="stuck"),
    series("traxd_last_success_timestamp_seconds", "0x500", inbox="stuck"),
    series("traxd_queue_depth", "3x500", inbox="held"),  # paused on purpose: no alert
    series("traxd_inbox_paused", "1x500", inbox="held"),
    series("traxd_inbox_paused", "0x500", inbox="stuck"),
    series("traxd_queue_depth", "3x150", inbox="busy"),
    series("traxd_jobs_completed_total", "0+1x150", inbox="busy", outcome="done"),
    series("traxd_jobs_completed_total", "0+1x150", inbox="bad", outcome="done"),
    series("traxd_jobs_completed_total", "0+1x150", inbox="bad", outcome="failed"),
]

EXPECTED = {
    "TraxdDown": ("10m", {"severity": "critical", "job": "traxd", "instance": "a"}, {
        "summary": "traxd on a is down",
        "description": "Prometheus has not scraped traxd on a for 5 minutes. Check `systemctl "
                       "status traxd` (or `journalctl -u traxd`) and `traxd doctor`."}),
    "TraxdBackendPaused": ("10m", {"severity": "warning", "instance": "a", "backend": "openai"}, {
        "summary": "traxd backend openai is paused on a",
        "description": "A fatal error (bad or missing API key, missing model) paused the openai "
                       "backend; its files wait. `traxd status` says why; fix it and run "
                       "`traxd resume`."}),
    "TraxdQueueNotDraining": ("150m", {"severity": "warning", "instance": "a", "inbox": "stuck"}, {
        "summary": "traxd inbox stuck is not draining on a",
        "description": "3 jobs are queued in stuck and none has finished for over an hour "
                       "(an inbox paused or drained on purpose is left out). Expected outside "
                       "its schedule window; otherwise see `traxd status` (throttling, paused "
                       "backends)."}),
    "TraxdFailureRatioHigh": ("150m", {"severity": "warning", "instance": "a", "inbox": "bad"}, {
        "summary": "traxd fails 50% of jobs in bad",
        "description": "More than 20% of the jobs finished in the last hour in bad on a failed. "
                       "See failed/*.error.json beside the inbox."}),
    "TraxdNoSuccess": ("7h", {"severity": "warning", "instance": "a", "inbox": "stuck"}, {
        "summary": "traxd finished nothing in stuck for 6 hours",
        "description": "stuck on a has work but no job has been done for more than 6 hours "
                       "(7h 0m 0s since the last)."}),
}

# moments where the alert must be silent: before `for:` has passed, or not yet the symptom
QUIET = [("TraxdDown", "3m"), ("TraxdBackendPaused", "3m"), ("TraxdQueueNotDraining", "30m"),
         ("TraxdNoSuccess", "5h")]


def alert_tests(rules: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """A `promtool test rules` file (JSON is YAML)."""
    firing = [{"eval_time": when, "alertname": name,
               "exp_alerts": [{"exp_labels": labels, "exp_annotations": annotations}]}
              for name, (when, labels, annotations) in expected.items()]
    quiet = [{"eval_time": when, "alertname": name, "exp_alerts": []} for name, when in QUIET]
    return {"rule_files": [str(rules)], "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": INPUT_SERIES,
                       "alert_rule_test": firing + quiet}]}


def promtool_test(tmp_path: Path, expected: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(json.dumps(alert_tests(ALERTS, expected)))
    return subprocess.run([promtool(), "test", "rules", str(spec)], capture_output=True,
                          text=True, check=False)


def test_alerts_fire_on_their_symptom_and_only_then(tmp_path: Path) -> None:
    """promtool's rule unit tests: labels, annotations, `for:` and healthy inboxes."""
    done = promtool_test(tmp_path, EXPECTED)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_alert_unit_test_can_fail(tmp_path: Path) -> None:
    wrong = {**EXPECTED, "TraxdQueueNotDraining": (
        "150m", {"severity": "warning", "instance": "a", "inbox": "busy"},
        EXPECTED["TraxdQueueNotDraining"][2])}
    assert promtool_test(tmp_path, wrong).returncode != 0


# --- a real Prometheus -------------------------------------------------------------------


@pytest.fixture
def exporter() -> Iterator[HttpServerHandle]:
    metrics.publish_known([], [], {})
    handle = start_http("127.0.0.1:0", FakeHealth())
    yield handle
    handle.close()


@pytest.mark.integration
def test_prometheus_scrapes_the_exporter_and_loads_the_rules(
        prometheus: PrometheusFactory, exporter: HttpServerHandle) -> None:
    # Given a real Prometheus scraping the exporter every second, with traxd's alert rules
    server = prometheus([f"127.0.0.1:{exporter.port}"], rule_files=[ALERTS])

    # When it has scraped, Then traxd_build_info is queryable with the version
    samples = server.wait_for_sample("traxd_build_info")
    assert samples[0]["metric"]["version"] == __version__
    assert server.query('up{job="traxd"} == 1')

    # And every alert rule was loaded by the real server
    groups = server.api("/api/v1/rules")["data"]["groups"]
    assert {rule["name"] for group in groups for rule in group["rules"]} == ALERT_NAMES
