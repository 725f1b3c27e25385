"""Exactly once in effect on a cluster: a worker SIGKILLed mid-step, Redis restarted
mid-batch, the daemon SIGKILLed and restarted while workers run."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.cluster.kit import RedisServer, Site, block_step, make_site
from tests.faults.kit import log_events, processes_mentioning
from tests.helpers import DaemonProcess, files_under, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

def received(site: Site) -> Counter[str]:
    return Counter(e["file"] for w in site.workers for e in w.events_named("step_received"))


def assert_once(site: Site, ledger: Path, names: list[str]) -> None:
    """Every file done once: one original in done/, one output, the step's work once."""
    site.wait_done(names)
    assert files_under(site.box.done) == sorted(names)
    assert files_under(site.box.outputs) == sorted(names)
    assert files_under(site.box.failed) == []
    assert Counter(ledger.read_text().split()) == Counter(names)


def test_worker_killed_mid_step_loses_nothing_and_doubles_nothing(
        short_root: Path, redis_server: RedisServer, site_factory: list[Site]) -> None:
    ledger, marker = short_root / "ledger.txt", short_root / "go"
    site = make_site(site_factory, short_root, redis_server,
                     [{"command": block_step(ledger, marker)}], lease=2.0)
    first, second = site.worker("--threads", "2"), site.worker("--threads", "2")
    site.daemon.start()
    names = ["a.txt", "b.txt"]
    site.drop(names)
    wait_until(lambda: sum(received(site).values()) == 2, 30, message="both steps running")
    victim = first if first.events_named("step_received") else second
    survivor = second if victim is first else first
    lost = [e["file"] for e in victim.events_named("step_received")]
    victim.kill()
    # Its messages go to the survivor once the lease has passed without a heartbeat...
    wait_until(lambda: sorted(e["file"] for e in survivor.events_named("step_received"))
               == sorted(names), 30, message="the killed worker's steps redelivered")
    # ...and the killed worker's step processes are stopped by its neighbour.
    wait_until(lambda: len(processes_mentioning(str(marker))) == len(names), 20,
               message="the killed worker's step processes stopped")
    marker.touch()
    assert_once(site, ledger, names)
    assert lost and sorted(survivor.files_run()) == sorted(names)


def test_redis_restarted_mid_batch_loses_nothing(
        short_root: Path, redis_server: RedisServer, site_factory: list[Site]) -> None:
    ledger, marker = short_root / "ledger.txt", short_root / "go"
    site = make_site(site_factory, short_root, redis_server,
                     [{"command": block_step(ledger, marker)}], daemon={"workers": 4})
    site.worker(), site.worker()
    site.daemon.start()
    names = [f"n{i}.txt" for i in range(4)]
    site.drop(names)
    wait_until(lambda: sum(received(site).values()) == 2, 30, message="two steps running")
    redis_server.restart()  # the two queued messages and every record are gone
    marker.touch()
    assert_once(site, ledger, names)
    events = [e.get("event") for e in log_events(site.daemon.log)]
    assert events.count("step_resent") == 2  # the queued two, not the two running


def test_daemon_killed_and_restarted_while_workers_run_loses_nothing(
        short_root: Path, redis_server: RedisServer, site_factory: list[Site]) -> None:
    ledger, marker = short_root / "ledger.txt", short_root / "go"
    site = make_site(site_factory, short_root, redis_server,
                     [{"command": block_step(ledger, marker)}], daemon={"workers": 3})
    site.worker(), site.worker()
    site.daemon.start()
    names = ["x.txt", "y.txt", "z.txt"]
    site.drop(names)
    wait_until(lambda: sum(received(site).values()) == 2 and [
        e.get("event") for e in log_events(site.daemon.log)].count("step_sent") == 3, 30,
        message="two steps running, the third sent")
    site.daemon.kill()
    site.daemon = DaemonProcess(site.config, short_root / "daemon2.log").start()
    wait_until(lambda: len([e for e in log_events(site.daemon.log)
                            if e.get("event") == "step_adopted"]) == 3, 30,
               message="the restarted daemon waits for the three steps sent before")
    marker.touch()
    assert_once(site, ledger, names)
    assert "step_sent" not in [e.get("event") for e in log_events(site.daemon.log)]
    assert sum(received(site).values()) == 3  # no step delivered twice
