"""The download archive on shared storage: a worker that mounts the share elsewhere reads
the daemon's archive through path_map (real daemon, worker, yt-dlp, loopback HTTP)."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.kit import RedisServer, Site, WorkerProcess, cluster_config, make_site
from tests.helpers import files_under, wait_until
from tests.media.helpers import ffmpeg

pytestmark = [pytest.mark.slow, pytest.mark.integration]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def clip_url(tmp_path: Path) -> Iterator[str]:
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=2", str(tmp_path / "clip.mp3"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        QuietHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/clip.mp3"
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_worker_reads_the_shared_archive_through_its_path_map(
        short_root: Path, redis_server: RedisServer, site_factory: list[Site],
        clip_url: str) -> None:
    # Given a daemon keeping the steps' folders on the share (work_dir) and no [download]
    # archive, and a worker that sees the share at another path and has a state_dir of
    # its own
    view = short_root / "view"
    view.symlink_to(short_root)
    work = short_root / "share" / "work"
    site = make_site(site_factory, short_root, redis_server, ["download"],
                     download={"allow_private": True}, cluster={"work_dir": str(work)})
    own = cluster_config(short_root, redis_server.url, ["download"], name="worker.toml",
                         daemon={"state_dir": str(short_root / "worker-state")},
                         cluster={"path_map": {str(short_root): str(view)}})
    worker = WorkerProcess(own, short_root / "worker.log", "--queues", "net").start()
    site.workers.append(worker)
    site.daemon.start()
    # When a link is downloaded, and then dropped again under another name
    (site.box.inbox / "first.url").write_text(f"[InternetShortcut]\nURL={clip_url}\n")
    site.wait_done(["first.url"])
    archive = work / "download-archive.txt"
    assert archive.read_text().startswith("generic ")  # recorded by the daemon, on the share
    again = f"[InternetShortcut]\nURL={clip_url}\nIconIndex=0\n"  # other bytes: no duplicate
    (site.box.inbox / "again.url").write_text(again)
    wait_until(lambda: "again.url.error.json" in files_under(site.box.failed)
               or files_under(site.box.done) != ["first.url"], 30,
               message="the second link failed")
    # Then the worker found it in that archive, which it reached through its path_map
    error = json.loads((site.box.failed / "again.url.error.json").read_text())
    assert error["reason"] == "duplicate" and "already downloaded" in error["message"]
    said = worker.events_named("download_archive")
    assert [(e["path"], e["daemon_path"]) for e in said] == [
        (str(view / "share" / "work" / "download-archive.txt"), str(archive))]
    assert not (short_root / "worker-state" / "download-archive.txt").exists()
