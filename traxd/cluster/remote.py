"""The daemon's side of scale-out: steps sent to `traxd worker`s as Dramatiq messages.

Delivery is at least once; the key of a message (job, content, step, attempt) makes it
exactly once in effect. The daemon writes down what it sent (`inflight:<key>`) before it
sends; a worker stores its reply (`reply:<key>`) before it acknowledges the message and
pushes the key onto `replied` (a hint: the reply is the truth). A re-run of a step (after a
daemon restart) first looks for the reply or the message in flight and waits for it. A
message that is neither in Redis nor held by a live worker for half a lease (Redis lost
its data) is sent again. A reply stays in Redis until the journal has recorded it.
A worker that finds a backend unusable marks it paused for the site (`paused`); the daemon
pauses it too when it sees the mark, and `traxd resume` deletes the mark before any step is
sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aredis
from dramatiq import Message
from redis.exceptions import RedisError
from structlog.typing import FilteringBoundLogger

from traxd import metrics
from traxd.cluster.broker import CONNECT_TIMEOUT, SOCKET_TIMEOUT, make_broker
from traxd.cluster.protocol import (
    ACTOR,
    REPLY_TTL,
    RESOURCES,
    Heartbeat,
    Keys,
    SitePause,
    decode_reply,
    download_archive,
    message_key,
    queue_name,
    resource_of,
)
from traxd.config import Settings, StepSpec
from traxd.executor import Progress, StepReply, StepRequest
from traxd.logs import get_logger
from traxd.pipeline.registry import StepRegistry

HINT_WAIT = 0.5  # seconds one wait for a reply hint blocks
OBSERVE_EVERY = 1.0  # seconds between looks at workers, queues and lost messages
RETRY_DELAY = 0.5  # after Redis could not be reached
FORGET_WORKER_LEASES = 10  # a worker silent this many leases leaves `traxd status`


@dataclass
class InFlight:
    """One step waiting on the cluster."""

    request: StepRequest
    key: str
    queue: str
    log: FilteringBoundLogger
    progress: Progress
    reply: asyncio.Future[StepReply]
    message_id: str = ""
    sent: float = 0.0
    lost_since: float | None = None  # neither queued nor held by a live worker since then


@dataclass
class ClusterView:
    """The last look at the workers and queues (for status and metrics)."""

    workers: list[Heartbeat] = field(default_factory=list)
    depths: dict[str, int] = field(default_factory=dict)
    paused: dict[str, SitePause] = field(default_factory=dict)  # backend -> its mark
    reachable: bool = True
    at: float = 0.0

    def alive(self, lease: float) -> list[Heartbeat]:
        return [w for w in self.workers if w.alive(self.at, lease)]

    def holder(self, key: str, lease: float) -> Heartbeat | None:
        return next((w for w in self.alive(lease) if key in w.running), None)


class DramatiqExecutor:
    """Sends step requests to workers and waits for their replies; same interface as
    LocalExecutor. Failures come back as replies; Redis being away is waited out."""

    def __init__(self, settings: Settings, steps: StepRegistry, *,
                 durable: Callable[[], Awaitable[None]] | None = None,
                 on_paused: Callable[[str, str], None] | None = None) -> None:
        cluster = settings.cluster
        assert cluster.broker is not None
        self.settings, self.steps, self.cluster = settings, steps, cluster
        self.keys = Keys(cluster.queue)
        self.queues = [queue_name(cluster.queue, r) for r in RESOURCES]
        self.broker = make_broker(cluster, sweeper=True)
        self.redis = aredis.Redis.from_url(
            cluster.broker, decode_responses=True, socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT)
        self.durable = durable
        self.on_paused = on_paused  # told (backend, reason) for each mark a worker left
        self.resumed_at: dict[str, float] = {}  # backend -> when `traxd resume` cleared it
        self._clearing: asyncio.Task[None] | None = None
        self._archives: set[Path] = set()  # download archives whose folder is made
        self.waiting: dict[str, InFlight] = {}
        self.taken: dict[int, dict[int, str]] = {}  # job -> step index -> reply key kept
        self.forget: list[str] = []  # reply keys recorded by the journal: to delete
        self.view = ClusterView()
        self.log = get_logger(component="cluster", broker=redact_url(cluster.broker))
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        with contextlib.suppress(RuntimeError):  # no loop yet: started by the first step
            self._start()

    @property
    def grace(self) -> float:
        return self.cluster.lease / 2

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def needs_workdir(self, spec: StepSpec) -> bool:
        return self.steps.needs_workdir(spec)

    # --- one step ---------------------------------------------------------------------------

    async def run(self, request: StepRequest, *, log: FilteringBoundLogger,
                  progress: Progress) -> StepReply:
        self._start()
        request = await self._with_archive(request)
        key = message_key(request)
        queue = queue_name(self.cluster.queue,
                           resource_of(request.step, self.settings.for_inbox(request.inbox)))
        entry = InFlight(request, key, queue, log.bind(step=request.label, key=key, queue=queue),
                         progress,
                         asyncio.get_running_loop().create_future())
        if request.workdir is not None:  # the worker makes its folder inside the job's
            await asyncio.to_thread(Path(request.workdir).parent.mkdir, parents=True,
                                    exist_ok=True)
        self.waiting[key] = entry
        try:
            if self._clearing is not None:  # a resumed backend's mark goes before any send
                await asyncio.shield(self._clearing)
            await self._dispatch(entry)
            reply = await entry.reply
        finally:
            self.waiting.pop(key, None)
        await self._taken(entry, reply)
        return reply

    async def _with_archive(self, request: StepRequest) -> StepRequest:
        """A download step names the archive every worker reads (through its path_map) and
        the daemon records into when the job is done; its folder is made here, so a worker
        that cannot see it fails the step instead of downloading a link again."""
        if request.label != "download":
            return request
        archive, source = download_archive(self.settings)
        if archive not in self._archives:
            self._archives.add(archive)
            with contextlib.suppress(OSError):  # a worker that cannot reach it says so
                await asyncio.to_thread(archive.parent.mkdir, parents=True, exist_ok=True)
            self.log.info("download_archive", path=str(archive), set_by=source,
                          note="on storage every worker sees; they read it through path_map")
        return dataclasses.replace(request, settings={**request.settings,
                                                      "archive": str(archive)})

    async def _dispatch(self, entry: InFlight) -> None:
        """The stored reply, or the message in flight, or a new message."""
        while not entry.reply.done():
            try:
                reply = decode_reply(await self.redis.get(self.keys.reply(entry.key)), entry.key)
                if reply is not None:
                    entry.log.info("step_reply_found", why="replied before this run asked")
                    entry.reply.set_result(reply)
                elif not await self._adopt(entry):
                    await self._send(entry)
                return
            except RedisError as exc:
                self._unreachable(exc)
                await asyncio.sleep(RETRY_DELAY)

    async def _adopt(self, entry: InFlight) -> bool:
        """Wait for a message sent before (by this daemon before a restart) if it is still
        queued or held by a live worker."""
        raw = await self.redis.get(self.keys.inflight(entry.key))
        if raw is None:
            return False
        record = json.loads(raw)
        entry.message_id, entry.sent = record["message_id"], record["sent"]
        held = self.view.holder(entry.key, self.cluster.lease)
        if held is None and not await self.redis.hexists(
                self.keys.messages(entry.queue), entry.message_id):
            return False
        entry.log.info("step_adopted", message_id=entry.message_id,
                       worker=held.worker if held else None)
        return True

    async def _send(self, entry: InFlight) -> None:
        message: Message[Any] = Message(
            queue_name=entry.queue, actor_name=ACTOR, args=(entry.request.to_json(), entry.key),
            kwargs={}, options={})
        sent = await asyncio.to_thread(self.broker.enqueue, message)
        # Redis knows the message by the id the broker gave it (a crash before the record is
        # written sends it again: a second delivery of one key, harmless).
        entry.message_id = str(sent.options["redis_message_id"])
        entry.sent, entry.lost_since = time.time(), None
        record = json.dumps({"message_id": entry.message_id, "queue": entry.queue,
                             "sent": entry.sent})
        await self.redis.set(self.keys.inflight(entry.key), record, ex=REPLY_TTL)
        entry.log.info("step_sent", message_id=entry.message_id)

    async def _taken(self, entry: InFlight, reply: StepReply) -> None:
        """An error reply goes at once (the journal records the error next, and a retry is
        a new attempt); a result stays until the journal holds it (see `recorded`)."""
        request = entry.request
        try:
            await self.redis.delete(self.keys.inflight(entry.key))
            if reply.error is not None:
                await self.redis.delete(self.keys.reply(entry.key))
                return
        except RedisError as exc:  # the reply expires in the end; nothing is lost
            self._unreachable(exc)
        self.taken.setdefault(request.job_id, {})[request.step_index] = entry.key

    def recorded(self, job_id: int, steps: int) -> None:
        kept = self.taken.get(job_id, {})
        for index in [i for i in kept if i < steps]:
            self.forget.append(kept.pop(index))
        if not kept:
            self.taken.pop(job_id, None)

    # --- backends paused for the whole site -------------------------------------------------

    def backend_changed(self, backend: str, reason: str | None) -> None:
        """On resume (reason None) the workers' mark of `backend` is deleted; a pause needs
        nothing here (the worker that saw the error left the mark)."""
        if reason is not None:
            return
        self.resumed_at[backend] = time.monotonic()
        self._clearing = asyncio.get_running_loop().create_task(
            self._clear_pause(backend, self._clearing))

    async def _clear_pause(self, backend: str, before: asyncio.Task[None] | None) -> None:
        if before is not None:
            await before
        while not self._closing:
            try:
                await self.redis.hdel(self.keys.paused, backend)
                self.view.paused.pop(backend, None)
                self.log.info("site_pause_cleared", backend=backend)
                return
            except RedisError as exc:
                self._unreachable(exc)
                await asyncio.sleep(RETRY_DELAY)

    async def _read_pauses(self) -> None:
        """The marks workers left: each backend paused here too (a mark read while a resume
        was deleting it is not taken)."""
        asked = time.monotonic()
        marks = await self.redis.hgetall(self.keys.paused)
        paused = {str(backend): pause for backend, raw in marks.items()
                  if (pause := SitePause.decode(raw)) is not None
                  and self.resumed_at.get(str(backend), -1.0) < asked}
        self.view.paused = paused
        for backend, pause in paused.items():
            if self.on_paused is not None:
                self.on_paused(backend, pause.reason)

    # --- watching the cluster ---------------------------------------------------------------

    async def _watch(self) -> None:
        """Collect replies as their hints come; every OBSERVE_EVERY look at the workers and
        queues, re-send lost messages and delete recorded replies."""
        last = 0.0
        while not self._closing:
            try:
                await self.redis.blpop([self.keys.replied], timeout=HINT_WAIT)
                await self._collect()
                if time.monotonic() - last >= OBSERVE_EVERY:
                    last = time.monotonic()
                    await self._observe()
                    await self._check_lost()
                    await self._forget_recorded()
                self._reachable()
            except RedisError as exc:
                self._unreachable(exc)
                await asyncio.sleep(RETRY_DELAY)
            except Exception as exc:
                self.log.exception("cluster_watch_error", error=repr(exc))
                await asyncio.sleep(RETRY_DELAY)

    async def _collect(self) -> None:
        entries = [e for e in self.waiting.values() if not e.reply.done()]
        if not entries:
            return
        found = await self.redis.mget([self.keys.reply(e.key) for e in entries])
        for entry, raw in zip(entries, found, strict=True):
            reply = decode_reply(raw, entry.key)
            if reply is not None and not entry.reply.done():
                entry.reply.set_result(reply)

    async def _observe(self) -> None:
        now = time.time()
        beats = await self.redis.hgetall(self.keys.workers)
        workers = [b for raw in beats.values() if (b := Heartbeat.decode(raw)) is not None]
        stale = [w.worker for w in workers
                 if now - w.at > FORGET_WORKER_LEASES * self.cluster.lease]
        if stale:
            await self.redis.hdel(self.keys.workers, *stale)
        depths = {q: int(await self.redis.llen(self.keys.queue(q))) for q in self.queues}
        await self._read_pauses()
        # Each command of the sweeper broker also requeues the messages of dead workers.
        await asyncio.to_thread(self._maintain)
        self.view = ClusterView([w for w in workers if w.worker not in stale], depths,
                                self.view.paused, True, now)
        self._export()
        for entry in self.waiting.values():
            if (holder := self.view.holder(entry.key, self.cluster.lease)) is not None:
                entry.progress(holder.running.get(entry.key, 0.0))

    def _maintain(self) -> None:
        for queue in self.queues:
            self.broker.do_qsize(queue)

    def _export(self) -> None:
        alive = self.view.alive(self.cluster.lease)
        metrics.WORKERS_ALIVE.set(len(alive))
        metrics.WORKER_BUSY.clear()
        for worker in alive:
            metrics.WORKER_BUSY.labels(worker=worker.worker).set(worker.busy)
        for queue, depth in self.view.depths.items():
            metrics.CLUSTER_QUEUE_DEPTH.labels(queue=queue).set(depth)

    async def _check_lost(self) -> None:
        """Messages Redis no longer holds (it restarted, or lost them) and no live worker
        runs: after half a lease (workers beat again by then), sent again."""
        entries = [e for e in self.waiting.values() if e.message_id and not e.reply.done()]
        if not entries:
            return
        now = time.monotonic()
        for entry in entries:
            if self.view.holder(entry.key, self.cluster.lease) is not None or \
                    await self.redis.hexists(self.keys.messages(entry.queue), entry.message_id):
                entry.lost_since = None
                continue
            entry.lost_since = entry.lost_since or now
            if now - entry.lost_since >= self.grace and not entry.reply.done():
                entry.log.warning("step_resent", old_message_id=entry.message_id,
                                  why="the message is no longer in Redis and no live worker "
                                  "runs it")
                await self._send(entry)

    async def _forget_recorded(self) -> None:
        if not self.forget:
            return
        batch, self.forget = self.forget, []
        if self.durable is not None:
            await self.durable()
        try:
            await self.redis.delete(*[self.keys.reply(key) for key in batch])
        except RedisError:
            self.forget.extend(batch)
            raise

    def _unreachable(self, exc: BaseException) -> None:
        if self.view.reachable:
            self.log.error("cluster_unreachable", error=str(exc),
                           waiting=len(self.waiting), fix="start Redis, or check [cluster] broker")
        self.view.reachable = False

    def _reachable(self) -> None:
        if not self.view.reachable:
            self.log.info("cluster_reachable", waiting=len(self.waiting))
        self.view.reachable = True

    # --- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        lease = self.cluster.lease
        return {
            "broker": redact_url(self.cluster.broker or ""),
            "reachable": self.view.reachable,
            "queues": dict(self.view.depths),
            "paused": {backend: {"reason": p.reason, "worker": p.worker, "at": p.at}
                       for backend, p in self.view.paused.items()},
            "workers": [{
                "worker": w.worker, "host": w.host, "pid": w.pid, "queues": list(w.queues),
                "threads": w.threads, "busy": w.busy, "last_heartbeat": w.at,
                "alive": w.alive(self.view.at, lease), "steps": sorted(w.steps.values()),
            } for w in sorted(self.view.workers, key=lambda w: w.worker)],
            "in_flight": [self._in_flight(entry) for entry in list(self.waiting.values())],
        }

    def _in_flight(self, entry: InFlight) -> dict[str, Any]:
        holder = self.view.holder(entry.key, self.cluster.lease)
        return {"key": entry.key, "job_id": entry.request.job_id, "inbox": entry.request.inbox,
                "file": entry.request.name, "step": entry.request.label, "queue": entry.queue,
                "worker": holder.worker if holder else None, "sent_at": entry.sent or None}

    async def aclose(self) -> None:
        self._closing = True
        if self._task is not None:
            # A cancel that lands inside a Redis command may come out as a Redis error,
            # which the loop survives: the flag ends it.
            self._task.cancel()
            await asyncio.wait([self._task], timeout=SOCKET_TIMEOUT)
        with contextlib.suppress(RedisError):
            await self._forget_recorded()
        await self.redis.aclose()
        await asyncio.to_thread(self.broker.close)
        self.broker.client.close()
        await self.steps.aclose()


def redact_url(url: str) -> str:
    """The broker URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:[redacted]@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
