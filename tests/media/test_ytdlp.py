"""The download step: yt-dlp against a local HTTP server serving generated media."""

from __future__ import annotations

import functools
import plistlib
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from traxd.config import Settings
from traxd.errors import Permanent
from traxd.folders import append_lines
from traxd.pipeline.base import RECORD_WHEN_DONE
from traxd.pipeline.ffmpeg import find_tools, probe
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
    # Given a text file with three links (one repeated) among prose
    links = tmp_path / "reading list.txt"
    links.write_text("Watch https://example.org/a.mp3 and\nhttp://example.org/b?x=1, then\n"
                     "again https://example.org/a.mp3.\n")
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
