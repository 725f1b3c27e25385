"""`traxd worker`: runs the daemon's step requests with the same step code, on this machine.

One process holds a Dramatiq Worker per queue it takes (its own broker and connections; as
many threads as `[cluster] concurrency` gives that resource, else --threads), whose threads
hand each message to one asyncio loop running LocalExecutors built from this machine's own
config (its keys come from its own environment). Each delivery writes into a folder of its
own inside the step's folder; the reply names what it wrote, is stored in Redis before the
message is acknowledged, and carries the daemon's paths again. A heartbeat says who runs
what.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dramatiq
import psutil
from redis.exceptions import RedisError
from structlog.typing import FilteringBoundLogger

from traxd.cluster.broker import make_broker
from traxd.cluster.limits import SharedLimits
from traxd.cluster.pathmap import PathMap
from traxd.cluster.protocol import (
    ACTOR,
    REPLIED_KEEP,
    REPLY_TTL,
    Heartbeat,
    Keys,
    SitePause,
    encode_reply,
    queue_name,
)
from traxd.config import Settings
from traxd.errors import BackendFatal, Category, Permanent
from traxd.executor import LocalExecutor, StepReply, StepRequest
from traxd.logs import Redactor, get_logger
from traxd.pipeline.registry import StepRegistry, backend_of
from traxd.ratelimit import share_limits

WORKER_MARK = "TRAXD_WORKER"  # in the environment of every process a worker starts
BEAT_MAX = 5.0  # seconds between heartbeats at most, whatever the lease
SITE_PAUSED = "site_paused"  # the reason of a step handed back unrun
STORE_PATIENCE = 600.0  # seconds a finished step's reply waits for Redis to come back
# Settings of a step that belong to the machine running it, not to the daemon that asks.
MACHINE_KEYS = frozenset({"device", "compute_type", "processes", "threads",
                          "idle_unload_seconds", "max_concurrent", "api_key_env",
                          "api_key_file"})
SECTIONS = ("transcribe", "enhance", "download")


def worker_settings(own: Settings, request: StepRequest) -> Settings:
    """This machine's settings, with the daemon's choices for the step's own section
    (model, language, ...) and this machine's for the rest (device, threads, key names)."""
    label = request.label
    if label not in SECTIONS or not request.settings:
        return own
    section = getattr(own, label)
    names = {f.name for f in dataclasses.fields(section)}
    theirs = {k: v for k, v in request.settings.items() if k in names and k not in MACHINE_KEYS}
    for key in ("archive", "library"):  # download's archive, transcribe's library
        if theirs.get(key) is not None:
            theirs[key] = Path(theirs[key])
    return dataclasses.replace(own, **{label: dataclasses.replace(section, **theirs)})


def path_problem(request: StepRequest, paths: PathMap, worker: str) -> Permanent | None:
    """The error for the first path of a (translated) request this machine cannot see."""
    needed = [request.source, request.input]
    if request.workdir is not None:
        needed.append(str(Path(request.workdir).parent))
    if request.label == "download" and (archive := request.settings.get("archive")):
        needed.append(str(Path(archive).parent))
    missing = next((p for p in needed if not Path(p).exists()), None)
    if missing is None:
        return None
    return Permanent(f"worker {worker} cannot see {missing} (the daemon's "
                     f"{paths.to_daemon(missing)}); {paths.describe()}: mount the shared "
                     "storage there or fix path_map", reason="path")


class StepWorker:
    """One worker process."""

    def __init__(self, settings: Settings, resources: tuple[str, ...], threads: int) -> None:
        self.settings, self.resources, self.threads = settings, resources, threads
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.id = f"{self.host}:{self.pid}"
        self.paths = PathMap(settings.cluster.path_map)
        self.keys = Keys(settings.cluster.queue)
        self.queues = tuple(queue_name(settings.cluster.queue, r) for r in resources)
        self.concurrency = {r: settings.cluster.threads_for(r, threads) for r in resources}
        self.brokers = {r: make_broker(settings.cluster, resources=(r,)) for r in resources}
        self.broker = self.brokers[resources[0]]  # also for this worker's own keys
        assert settings.cluster.broker is not None
        self.limits = SharedLimits(settings.cluster.broker, self.keys)
        share_limits(self.limits)  # provider limits count every worker of the site
        self.log = get_logger(component="worker", worker=self.id)
        self.redactor = Redactor.of_environment(settings.key_variables, files=settings.key_files)
        self.loop = asyncio.new_event_loop()
        self.executors: dict[tuple[Any, ...], LocalExecutor] = {}
        self.running: dict[str, float] = {}  # message key -> progress
        self.labels: dict[str, str] = {}
        self.archives: set[str] = set()  # download archives this worker said it uses
        self.futures: dict[str, concurrent.futures.Future[StepReply]] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        os.environ[WORKER_MARK] = self.id
        for resource, broker in self.brokers.items():
            dramatiq.Actor(self.handle, broker=broker, actor_name=ACTOR, priority=0, options={},
                           queue_name=queue_name(settings.cluster.queue, resource))

    @property
    def beat_interval(self) -> float:
        return min(max(self.settings.cluster.lease / 4, 0.2), BEAT_MAX)

    # --- one message ------------------------------------------------------------------------

    def handle(self, data: dict[str, Any], key: str) -> None:
        """Run one step request and store its reply; never raises (Dramatiq acknowledges
        the message when this returns)."""
        label = data["step"] if isinstance(data["step"], str) else "command"
        log = self.log.bind(job_id=data.get("job_id"), inbox=data.get("inbox"),
                            file=data.get("name"), step=label, key=key)
        with self.lock:
            if key in self.running:
                log.info("step_duplicate", why="this process runs it already")
                return
            self.running[key], self.labels[key] = 0.0, f"{data.get('inbox')}/{data.get('name')}"
        try:
            if self.broker.client.exists(self.keys.reply(key)):
                log.info("step_already_replied")
                return
            started = time.monotonic()
            log.info("step_received")
            reply = self._run(data, key, log)
            if reply is None:
                return
            self._store(key, reply, log)
            log.info("step_replied", seconds=round(time.monotonic() - started, 3),
                     error=None if reply.error is None else reply.error.message)
        except Exception as exc:
            log.exception("step_handling_failed", error=repr(exc))
        finally:
            with self.lock:
                self.running.pop(key, None)
                self.labels.pop(key, None)
                self.futures.pop(key, None)

    def _run(self, data: dict[str, Any], key: str, log: FilteringBoundLogger) -> StepReply | None:
        request = StepRequest.from_json(self.paths.request_to_worker(data))
        if (problem := path_problem(request, self.paths, self.id)) is not None:
            log.error("step_path_unseen", error=problem.message)
            return StepReply.failed(problem)
        settings = worker_settings(self.settings, request)
        self._note_archive(settings, request, log)
        backend = backend_of(request.step, settings)
        if (handed_back := self._paused_for_site(backend, log)) is not None:
            return handed_back
        if request.workdir is not None:
            delivery = f"{self.host}-{self.pid}-{uuid.uuid4().hex[:8]}"
            request = dataclasses.replace(request, workdir=str(Path(request.workdir) / delivery))
        reply = self._execute(request, settings, key, log)
        if reply is None:
            return None
        if (error := reply.error) is not None:  # the daemon's redactor knows not our keys
            error = dataclasses.replace(error, message=self.redactor.text(error.message))
            reply = dataclasses.replace(reply, error=error)
            if error.category is Category.FATAL and error.backend:
                self._pause_site(error.backend, error.message, log)
        return StepReply.from_json(self.paths.reply_to_daemon(reply.to_json()))

    def _note_archive(self, settings: Settings, request: StepRequest,
                      log: FilteringBoundLogger) -> None:
        """Where this worker looks for links already downloaded, said once per archive."""
        if request.label != "download":
            return
        archive = str(settings.download.archive or "")
        with self.lock:
            if archive in self.archives:
                return
            self.archives.add(archive)
        if settings.download.archive is None:  # a daemon that sends none (older traxd)
            log.warning("download_archive", path=str(
                settings.daemon.state_dir / "download-archive.txt"),
                note="this worker's own state_dir: not shared with the daemon or other "
                "workers; set [download] archive on the daemon, on shared storage")
            return
        log.info("download_archive", path=archive, daemon_path=self.paths.to_daemon(archive))

    def _execute(self, request: StepRequest, settings: Settings, key: str,
                 log: FilteringBoundLogger) -> StepReply | None:
        def progress(fraction: float) -> None:
            self.running[key] = fraction

        future = asyncio.run_coroutine_threadsafe(
            self._executor(settings).run(request, log=log, progress=progress), self.loop)
        with self.lock:
            self.futures[key] = future
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            log.warning("step_abandoned", why="the worker is stopping; the daemon sends it again")
            return None

    # --- backends paused for the whole site -------------------------------------------------

    def _paused_for_site(self, backend: str | None,
                         log: FilteringBoundLogger) -> StepReply | None:
        """The step handed back unrun when a worker paused its backend: the daemon keeps
        the job waiting (not failed) until `traxd resume`."""
        if backend is None:
            return None
        try:
            pause = SitePause.decode(self.broker.client.hget(self.keys.paused, backend))
        except RedisError as exc:
            log.warning("site_pause_unknown", backend=backend, error=str(exc))
            return None
        if pause is None:
            return None
        log.warning("step_handed_back", backend=backend, paused_by=pause.worker,
                    why="the backend is paused for the whole site; `traxd resume` continues")
        return StepReply.failed(BackendFatal(pause.reason, backend=backend, reason=SITE_PAUSED))

    def _pause_site(self, backend: str, reason: str, log: FilteringBoundLogger) -> None:
        """Every worker stops running steps of `backend` from now on, not only once the
        daemon has this reply."""
        try:
            self.broker.client.hset(self.keys.paused, backend,
                                    SitePause(reason, self.id, time.time()).encode())
        except RedisError as exc:  # the daemon still pauses it when the reply arrives
            log.error("site_pause_not_written", backend=backend, error=str(exc))
            return
        log.error("backend_paused_for_site", backend=backend, reason=reason)

    def _executor(self, settings: Settings) -> LocalExecutor:
        which = (settings.transcribe, settings.enhance, settings.download)
        with self.lock:
            if which not in self.executors:
                self.executors[which] = LocalExecutor(settings, StepRegistry(settings))
            return self.executors[which]

    def _store(self, key: str, reply: StepReply, log: FilteringBoundLogger) -> None:
        """The reply into Redis, then its hint; waits (a while) for Redis to come back."""
        deadline = time.monotonic() + STORE_PATIENCE
        while True:
            try:
                pipe = self.broker.client.pipeline()
                pipe.set(self.keys.reply(key), encode_reply(key, self.id, reply), ex=REPLY_TTL)
                pipe.lpush(self.keys.replied, key)
                pipe.ltrim(self.keys.replied, 0, REPLIED_KEEP - 1)
                pipe.execute()
                return
            except RedisError as exc:
                if time.monotonic() > deadline:
                    log.error("reply_lost", error=str(exc), why="Redis unreachable; the daemon "
                              "sends the step again")
                    return
                log.warning("reply_waiting_for_redis", error=str(exc))
                time.sleep(1.0)

    # --- heartbeat --------------------------------------------------------------------------

    def heartbeat(self) -> Heartbeat:
        with self.lock:
            return Heartbeat(self.id, self.host, self.pid, self.resources,
                             sum(self.concurrency.values()), time.time(), dict(self.running),
                             dict(self.labels), dict(self.concurrency))

    def _beat_loop(self) -> None:
        while not self.stopping.wait(self.beat_interval):
            try:
                self.broker.client.hset(self.keys.workers, self.id, self.heartbeat().encode())
                for resource, broker in self.brokers.items():  # Dramatiq's liveness mark
                    broker.do_qsize(queue_name(self.settings.cluster.queue, resource))
                self._reap_dead_neighbours()
            except RedisError as exc:
                self.log.warning("heartbeat_failed", error=str(exc))
            except Exception as exc:
                self.log.exception("heartbeat_error", error=repr(exc))

    def _reap_dead_neighbours(self) -> None:
        """Step processes left by a worker on this host that was killed: stopped, so the
        step that went to another worker has the only set of outputs."""
        beats = self.broker.client.hgetall(self.keys.workers)
        dead = set()
        for raw in beats.values():
            beat = Heartbeat.decode(raw)
            if beat and beat.host == self.host and beat.pid != self.pid \
                    and not psutil.pid_exists(beat.pid):
                dead.add(beat.worker)
        if not dead:
            return
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.environ().get(WORKER_MARK) in dead:
                    proc.kill()
                    self.log.warning("orphan_stopped", pid=proc.pid, of=proc.environ()[WORKER_MARK])
            except (psutil.Error, OSError):
                continue
        self.broker.client.hdel(self.keys.workers, *dead)

    # --- life -------------------------------------------------------------------------------

    def serve(self, stop: threading.Event) -> int:
        loop_thread = threading.Thread(target=self.loop.run_forever, name="steps", daemon=True)
        loop_thread.start()
        workers = [self._consume(resource) for resource in self.resources]
        beats = threading.Thread(target=self._beat_loop, name="heartbeat", daemon=True)
        beats.start()
        self.log.info("worker_ready", queues=list(self.queues), concurrency=self.concurrency,
                      threads=sum(self.concurrency.values()),
                      broker_lease=self.settings.cluster.lease)
        stop.wait()
        self.log.info("worker_stopping", running=len(self.running))
        self._stop(workers)
        return 0

    def _consume(self, resource: str) -> dramatiq.Worker:
        """The Dramatiq Worker of one queue: at most its concurrency of steps at once."""
        threads = self.concurrency[resource]
        worker = dramatiq.Worker(self.brokers[resource], worker_threads=threads,
                                 queues={queue_name(self.settings.cluster.queue, resource)})
        worker.queue_prefetch = threads  # no message waits here while another worker idles
        worker.start()
        return worker

    def _stop(self, workers: list[dramatiq.Worker]) -> None:
        grace = self.settings.daemon.shutdown_grace
        stoppers = [threading.Thread(target=w.stop, kwargs={"timeout": int(grace * 1000)})
                    for w in workers]
        deadline = time.monotonic() + grace
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join(max(deadline - time.monotonic(), 0.0))
        with self.lock:
            futures = list(self.futures.values())
        for future in futures:
            future.cancel()
        for stopper in stoppers:
            stopper.join()
        self.stopping.set()
        try:
            self.broker.client.hdel(self.keys.workers, self.id)
        except RedisError as exc:
            self.log.warning("heartbeat_not_removed", error=str(exc))
        for executor in list(self.executors.values()):
            asyncio.run_coroutine_threadsafe(executor.aclose(), self.loop).result(30)
        asyncio.run_coroutine_threadsafe(self.limits.aclose(), self.loop).result(30)
        share_limits(None)
        self.loop.call_soon_threadsafe(self.loop.stop)
        for broker in self.brokers.values():
            broker.close()
        self.log.info("worker_stopped")


def run_worker(settings: Settings, resources: tuple[str, ...], threads: int) -> int:
    """One worker process, until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return StepWorker(settings, resources, threads).serve(stop)


def supervise(argv: Sequence[str], processes: int) -> int:
    """Several worker processes (`argv` starts one); each restarted if it dies, all
    stopped on SIGTERM or SIGINT."""
    log = get_logger(component="worker-supervisor")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    children = [subprocess.Popen(list(argv)) for _ in range(processes)]
    while not stop.wait(1.0):
        for index, child in enumerate(children):
            if child.poll() is not None:
                log.error("worker_process_died", pid=child.pid, returncode=child.returncode,
                          action="started again")
                children[index] = subprocess.Popen(list(argv))
    for child in children:
        child.send_signal(signal.SIGTERM)
    return max((child.wait() for child in children), default=0)


def worker_argv(config: Path | None, resources: Sequence[str], threads: int) -> list[str]:
    argv = [sys.executable, "-m", "traxd", "worker", "--processes", "1", "--threads",
            str(threads), "--queues", ",".join(resources)]
    return argv + (["--config", str(config)] if config is not None else [])
