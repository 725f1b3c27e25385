"""Fixtures for the operations side: short socket paths, a fake daemon, a real Prometheus."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_START_TIMEOUT = 60.0


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: unix socket paths must stay under ~100 bytes."""
    with tempfile.TemporaryDirectory(prefix="traxd-", dir="/tmp") as name:
        yield Path(name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; HTTP errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8")


# --- a real Prometheus server ------------------------------------------------------------


@dataclass
class PrometheusServer:
    """A `prometheus` process scraping `targets` every second."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path
    targets: list[str] = field(default_factory=list)

    def api(self, path: str, **params: str) -> dict[str, Any]:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = http_get(f"{self.url}{path}{query}")
        assert status == 200, f"{path}: HTTP {status}: {body}"
        data: dict[str, Any] = json.loads(body)
        return data

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("/api/v1/query", query=expr)["data"]["result"]
        return result

    def wait_for_sample(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll the query API until `expr` has at least one sample."""
        return wait_until(lambda: self.query(expr), timeout=timeout, interval=0.25,
                          message=f"a sample of {expr}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


PrometheusFactory = Callable[..., PrometheusServer]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[PrometheusFactory]:
    """Start `prometheus` (skipped when the binary is absent): factory(targets, rule_files=())."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed")
    started: list[PrometheusServer] = []

    def start(targets: Sequence[str], rule_files: Sequence[Path] = ()) -> PrometheusServer:
        root = tmp_path / f"prometheus-{len(started)}"
        root.mkdir()
        server = _launch(binary, root, list(targets), list(rule_files))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _launch(binary: str, root: Path, targets: list[str], rules: list[Path]) -> PrometheusServer:
    config = root / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(r) for r in rules],
        "scrape_configs": [{"job_name": "traxd", "static_configs": [{"targets": targets}]}],
    }))
    port = free_port()
    log = root / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT)
    server = PrometheusServer(f"http://127.0.0.1:{port}", process, log, targets)
    try:
        wait_until(lambda: _ready(server), timeout=PROMETHEUS_START_TIMEOUT, interval=0.2,
                   message="prometheus to become ready")
    except BaseException:
        server.stop()
        print(log.read_text(errors="replace"))
        raise
    return server


def _ready(server: PrometheusServer) -> bool:
    if server.process.poll() is not None:
        pytest.fail(f"prometheus exited with {server.process.returncode}: "
                    f"{server.log.read_text(errors='replace')}")
    try:
        status, _ = http_get(f"{server.url}/-/ready", timeout=1.0)
    except OSError:
        return False
    return status == 200


# --- fakes -------------------------------------------------------------------------------


class FakeHealth:
    """A HealthSource whose answers the test sets."""

    def __init__(self) -> None:
        self.is_alive = True
        self.readiness: tuple[bool, str] = (True, "")

    def alive(self) -> bool:
        return self.is_alive

    def ready(self) -> tuple[bool, str]:
        return self.readiness
