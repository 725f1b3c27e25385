"""A fatal backend error on one worker pauses that backend for the whole site: real
redis-server, real daemon, real workers, a real HTTP server answering 401 to a bad key."""

from __future__ import annotations

import json
import math
import socket
import struct
import subprocess
import sys
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.kit import RedisServer, Site, free_port, make_site
from tests.helpers import files_under, wait_until
from tests.media.openai_server import FakeOpenAI, Reply, Request, error, verbose_json

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BAD_KEY = "bad-key-4f9a0c1e77d2b3a8"
GOOD_KEY = "good-key-0b6d2e9f31c8a7e5"
PAUSED = "traxd:traxd:paused"

# A command step that lets a file whose name starts with "later" through only once the
# marker exists: those files reach their transcription at a moment the test chooses.
GATE_SCRIPT = (
    "import os, sys, time\n"
    "src, dest, marker = sys.argv[1:4]\n"
    "while os.path.basename(src).startswith('later') and not os.path.exists(marker):\n"
    "    time.sleep(0.05)\n"
    "open(dest, 'w').close()\n"
)


@pytest.fixture
def provider() -> Iterator[FakeOpenAI]:
    """Transcribes for the good key; 401 for any other, echoing the key it was given."""
    server = FakeOpenAI()

    def answer(request: Request) -> Reply:
        given = request.headers.get("authorization", "").removeprefix("Bearer ")
        if given == GOOD_KEY:
            return verbose_json(request)
        return error(401, f"Incorrect API key provided: {given}")

    server.transcribe = answer
    with server.running() as running:
        yield running


def tone(path: Path, seconds: float = 1.0, rate: int = 16000) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(i / 8)))
                                 for i in range(int(seconds * rate))))


def traxd(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "traxd", *args, "--config", str(site.config)],
                          capture_output=True, text=True, check=True, timeout=30)


def status(site: Site) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(traxd(site, "status", "--json").stdout)
    return data


def keys_sent(server: FakeOpenAI) -> list[str]:
    return [r.headers.get("authorization", "").removeprefix("Bearer ") for r in server.requests]


def test_a_401_on_one_worker_pauses_the_backend_for_the_whole_site(
        short_root: Path, redis_server: RedisServer, site_factory: list[Site],
        provider: FakeOpenAI) -> None:
    marker, port = short_root / "go", free_port()
    gate = [sys.executable, "-c", GATE_SCRIPT, "{input}", "{output_dir}/{stem}.gate",
            str(marker)]
    site = make_site(site_factory, short_root, redis_server, [{"command": gate}, "transcribe"],
                     daemon={"workers": 3, "metrics_address": f"127.0.0.1:{port}"},
                     transcribe={"backend": "openai", "base_url": provider.base_url,
                                 "requests_per_minute": 100})
    site.worker("--queues", "cpu", "--threads", "3")
    bad = site.worker("--queues", "net", env={"OPENAI_API_KEY": BAD_KEY})
    site.daemon.start()
    names = ["first.wav", "later1.wav", "later2.wav"]
    for name in names:
        tone(site.box.inbox / name)
    # When the worker with the bad key gets a 401, it marks the backend paused at once,
    # with the reason and never the key
    redis = redis_server.client()
    raw = wait_until(lambda: redis.hget(PAUSED, "openai"), 30, message="the pause mark")
    mark = json.loads(str(raw))
    assert "401" in mark["reason"] and BAD_KEY not in str(raw)
    assert mark["worker"] == f"{socket.gethostname()}:{bad.pid}"
    assert f"worker {mark['worker']}'s environment" in mark["reason"]  # where the key goes
    # Then another worker, with a key that works, runs no step of that backend: it hands
    # the two steps that come later back unrun
    bad.stop()
    good = site.worker("--queues", "net", env={"OPENAI_API_KEY": GOOD_KEY})
    marker.touch()
    wait_until(lambda: len(good.events_named("step_handed_back")) == 2, 30,
               message="two steps handed back")
    assert keys_sent(provider) == [BAD_KEY]  # one request in all, the one that failed
    assert not good.events_named("step_started")
    # And the daemon shows the pause; its files wait: none failed, none lost
    def all_waiting() -> dict[str, Any] | None:
        now = status(site)
        return now if now["inboxes"][0]["waiting"] == 3 else None

    view = wait_until(all_waiting, 30, message="three files waiting")
    assert view is not None and "401" in view["backends_paused"]["openai"]
    assert BAD_KEY not in json.dumps(view)
    assert view["inboxes"][0]["failed"] == 0 and not files_under(site.box.failed)
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    assert 'traxd_backend_paused{backend="openai"} 1.0' in scrape.decode()
    # When the operator resumes, the mark goes and every file is transcribed
    traxd(site, "resume")
    wait_until(lambda: not redis.hexists(PAUSED, "openai"), 10, message="the mark deleted")
    site.wait_done(names, timeout=60)
    assert {f"{Path(n).stem}.txt" for n in names} <= set(files_under(site.box.outputs))
    assert keys_sent(provider) == [BAD_KEY] + [GOOD_KEY] * 3
    assert not files_under(site.box.failed)
    # The worker counted its requests in the site's shared limit
    assert redis.exists("traxd:traxd:limit:openai:127.0.0.1:starts")
