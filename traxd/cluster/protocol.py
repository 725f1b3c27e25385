"""What the daemon and the workers agree on: message keys, Redis key names, queues by
resource, the reply envelope and the worker heartbeat. Pure: no Redis, no Dramatiq."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from traxd.config import Settings, StepSpec
from traxd.executor import StepReply, StepRequest

ACTOR = "traxd_step"
RESOURCES = ("cpu", "gpu", "net")
REPLY_TTL = 7 * 86400  # seconds a reply nobody collected stays in Redis
REPLIED_KEEP = 10_000  # reply hints kept in the list the daemon reads


def message_key(request: StepRequest) -> str:
    """One step of one attempt of one job: deliveries and re-sends of it share the key."""
    return f"{request.job_id}.{request.sha256[:16]}.{request.step_index}.{request.attempt}"


def resource_of(spec: StepSpec, settings: Settings) -> str:
    """The queue a step goes to. Local transcription is `gpu` only when the daemon's
    [transcribe] device is "cuda" (a CPU-only site needs no gpu worker); steps that wait
    on a remote service are `net`; the rest is `cpu`."""
    if spec == "transcribe":
        if settings.transcribe.backend == "openai":
            return "net"
        return "gpu" if settings.transcribe.device == "cuda" else "cpu"
    if spec in ("download", "enhance"):
        return "net"
    return "cpu"


def download_archive(settings: Settings) -> tuple[Path, str]:
    """The download archive the daemon and every worker share, and which setting says so:
    `[download] archive`, else beside the steps' folders in `[cluster] work_dir` (on the
    shared storage), else in the daemon's state_dir as on one machine."""
    if settings.download.archive is not None:
        return settings.download.archive, "[download] archive"
    if settings.cluster.work_dir is not None:
        return settings.cluster.work_dir / "download-archive.txt", "[cluster] work_dir"
    return settings.daemon.state_dir / "download-archive.txt", "[daemon] state_dir"


def queue_name(prefix: str, resource: str) -> str:
    return f"{prefix}.{resource}"


@dataclass(frozen=True)
class Keys:
    """Redis key names of one cluster (its [cluster] queue)."""

    prefix: str

    @property
    def ns(self) -> str:
        return f"traxd:{self.prefix}"

    def reply(self, key: str) -> str:
        return f"{self.ns}:reply:{key}"

    def inflight(self, key: str) -> str:
        return f"{self.ns}:inflight:{key}"

    @property
    def replied(self) -> str:
        return f"{self.ns}:replied"

    @property
    def workers(self) -> str:
        return f"{self.ns}:workers"

    @property
    def paused(self) -> str:
        """Backends paused for the whole site: backend -> SitePause."""
        return f"{self.ns}:paused"

    def limit(self, name: str) -> str:
        """The prefix of one provider's shared rate limit (its keys add :starts, ...)."""
        return f"{self.ns}:limit:{name}"

    def messages(self, queue: str) -> str:
        """Dramatiq's hash of the messages of a queue not yet acknowledged."""
        return f"dramatiq:{queue}.msgs"

    def queue(self, queue: str) -> str:
        """Dramatiq's list of the message ids waiting in a queue."""
        return f"dramatiq:{queue}"


def encode_reply(key: str, worker: str, reply: StepReply) -> str:
    return json.dumps({"key": key, "worker": worker, "reply": reply.to_json()})


def decode_reply(raw: str | bytes | None, key: str) -> StepReply | None:
    """The reply stored for `key`; None when there is none, or it belongs to another key
    (a superseded attempt: never taken for the current one)."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        if data.get("key") != key:
            return None
        return StepReply.from_json(data["reply"])
    except (ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Heartbeat:
    """What a worker process says about itself every beat."""

    worker: str  # host:pid
    host: str
    pid: int
    queues: tuple[str, ...]
    threads: int  # steps at once in all
    at: float  # unix time of the beat
    running: dict[str, float] = field(default_factory=dict)  # message key -> progress 0..1
    steps: dict[str, str] = field(default_factory=dict)  # message key -> "inbox/file step"
    concurrency: dict[str, int] = field(default_factory=dict)  # resource -> steps at once

    @property
    def busy(self) -> int:
        return len(self.running)

    def alive(self, now: float, lease: float) -> bool:
        return now - self.at < lease

    def encode(self) -> str:
        return json.dumps({**self.__dict__, "queues": list(self.queues)})

    @classmethod
    def decode(cls, raw: str | bytes) -> Heartbeat | None:
        try:
            data = json.loads(raw)
            return cls(**{**data, "queues": tuple(data["queues"])})
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class SitePause:
    """A backend a worker found unusable (401, missing model): every worker hands its steps
    back unrun until `traxd resume` deletes the mark. `reason` is the error's message, its
    secrets redacted; never the key."""

    reason: str
    worker: str
    at: float

    def encode(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def decode(cls, raw: str | bytes | None) -> SitePause | None:
        if raw is None:
            return None
        try:
            return cls(**json.loads(raw))
        except (ValueError, TypeError):
            return None
