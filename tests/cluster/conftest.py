"""Fixtures of the cluster tests: a redis-server of our own per test (never the machine's)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.kit import RedisServer, Site


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A short temporary directory: the control socket path must stay under 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="traxd-c-", dir="/tmp") as name:
        yield Path(name)


@pytest.fixture
def redis_server(short_root: Path) -> Iterator[RedisServer]:
    server = RedisServer(short_root / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def site_factory(short_root: Path) -> Iterator[list[Site]]:
    sites: list[Site] = []
    yield sites
    for site in sites:
        site.stop()
