"""The daemon with two real `traxd worker` processes over a real redis-server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.kit import RedisServer, Site, block_step, free_port, make_site
from tests.faults.kit import log_events
from tests.helpers import copy_step, files_under, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_files_run_on_both_workers_and_each_log_names_its_jobs(
        short_root: Path, redis_server: RedisServer, site_factory: list[Site]) -> None:
    ledger = short_root / "ledger.txt"
    site = make_site(site_factory, short_root, redis_server,
                 [{"command": copy_step(ledger, 1.0)}], daemon={"workers": 4})
    first, second = site.worker(), site.worker()
    site.daemon.start()
    names = [f"talk{i}.txt" for i in range(6)]
    site.drop(names)
    site.wait_done(names)
    assert set(files_under(site.box.outputs)) == set(names)
    assert Counter(ledger.read_text().split()) == Counter(names)  # each ran once
    ran = first.files_run() + second.files_run()
    assert sorted(ran) == sorted(names)  # every step ran on a worker...
    assert first.files_run() and second.files_run()  # ...and both took some
    for worker in (first, second):
        received = worker.events_named("step_received")
        assert all(e["job_id"] and e["inbox"] == "main" and e["step"] == "command"
                   for e in received)
    daemon_events = [e.get("event") for e in log_events(site.daemon.log)]
    assert "step_started" not in daemon_events  # nothing ran inside the daemon
    assert daemon_events.count("step_sent") == len(names)


def test_status_and_metrics_show_workers_queues_and_steps_in_flight(
        short_root: Path, redis_server: RedisServer, site_factory: list[Site]) -> None:
    ledger, marker = short_root / "ledger.txt", short_root / "go"
    port = free_port()
    site = make_site(site_factory, short_root, redis_server,
                     [{"command": block_step(ledger, marker)}],
                     daemon={"workers": 2, "metrics_address": f"127.0.0.1:{port}"})
    worker = site.worker()
    site.daemon.start()
    site.drop(["a.txt", "b.txt"])

    def status() -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "traxd", "status", "--json", "--config",
                              str(site.config)], capture_output=True, text=True, check=True)
        data: dict[str, Any] = json.loads(out.stdout)
        return data

    def busy_view() -> dict[str, Any] | None:
        cluster = status().get("cluster") or {}
        ok = [w for w in cluster.get("workers", []) if w["busy"] == 1] and \
            cluster.get("queues", {}).get("traxd.cpu") == 1
        return cluster if ok else None

    cluster = wait_until(busy_view, 30, message="a busy worker and one queued step")
    assert cluster is not None
    (seen,) = cluster["workers"]
    assert seen["worker"] == f"{socket.gethostname()}:{worker.pid}" and seen["alive"]
    assert seen["queues"] == ["cpu", "gpu", "net"] and len(seen["steps"]) == 1
    flights = {f["file"]: f["worker"] for f in cluster["in_flight"]}
    assert sorted(flights) == ["a.txt", "b.txt"]
    assert sorted(map(str, flights.values())) == sorted([seen["worker"], "None"])
    text = subprocess.run([sys.executable, "-m", "traxd", "status", "--config",
                           str(site.config)], capture_output=True, text=True, check=True).stdout
    assert "Workers" in text and "Steps in flight" in text and "traxd.cpu 1" in text
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    body = scrape.decode()
    assert "traxd_workers_alive 1.0" in body
    assert f'traxd_worker_busy{{worker="{seen["worker"]}"}} 1.0' in body
    assert 'traxd_cluster_queue_depth{queue="traxd.cpu"} 1.0' in body
    marker.touch()
    site.wait_done(["a.txt", "b.txt"])
