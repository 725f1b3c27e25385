"""Pure parts of scale-out: path maps, message keys, replies, queues, worker settings."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from traxd.cluster.pathmap import PathMap
from traxd.cluster.protocol import (
    Heartbeat,
    decode_reply,
    download_archive,
    encode_reply,
    message_key,
    resource_of,
)
from traxd.cluster.worker import path_problem, worker_settings
from traxd.config import ClusterSettings, Settings, TranscribeSettings, parse_settings
from traxd.errors import ConfigError
from traxd.executor import StepReply, StepRequest
from traxd.procs import ProcessLimits

MAP = PathMap((("/srv/media", "/mnt/media"), ("/srv/media/deep", "/deep"), ("/srv/state", "/s")))


def request(**changes: object) -> StepRequest:
    base = StepRequest(
        job_id=7, inbox="main", name="talks/a.mp3", sha256="ab" * 32, size=10, step_index=1,
        step="transcribe", input="/srv/media/processing/talks/a.mp3",
        source="/srv/media/processing/talks/a.mp3", workdir="/srv/state/work/7/1-transcribe",
        facts={"chunks": [{"path": "/srv/media/x.wav"}]}, artifacts={}, formats=("txt",),
        settings={"model": "small.en", "device": "cuda", "threads": 9},
        limits=ProcessLimits(10.0, 5.0, 100), attempt=2)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_path_map_takes_the_longest_prefix_on_whole_components() -> None:
    assert MAP.to_worker("/srv/media/in/a.mp3") == "/mnt/media/in/a.mp3"
    assert MAP.to_worker("/srv/media/deep/a.mp3") == "/deep/a.mp3"
    assert MAP.to_worker("/srv/mediax/a.mp3") == "/srv/mediax/a.mp3"
    assert MAP.to_worker("relative/a.mp3") == "relative/a.mp3"
    assert MAP.to_daemon("/mnt/media/out/a.txt") == "/srv/media/out/a.txt"


def test_a_request_travels_with_every_path_translated_and_back() -> None:
    data = request().to_json()
    there = StepRequest.from_json(MAP.request_to_worker(data))
    assert there.input == "/mnt/media/processing/talks/a.mp3"
    assert there.workdir == "/s/work/7/1-transcribe"
    assert there.facts["chunks"][0]["path"] == "/mnt/media/x.wav"
    reply = StepReply(artifacts={"a.txt": "/s/work/7/1-transcribe/d/a.txt"}, media="/deep/m.wav")
    back = StepReply.from_json(MAP.reply_to_daemon(reply.to_json()))
    assert back.artifacts == {"a.txt": "/srv/state/work/7/1-transcribe/d/a.txt"}
    assert back.media == "/srv/media/deep/m.wav"


def test_message_key_names_job_content_step_and_attempt() -> None:
    key = message_key(request())
    assert key == f"7.{'ab' * 8}.1.2"
    assert message_key(request(attempt=3)) != key  # a retry is a new key
    assert message_key(request(step_index=2)) != key


def test_a_reply_of_another_key_is_ignored() -> None:
    reply = StepReply(artifacts={"a.txt": "/w/a.txt"})
    stored = encode_reply("7.x.1.2", "host:1", reply)
    assert decode_reply(stored, "7.x.1.2") == reply
    assert decode_reply(stored, "7.x.1.3") is None  # a superseded attempt's reply
    assert decode_reply(None, "7.x.1.2") is None
    assert decode_reply("not json", "7.x.1.2") is None


def test_steps_go_to_queues_by_resource() -> None:
    cpu = Settings()
    gpu = Settings(transcribe=TranscribeSettings(device="cuda"))
    api = Settings(transcribe=TranscribeSettings(backend="openai"))
    assert [resource_of(s, cpu) for s in ("preprocess", ("echo", "{input}"), "download",
                                          "enhance", "transcribe")] == \
        ["cpu", "cpu", "net", "net", "cpu"]
    assert resource_of("transcribe", gpu) == "gpu"
    assert resource_of("transcribe", api) == "net"


def test_worker_takes_the_daemons_model_and_keeps_its_own_machine_settings() -> None:
    own = Settings(transcribe=TranscribeSettings(device="cpu", threads=2, model="tiny.en"))
    mine = worker_settings(own, request())
    assert mine.transcribe.model == "small.en"
    assert (mine.transcribe.device, mine.transcribe.threads) == ("cpu", 2)
    assert worker_settings(own, request(step="preprocess")) is own


def test_a_path_the_worker_cannot_see_fails_naming_path_and_mapping(tmp_path: Path) -> None:
    (tmp_path / "media").mkdir()
    paths = PathMap(((str(tmp_path / "srv"), str(tmp_path / "media")),))
    seen = tmp_path / "media" / "a.mp3"
    seen.write_text("x")
    ok = request(input=str(seen), source=str(seen), workdir=None)
    assert path_problem(ok, paths, "w:1") is None
    gone = str(tmp_path / "elsewhere" / "a.mp3")
    problem = path_problem(request(input=gone, source=gone), paths, "w:1")
    assert problem is not None and problem.category.value == "permanent"
    assert gone in problem.message and "path_map" in problem.message
    assert f"{tmp_path / 'srv'} -> {tmp_path / 'media'}" in problem.message


def test_a_download_archive_the_worker_cannot_see_fails_the_step(tmp_path: Path) -> None:
    seen = tmp_path / "a.url"
    seen.write_text("x")
    unseen = tmp_path / "share" / "download-archive.txt"
    step = request(step="download", input=str(seen), source=str(seen), workdir=None,
                   settings={"archive": str(unseen)})
    problem = path_problem(step, MAP, "w:1")
    assert problem is not None and str(unseen.parent) in problem.message
    unseen.parent.mkdir()
    assert path_problem(step, MAP, "w:1") is None


def test_the_shared_download_archive_is_the_set_one_else_in_the_work_dir(
        tmp_path: Path) -> None:
    settings = Settings()
    with_work = dataclasses.replace(settings, cluster=ClusterSettings(work_dir=tmp_path / "w"))
    named = dataclasses.replace(with_work, download=dataclasses.replace(
        settings.download, archive=tmp_path / "a.txt"))
    assert download_archive(named) == (tmp_path / "a.txt", "[download] archive")
    assert download_archive(with_work) == (tmp_path / "w" / "download-archive.txt",
                                           "[cluster] work_dir")
    assert download_archive(settings) == (
        settings.daemon.state_dir / "download-archive.txt", "[daemon] state_dir")


def test_heartbeat_round_trip_and_liveness() -> None:
    beat = Heartbeat("h:1", "h", 1, ("cpu",), 2, 100.0, {"k": 0.5}, {"k": "main/a.mp3"})
    again = Heartbeat.decode(beat.encode())
    assert again == beat and again.busy == 1
    assert beat.alive(101.0, 3.0) and not beat.alive(104.0, 3.0)


def test_cluster_section_is_parsed_and_checked(tmp_path: Path) -> None:
    raw = {"cluster": {"broker": "redis://127.0.0.1:1/0", "path_map": {"/srv/": "/mnt"},
                       "lease": "5s", "queues": ["gpu"], "work_dir": "shared/work",
                       "concurrency": {"net": 8, "gpu": 1}}}
    cluster = parse_settings(raw, source=tmp_path / "t.toml").cluster
    assert cluster == ClusterSettings(
        broker="redis://127.0.0.1:1/0", path_map=(("/srv", "/mnt"),), lease=5.0,
        queues=("gpu",), work_dir=tmp_path / "shared" / "work",
        concurrency=(("gpu", 1), ("net", 8)))
    assert (cluster.threads_for("gpu", 4), cluster.threads_for("cpu", 4)) == (1, 4)
    for bad in ({"path_map": {"srv": "/mnt"}}, {"queues": ["tpu"]}, {"queue": "a b"},
                {"concurrency": {"gpu": 0}}, {"concurrency": {"tpu": 1}},
                {"concurrency": {"gpu": True}}, {"concurrency": [1]}):
        with pytest.raises(ConfigError, match="cluster"):
            parse_settings({"cluster": bad})


def test_without_a_broker_nothing_of_dramatiq_or_redis_is_imported() -> None:
    code = ("import sys, json; import traxd.daemon, traxd.cli, traxd.jobs, traxd.operations, "
            "traxd.executor; print(json.dumps(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('dramatiq', 'redis') or m.startswith('traxd.cluster'))))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert json.loads(out) == []
