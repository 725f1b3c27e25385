"""Per-queue concurrency: `[cluster] concurrency` bounds the steps of a queue that one
`traxd worker` runs at once, whatever --threads says (real daemon, worker, model)."""

from __future__ import annotations

import itertools
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from tests.cluster.kit import RedisServer, Site, WorkerProcess, cluster_config, make_site
from tests.helpers import files_under

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TEXT = "Bring your notes."


def spans(worker: WorkerProcess) -> list[tuple[datetime, datetime]]:
    """From step_received to step_replied, per message, as the worker's log says."""
    began = {e["key"]: e["timestamp"] for e in worker.events_named("step_received")}
    ended = {e["key"]: e["timestamp"] for e in worker.events_named("step_replied")}
    return sorted((datetime.fromisoformat(began[k]), datetime.fromisoformat(ended[k]))
                  for k in ended)


def test_a_gpu_queue_with_concurrency_one_never_runs_two_steps_at_once(
        short_root: Path, redis_server: RedisServer, site_factory: list[Site]) -> None:
    # Given a daemon whose transcription goes to the gpu queue (device "cuda") and a worker
    # that takes that queue with 3 threads but `concurrency = { gpu = 1 }` (its own config:
    # it transcribes on its CPU)
    spoken = {"backend": "local", "model": "tiny.en", "language": "en", "processes": 1}
    site = make_site(site_factory, short_root, redis_server, ["transcribe"],
                     daemon={"workers": 2, "step_timeout": "5m"},
                     transcribe={**spoken, "device": "cuda"})
    own = cluster_config(short_root, redis_server.url, ["transcribe"], name="worker.toml",
                         transcribe={**spoken, "device": "cpu"},
                         cluster={"concurrency": {"gpu": 1}})
    worker = WorkerProcess(own, short_root / "gpu-worker.log", "--queues", "gpu",
                           "--threads", "3").start()
    site.workers.append(worker)
    (ready,) = worker.events_named("worker_ready")
    assert ready["queues"] == ["traxd.gpu"] and ready["concurrency"] == {"gpu": 1}
    site.daemon.start()
    names = [f"note{i}.wav" for i in range(2)]
    for name in names:
        speech = short_root / name
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(speech), TEXT], check=True)
        speech.rename(site.box.inbox / name)
    # When both are sent at once
    site.wait_done(names, timeout=120)
    # Then the worker ran them one after the other
    ran = spans(worker)
    assert [e["step"] for e in worker.events_named("step_replied")] == ["transcribe"] * 2
    assert all(ended <= began for (_, ended), (began, _) in itertools.pairwise(ran)), ran
    assert {f"{Path(n).stem}.txt" for n in names} <= set(files_under(site.box.outputs))
