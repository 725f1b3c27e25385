"""The HTTP exporter: /metrics, /healthz, /readyz with a fake health source."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from tests.ops.conftest import FakeHealth, http_get
from traxd import metrics
from traxd.exporter import HttpServerHandle, parse_address, start_http


@pytest.fixture
def health() -> FakeHealth:
    return FakeHealth()


@pytest.fixture
def server(health: FakeHealth) -> Iterator[HttpServerHandle]:
    handle = start_http("127.0.0.1:0", health)
    yield handle
    handle.close()


def test_port_zero_reports_the_bound_port(server: HttpServerHandle) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"


def test_metrics_serves_the_traxd_registry(server: HttpServerHandle) -> None:
    # Given some traxd metrics
    metrics.publish_known([], [], {})
    metrics.QUEUE_DEPTH.labels(inbox="exporter-test").set(7)

    # When Prometheus scrapes
    status, body = http_get(f"{server.url}/metrics")

    # Then they are there in the text format
    assert status == 200
    assert 'traxd_build_info{version="' in body
    assert 'traxd_queue_depth{inbox="exporter-test"} 7.0' in body


def test_healthz_follows_the_heartbeat(server: HttpServerHandle, health: FakeHealth) -> None:
    assert http_get(f"{server.url}/healthz") == (200, "ok\n")
    health.is_alive = False
    assert http_get(f"{server.url}/healthz")[0] == 503


def test_readyz_gives_the_reason(server: HttpServerHandle, health: FakeHealth) -> None:
    assert http_get(f"{server.url}/readyz") == (200, "ready\n")
    health.readiness = (False, "paused backends: openai")
    assert http_get(f"{server.url}/readyz") == (503, "paused backends: openai\n")


def test_unknown_paths_are_404(server: HttpServerHandle) -> None:
    assert http_get(f"{server.url}/secrets")[0] == 404


def test_a_failing_health_source_means_not_ready(server: HttpServerHandle,
                                                 health: FakeHealth) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("journal gone")

    health.ready = broken  # type: ignore[method-assign]
    status, body = http_get(f"{server.url}/readyz")
    assert status == 503
    assert "journal gone" in body


def test_readiness_runs_on_the_event_loop(health: FakeHealth) -> None:
    # Given an exporter started inside a running loop
    seen: list[threading.Thread] = []

    def ready() -> tuple[bool, str]:
        seen.append(threading.current_thread())
        return True, ""

    health.ready = ready  # type: ignore[method-assign]

    async def scenario() -> tuple[int, str]:
        handle = start_http("127.0.0.1:0", health)
        try:
            return await asyncio.to_thread(http_get, f"{handle.url}/readyz")
        finally:
            handle.close()

    # When /readyz is asked, Then the check ran on the loop's thread, not the HTTP thread
    assert asyncio.run(scenario()) == (200, "ready\n")
    assert seen == [threading.main_thread()]


def test_a_stuck_loop_makes_readyz_fail(health: FakeHealth) -> None:
    async def scenario() -> tuple[int, str]:
        handle = start_http("127.0.0.1:0", health, ready_timeout=0.2)
        try:
            # the loop is blocked by this synchronous call for the whole request
            return http_get(f"{handle.url}/readyz", timeout=10)
        finally:
            handle.close()

    status, body = asyncio.run(scenario())
    assert status == 503
    assert "did not answer" in body


def test_close_frees_the_port(health: FakeHealth) -> None:
    handle = start_http("127.0.0.1:0", health)
    port = handle.port
    handle.close()
    again = start_http(f"127.0.0.1:{port}", health)
    again.close()


def test_ipv6_loopback(health: FakeHealth) -> None:
    try:
        handle = start_http("[::1]:0", health)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        assert http_get(f"{handle.url}/healthz")[0] == 200
    finally:
        handle.close()


@pytest.mark.parametrize(("address", "parsed"), [
    ("127.0.0.1:9108", ("127.0.0.1", 9108)), ("[::1]:0", ("::1", 0)), (":9108", ("", 9108)),
    ("localhost:80", ("localhost", 80)),
])
def test_parse_address(address: str, parsed: tuple[str, int]) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize("address", ["9108", "host:", "host:99999", "host:http"])
def test_parse_address_rejects(address: str) -> None:
    with pytest.raises(ValueError):
        parse_address(address)
