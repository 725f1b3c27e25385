"""The download step: yt-dlp against a local HTTP server serving generated media."""

from __future__ import annotations

import functools
import json
import plistlib
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.helpers import base_daemon, running_daemon, wait_until, write_config
from traxd.config import Settings
from traxd.errors import Permanent
from traxd.folders import append_lines
from traxd.pipeline.base import RECORD_WHEN_DONE
from traxd.pipeline.ffmpeg import find_tools, probe
from traxd.pipeline.netguard import AddressRefused, guarded, refusal
from traxd.pipeline.ytdlp import DownloadStep, read_links
from traxd.procs import ProcessLimits

from .conftest import ContextFactory, Media, with_changes
from .helpers import ffmpeg


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture(scope="module")
def site(media: Media, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """http://127.0.0.1:PORT serving clip.mp3 (the speech) and long.mp3 (~2 MB)."""
    root = tmp_path_factory.mktemp("site")
    shutil.copy(media["speech.mp3"], root / "clip.mp3")
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=70", "-b:a", "256k",
           str(root / "long.mp3"))
    handler = functools.partial(QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def settings_in(tmp_path: Path, **download: object) -> Settings:
    """Settings for links to the loopback servers here: private addresses allowed."""
    download = {"allow_private": True, **download}
    return with_changes(Settings(), daemon={"state_dir": tmp_path / "state"}, download=download)


def url_file(folder: Path, name: str, link: str) -> Path:
    path = folder / name
    path.write_text(f"[InternetShortcut]\nURL={link}\n")
    return path


async def test_a_link_is_downloaded_as_media_with_info_json(
        site: str, make_ctx: ContextFactory, tmp_path: Path) -> None:
    # Given a .url file pointing at an mp3
    settings = settings_in(tmp_path)
    ctx, _ = make_ctx(url_file(tmp_path, "talk.url", f"{site}/clip.mp3"), settings=settings)
    # When it runs through the download step
    result = await DownloadStep(settings).run(ctx)
    # Then the mp3 is the media for the next steps, with its info.json as an output
    assert result.media is not None and result.media.parent == ctx.workdir
    info = await probe(result.media, find_tools(), ProcessLimits())
    assert info.audio[0].codec == "mp3"
    assert set(result.artifacts) == {"talk.info.json"}
    assert result.facts["url"] == f"{site}/clip.mp3" and not result.spawn
    # And the link goes into the archive only when the whole job is done, not yet
    archive = tmp_path / "state" / "download-archive.txt"
    assert not archive.exists()
    [entry] = result.facts[RECORD_WHEN_DONE]
    assert entry["file"] == str(archive) and entry["line"].startswith("generic ")
    # And once it is there (the job done), the link is refused the second time
    append_lines([(archive, entry["line"])])
    again, _ = make_ctx(url_file(tmp_path, "again.url", f"{site}/clip.mp3"), settings=settings)
    with pytest.raises(Permanent, match="already downloaded"):
        await DownloadStep(settings).run(again)


async def test_webloc_files_are_read(site: str, make_ctx: ContextFactory,
                                     tmp_path: Path) -> None:
    webloc = tmp_path / "talk.webloc"
    webloc.write_bytes(plistlib.dumps({"URL": f"{site}/clip.mp3"}))
    settings = settings_in(tmp_path, archive=tmp_path / "own-archive.txt")
    ctx, _ = make_ctx(webloc, settings=settings)
    result = await DownloadStep(settings).run(ctx)
    assert result.media is not None and result.media.suffix == ".mp3"
    [entry] = result.facts[RECORD_WHEN_DONE]  # the configured archive, not state_dir's
    assert entry["file"] == str(tmp_path / "own-archive.txt")


async def test_several_links_become_new_jobs(make_ctx: ContextFactory, tmp_path: Path) -> None:
    # Given a text file with three links (one repeated), a comment and a blank line
    links = tmp_path / "reading list.txt"
    links.write_text("# to watch\nhttps://example.org/a.mp3\n\nhttp://example.org/b?x=1\n"
                     "  https://example.org/a.mp3\n")
    ctx, _ = make_ctx(links, settings=settings_in(tmp_path))
    # When it runs through the download step
    result = await DownloadStep(ctx.settings).run(ctx)
    # Then one .url file per distinct link is spawned and this job ends here
    assert result.finish and result.media is None
    assert [p.name for p in result.spawn] == ["reading list-1.url", "reading list-2.url"]
    assert [read_links(p) for p in result.spawn] == [["https://example.org/a.mp3"],
                                                     ["http://example.org/b?x=1"]]


@pytest.mark.parametrize(("content", "expected"), [
    ("[InternetShortcut]\nURL=ftp://example.org/a.mp3\n", "only http and https"),
    ("[InternetShortcut]\nURL=file:///etc/passwd\n", "only http and https"),
    ("no links here\n", "holds no link"),
])
async def test_bad_links_are_permanent(make_ctx: ContextFactory, tmp_path: Path, content: str,
                                       expected: str) -> None:
    path = tmp_path / "bad.url"
    path.write_text(content)
    ctx, _ = make_ctx(path, settings=settings_in(tmp_path))
    with pytest.raises(Permanent, match=expected):
        await DownloadStep(ctx.settings).run(ctx)


@pytest.mark.parametrize("content", [
    "Notes from the call. See https://example.org/a.mp3 for the recording.\n",
    "no links here\n",
    "",
])
async def test_a_text_file_that_is_not_a_list_of_links_is_not_downloaded(
        make_ctx: ContextFactory, tmp_path: Path, content: str) -> None:
    # Given notes beside recordings: prose, even with a link in it
    path = tmp_path / "notes.txt"
    path.write_text(content)
    ctx, _ = make_ctx(path, settings=settings_in(tmp_path))
    # Then the download step says it is not a list of links, and fetches nothing
    with pytest.raises(Permanent, match=r"notes\.txt is a text file but not a list of links"):
        await DownloadStep(ctx.settings).run(ctx)




async def test_media_files_pass_through(media: Media, make_ctx: ContextFactory,
                                        tmp_path: Path) -> None:
    ctx, _ = make_ctx(media["speech.mp3"], settings=settings_in(tmp_path))
    result = await DownloadStep(ctx.settings).run(ctx)
    assert (result.media, result.artifacts, result.spawn, result.finish) == (None, {}, [], False)


async def test_missing_page_is_permanent(site: str, make_ctx: ContextFactory,
                                         tmp_path: Path) -> None:
    ctx, _ = make_ctx(url_file(tmp_path, "gone.url", f"{site}/gone.mp3"),
                      settings=settings_in(tmp_path))
    with pytest.raises(Permanent, match="404"):
        await DownloadStep(ctx.settings).run(ctx)


async def test_size_and_duration_caps(site: str, make_ctx: ContextFactory,
                                      tmp_path: Path) -> None:
    # Given a 70 s, ~2.2 MB mp3 and caps of 1 MB, then of 60 s
    link = url_file(tmp_path, "long.url", f"{site}/long.mp3")
    small = settings_in(tmp_path, max_filesize_mb=1)
    ctx, _ = make_ctx(link, settings=small)
    with pytest.raises(Permanent, match="max-filesize"):
        await DownloadStep(small).run(ctx)
    short = settings_in(tmp_path, max_duration_seconds=60.0)
    ctx, _ = make_ctx(link, settings=short)
    with pytest.raises(Permanent, match="over max_duration_seconds"):
        await DownloadStep(short).run(ctx)
    # And neither refused download went into the archive
    assert not (tmp_path / "state" / "download-archive.txt").exists()


# --- misbehaving servers and forged links (issue 13, items 3, 6, 16) ----------------------

STREAM_LIMIT = 64 * 2**20  # what the endless stream sends at most on one connection


class TrickyHandler(BaseHTTPRequestHandler):
    """/endless.mp3: chunked mp3 without Content-Length; /to-ftp, /to-file: redirects;
    /clip.mp3: the speech. Records requests and the bytes each body sent."""

    clip: ClassVar[bytes] = b""
    seen: ClassVar[list[str]] = []
    sent: ClassVar[list[int]] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        if self.path.startswith("/to-"):
            target = {"/to-ftp": "ftp://127.0.0.1:9/a.mp3", "/to-file": "file:///etc/passwd"}
            self.send_response(302)
            self.send_header("Location", target[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/endless.mp3":
            self._endless()
        else:
            self.send_response(200)
            self.send_header("Content-Type", "audio/mpeg")
            self.send_header("Content-Length", str(len(self.clip)))
            self.end_headers()
            self.wfile.write(self.clip)

    def _endless(self) -> None:
        self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        self.send_header("Content-Type", "audio/mpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        sent = 0
        try:
            while sent < STREAM_LIMIT:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(self.clip), self.clip))
                sent += len(self.clip)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.sent.append(sent)

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def tricky(media: Media) -> Iterator[tuple[str, type[TrickyHandler]]]:
    handler = type("Handler", (TrickyHandler,), {
        "clip": media["speech.mp3"].read_bytes(), "seen": [], "sent": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield str(server.server_address[1]), handler
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.parametrize(("host", "address"), [
    ("127.0.0.1", "127.0.0.1"), ("localhost", "localhost ("), ("2130706433", "(127.0.0.1)"),
    ("0x7f000001", "(127.0.0.1)"), ("127.1", "(127.0.0.1)"),
    ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
])
async def test_links_to_this_machine_are_refused_by_default(
        tricky: tuple[str, type[TrickyHandler]], make_ctx: ContextFactory, tmp_path: Path,
        host: str, address: str) -> None:
    # Given a link to this machine, in one of the forms an address can be written in
    port, handler = tricky
    settings = settings_in(tmp_path, allow_private=False)
    ctx, _ = make_ctx(url_file(tmp_path, "x.url", f"http://{host}:{port}/clip.mp3"),
                      settings=settings)
    # When it is downloaded with the default settings
    with pytest.raises(Permanent, match="loopback address") as caught:
        await DownloadStep(settings).run(ctx)
    # Then it is refused naming the address and the setting, and nothing was requested
    assert address in caught.value.message and "allow_private = true" in caught.value.message
    assert handler.seen == []


async def test_allow_private_opens_the_local_network(
        tricky: tuple[str, type[TrickyHandler]], make_ctx: ContextFactory,
        tmp_path: Path) -> None:
    port, handler = tricky
    link = url_file(tmp_path, "x.url", f"http://127.0.0.1:{port}/clip.mp3")
    ctx, _ = make_ctx(link, settings=settings_in(tmp_path, allow_private=True))
    result = await DownloadStep(ctx.settings).run(ctx)
    assert result.media is not None and result.media.stat().st_size == len(handler.clip)


@pytest.mark.parametrize(("path", "target"), [("/to-ftp", "ftp://127.0.0.1:9/a.mp3"),
                                              ("/to-file", "file:///etc/passwd")])
async def test_redirects_out_of_http_are_refused_clearly(
        tricky: tuple[str, type[TrickyHandler]], make_ctx: ContextFactory, tmp_path: Path,
        path: str, target: str) -> None:
    port, _ = tricky
    link = url_file(tmp_path, "x.url", f"http://127.0.0.1:{port}{path}")
    ctx, _ = make_ctx(link, settings=settings_in(tmp_path))
    with pytest.raises(Permanent) as caught:
        await DownloadStep(ctx.settings).run(ctx)
    assert f"redirected to '{target}'; only http and https" in caught.value.message


async def test_a_body_without_length_is_stopped_at_the_size_cap(
        tricky: tuple[str, type[TrickyHandler]], make_ctx: ContextFactory,
        tmp_path: Path) -> None:
    # Given a server streaming mp3 without Content-Length (64 MB) and a cap of 1 MB
    port, handler = tricky
    link = url_file(tmp_path, "x.url", f"http://127.0.0.1:{port}/endless.mp3")
    ctx, _ = make_ctx(link, settings=settings_in(tmp_path, max_filesize_mb=1))
    # When it is downloaded
    with pytest.raises(Permanent, match=r"passed max_filesize_mb \(1 MB\) and was stopped"):
        await DownloadStep(ctx.settings).run(ctx)
    # Then the download stopped early: no connection got the whole stream
    assert handler.sent and max(handler.sent) < STREAM_LIMIT


async def test_a_malformed_webloc_is_named_as_such(make_ctx: ContextFactory,
                                                   tmp_path: Path) -> None:
    webloc = tmp_path / "talk.webloc"
    webloc.write_text('<?xml version="1.0"?><plist version="1.0"><dict><key>URL</key>'
                      "<string>https://example.org/a.mp3</dict></plist>")
    ctx, _ = make_ctx(webloc, settings=settings_in(tmp_path))
    with pytest.raises(Permanent, match=r"talk\.webloc is not a valid \.webloc") as caught:
        await DownloadStep(ctx.settings).run(ctx)
    assert "Expat" not in caught.value.message


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1%1", "link-local"), ("10.1.2.3", "private"),
    ("172.16.0.1", "private"), ("192.168.1.10", "private"), ("fd00::1", "private"),
    ("::ffff:192.168.0.1", "private"), ("2002:7f00:1::", "loopback"),
    ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"), ("100.64.0.1", "non-public"),
    ("8.8.8.8", None), ("2001:4860:4860::8888", None),
])
def test_addresses_that_are_not_public_are_named(address: str, kind: str | None) -> None:
    assert refusal(address) == (kind and f"a {kind} address")


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "0177.0.0.1", "127.1",
                                  "::ffff:169.254.169.254", "localhost"])
def test_every_way_of_writing_a_local_address_resolves_to_a_refusal(host: str) -> None:
    # numeric forms and /etc/hosts names resolve on this machine: no query leaves it
    with pytest.raises(AddressRefused, match=r"is a (loopback|link-local) address"):
        guarded(socket.getaddrinfo)(host, 80, 0, socket.SOCK_STREAM)


class GatedClips(BaseHTTPRequestHandler):
    """Serves the clip for any path; each request waits (up to 20 s) until `together`
    requests are in flight at once, so that downloads one at a time are seen."""

    clip: ClassVar[bytes] = b""
    together: ClassVar[int] = 2
    lock: ClassVar[threading.Condition] = threading.Condition()
    inside: ClassVar[list[int]] = [0, 0]  # now, most

    def do_GET(self) -> None:
        with self.lock:
            self.inside[0] += 1
            self.inside[1] = max(self.inside[1], self.inside[0])
            self.lock.notify_all()
            self.lock.wait_for(lambda: self.inside[1] >= self.together, timeout=20)
            self.inside[0] -= 1
        self.send_response(200)
        self.send_header("Content-Type", "audio/mpeg")
        self.send_header("Content-Length", str(len(self.clip)))
        self.end_headers()
        self.wfile.write(self.clip)

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.mark.slow
def test_a_thousand_links_are_queued_quickly_and_fetched_side_by_side(
        media: Media, tmp_path: Path) -> None:
    # Given a daemon with 2 workers and a download inbox, and a server of clips
    handler: type[GatedClips] = type("Handler", (GatedClips,), {
        "clip": media["speech.mp3"].read_bytes(), "lock": threading.Condition(),
        "inside": [0, 0]})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    inbox = tmp_path / "links" / "inbox"
    config = write_config(
        tmp_path / "traxd.toml", base_daemon(tmp_path, workers=2, settle_seconds=2.0,
                                             batch_interval="5s"),
        [{"name": "links", "path": str(inbox), "pipeline": ["download"]}],
        download={"allow_private": True})
    port = server.server_address[1]
    try:
        with running_daemon(config, tmp_path / "log") as daemon:
            # When a .txt with 1,000 links is dropped
            staged = tmp_path / "reading list.txt"
            staged.write_text("".join(f"http://127.0.0.1:{port}/c{i}.mp3\n" for i in range(1000)))
            dropped = time.monotonic()
            staged.rename(inbox / staged.name)
            # Then all 1,000 spawned jobs are queued within a minute (211 s before intake
            # took files in batches; 9 s now on a busy 2-core machine)
            wait_until(lambda: daemon.log_text().count('"file_queued"') >= 1001, 120,
                       interval=0.5, message="1,000 spawned jobs queued")
            assert time.monotonic() - dropped < 60
            # And two downloads are in flight at once: one per worker
            wait_until(lambda: handler.inside[1] >= 2, 60, message="two downloads at once")
    finally:
        server.shutdown()
        server.server_close()


def _netns_usable() -> bool:
    argv = ["unshare", "-rn", "ip", "addr", "add", "1.2.3.4/32", "dev", "lo"]
    try:
        return subprocess.run(argv, capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.parametrize("mode", ["redirect", "page"])
def test_a_public_link_leading_to_this_machine_is_refused(
        media: Media, tmp_path: Path, mode: str) -> None:
    # Given, in a network namespace of its own (no packet can leave it), a "public" server
    # at 1.2.3.4 that redirects to 127.0.0.1, or serves a page whose media is there
    if not _netns_usable():
        pytest.skip("needs unprivileged network namespaces (unshare -rn) and ip")
    script = ("ip link set lo up && ip addr add 1.2.3.4/32 dev lo && "
              'exec "$0" -m tests.media.netns_fetch "$@"')
    done = subprocess.run(
        ["unshare", "-rn", "sh", "-c", script, sys.executable, mode,
         str(media["speech.mp3"]), str(tmp_path)],
        capture_output=True, text=True, timeout=180, check=True, cwd=Path(__file__).parents[2])
    # When the download process follows the link with the default settings
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Then it refuses the private address at the second hop and never requests it
    reply = result["reply"]
    assert reply.get("event") == "error" and reply["category"] == "permanent", reply
    assert "127.0.0.1 is a loopback address" in reply["message"]
    assert result["loopback_hits"] == []
