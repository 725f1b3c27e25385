"""The daemon's executor against a real redis-server, no workers: replies stored, adopted,
ignored when superseded, deleted once recorded."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path

import pytest
import structlog.testing

from tests.cluster.kit import RedisServer
from traxd.cluster.protocol import Keys, SitePause, encode_reply, message_key
from traxd.cluster.remote import DramatiqExecutor, redact_url
from traxd.config import ClusterSettings, Settings
from traxd.errors import Permanent
from traxd.executor import StepReply, StepRequest
from traxd.logs import get_logger
from traxd.pipeline.registry import StepRegistry
from traxd.procs import ProcessLimits

KEYS = Keys("traxd")


def request(root: Path, attempt: int = 0) -> StepRequest:
    return StepRequest(
        job_id=3, inbox="main", name="a.txt", sha256="cd" * 32, size=1, step_index=0,
        step=("true",), input=str(root / "a.txt"), source=str(root / "a.txt"),
        workdir=str(root / "work" / "3" / "0-command"), facts={}, artifacts={},
        formats=("txt",), settings={}, limits=ProcessLimits(), attempt=attempt)


class Durable:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1


@pytest.fixture
def executor_settings(settings: Settings, redis_server: RedisServer) -> Settings:
    return dataclasses.replace(settings, cluster=ClusterSettings(broker=redis_server.url,
                                                                 lease=2.0))


async def run(executor: DramatiqExecutor, req: StepRequest, timeout: float = 10) -> StepReply:
    return await asyncio.wait_for(
        executor.run(req, log=get_logger(), progress=lambda _: None), timeout)


async def until(predicate: object, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.05)


async def test_a_stored_reply_is_taken_and_kept_until_the_journal_has_it(
        executor_settings: Settings, redis_server: RedisServer, tmp_path: Path) -> None:
    durable = Durable()
    executor = DramatiqExecutor(executor_settings, StepRegistry(executor_settings),
                                durable=durable)
    client = redis_server.client()
    req = request(tmp_path)
    reply = StepReply(artifacts={"a.txt": "/w/a.txt"})
    client.set(KEYS.reply(message_key(req)), encode_reply(message_key(req), "w:1", reply))
    try:
        assert await run(executor, req) == reply
        assert client.llen(KEYS.queue("traxd.cpu")) == 0  # nothing was sent again
        assert client.exists(KEYS.reply(message_key(req)))  # kept: not yet recorded
        executor.recorded(req.job_id, 1)
        await until(lambda: not client.exists(KEYS.reply(message_key(req))))
        assert durable.calls >= 1  # deleted only after the journal was durable
    finally:
        await executor.aclose()


async def test_a_superseded_attempts_reply_is_ignored_and_the_step_sent(
        executor_settings: Settings, redis_server: RedisServer, tmp_path: Path) -> None:
    executor = DramatiqExecutor(executor_settings, StepRegistry(executor_settings))
    client = redis_server.client()
    old, new = request(tmp_path, attempt=0), request(tmp_path, attempt=1)
    stale = StepReply(artifacts={"a.txt": "/old/a.txt"})
    client.set(KEYS.reply(message_key(old)), encode_reply(message_key(old), "w:1", stale))
    try:
        task = asyncio.create_task(run(executor, new))
        await until(lambda: client.llen(KEYS.queue("traxd.cpu")) == 1)
        assert not task.done()  # the old attempt's reply was not taken
        assert client.get(KEYS.inflight(message_key(new))) is not None
        fresh = StepReply.failed(Permanent("bad media", reason="media"))
        client.set(KEYS.reply(message_key(new)), encode_reply(message_key(new), "w:2", fresh))
        client.lpush(KEYS.replied, message_key(new))
        got = await task
        assert got.error is not None and got.error.message == "bad media"
        # An error reply goes at once (a retry is a new attempt); the record of the send too.
        assert not client.exists(KEYS.reply(message_key(new)), KEYS.inflight(message_key(new)))
    finally:
        await executor.aclose()


async def test_a_restarted_daemon_waits_for_the_message_in_flight(
        executor_settings: Settings, redis_server: RedisServer, tmp_path: Path) -> None:
    client = redis_server.client()
    req = request(tmp_path)
    first = DramatiqExecutor(executor_settings, StepRegistry(executor_settings))
    task = asyncio.create_task(run(first, req))
    await until(lambda: client.llen(KEYS.queue("traxd.cpu")) == 1)
    task.cancel()  # the daemon stops while the message waits for a worker
    await first.aclose()
    second = DramatiqExecutor(executor_settings, StepRegistry(executor_settings))
    try:
        with structlog.testing.capture_logs() as events:
            task = asyncio.create_task(run(second, req))
            await until(lambda: any(e["event"] in ("step_adopted", "step_sent")
                                    for e in events))  # the restarted daemon has decided
        assert [e["event"] for e in events if e["event"].startswith("step_")] == [
            "step_adopted"]
        assert client.llen(KEYS.queue("traxd.cpu")) == 1  # adopted, not sent again
        reply = StepReply(artifacts={"a.txt": "/w/a.txt"})
        client.set(KEYS.reply(message_key(req)), encode_reply(message_key(req), "w:1", reply))
        assert await task == reply  # found by the sweep, with no hint
    finally:
        await second.aclose()


async def test_a_workers_pause_mark_pauses_the_backend_and_resume_deletes_it_first(
        executor_settings: Settings, redis_server: RedisServer, tmp_path: Path) -> None:
    client = redis_server.client()
    paused: dict[str, str] = {}
    executor = DramatiqExecutor(executor_settings, StepRegistry(executor_settings),
                                on_paused=paused.__setitem__)
    mark = SitePause("api.example answered 401: invalid key [redacted]", "w:7", time.time())
    client.hset(KEYS.paused, "openai", mark.encode())
    try:
        # A mark a worker left: the backend is paused in the daemon too, with its reason
        await until(lambda: "openai" in paused)
        assert paused["openai"] == mark.reason
        assert executor.status()["paused"]["openai"]["worker"] == "w:7"
        # On resume the mark is deleted before the next step is sent
        executor.backend_changed("openai", None)
        with structlog.testing.capture_logs() as events:
            task = asyncio.create_task(run(executor, request(tmp_path)))
            await until(lambda: client.llen(KEYS.queue("traxd.cpu")) == 1)
        names = [e["event"] for e in events]
        assert names.index("site_pause_cleared") < names.index("step_sent")
        assert not client.hexists(KEYS.paused, "openai")
        paused.clear()
        cleared = time.time()  # the next look at the cluster does not pause it again
        await until(lambda: executor.view.at > cleared)
        assert paused == {} and executor.status()["paused"] == {}
        task.cancel()
    finally:
        await executor.aclose()


async def test_a_download_step_is_sent_naming_the_shared_archive(
        executor_settings: Settings, redis_server: RedisServer, tmp_path: Path) -> None:
    # Given no [download] archive and the steps' folders on the share ([cluster] work_dir)
    work = tmp_path / "share" / "work"
    settings = dataclasses.replace(executor_settings, cluster=dataclasses.replace(
        executor_settings.cluster, work_dir=work))
    executor = DramatiqExecutor(settings, StepRegistry(settings))
    client = redis_server.client()
    link = dataclasses.replace(request(tmp_path), step="download", settings={"archive": None},
                               workdir=str(work / "3" / "0-download"))
    try:
        with structlog.testing.capture_logs() as events:
            task = asyncio.create_task(run(executor, link))
            await until(lambda: client.llen(KEYS.queue("traxd.net")) == 1)
        # Then the message names the archive beside the work folders, which now exists,
        # and the daemon says where it is kept
        (sent,) = client.hvals(KEYS.messages("traxd.net"))
        archive = work / "download-archive.txt"
        assert json.loads(sent)["args"][0]["settings"]["archive"] == str(archive)
        assert archive.parent.is_dir()
        (said,) = [e for e in events if e["event"] == "download_archive"]
        assert said["path"] == str(archive) and said["set_by"] == "[cluster] work_dir"
        task.cancel()
    finally:
        await executor.aclose()


def test_the_broker_password_is_never_shown() -> None:
    assert redact_url("redis://:s3cret@h:6379/0") == "redis://:[redacted]@h:6379/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
