"""The `download` step: files holding links (.url, .webloc, .txt) become downloaded media.

One link: yt-dlp downloads its audio (in a child process, so it can be stopped) and the
media goes on to the next steps. Several links: one `.url` file per link is dropped into
the inbox as a new job and this job ends. A link already in the download archive is a
permanent failure ("already downloaded"), so the file lands in failed/ saying why.
"""

from __future__ import annotations

import json
import plistlib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from xml.parsers.expat import ExpatError

from traxd.config import Settings
from traxd.errors import Permanent, Retry, TraxdError
from traxd.pipeline.base import RECORD_WHEN_DONE, StepContext, StepResult
from traxd.pipeline.ffmpeg import Tools, find_tools, probe
from traxd.procs import run_process

LINK_SUFFIXES = (".url", ".webloc", ".txt")
MAX_LINK_FILE = 1 << 20  # bytes; a bigger "link file" is something else
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s<>\"']+")
_URL_LINE = re.compile(r"^\s*URL\s*=\s*(\S+)", re.IGNORECASE | re.MULTILINE)
_LINK_LIST_LINE = re.compile(r"\s*(#.*|https?://\S+)?\s*")


def is_link_list(text: str) -> bool:
    """Whether a text is a list of links: every line a link, a comment (#) or blank, and at
    least one link (a `notes.txt` beside recordings is not)."""
    matches = [_LINK_LIST_LINE.fullmatch(line) for line in text.splitlines()]
    return all(matches) and any((m.group(1) or "").startswith("http") for m in matches if m)


def read_links(path: Path) -> list[str]:
    """The links a file holds, in order, without repeats; only http(s) is accepted."""
    data = path.read_bytes()[:MAX_LINK_FILE]
    if path.suffix.lower() == ".webloc":
        links = [_webloc_url(data, path.name)]
    else:
        text = data.decode("utf-8", "replace")
        if path.suffix.lower() == ".txt" and not is_link_list(text):
            raise Permanent(f"{path.name} is a text file but not a list of links (one link per "
                            "line, # for comments): there is nothing in it to download",
                            reason="not_links")
        links = (_URL_LINE.findall(text) if path.suffix.lower() == ".url" else []) or \
            _URL.findall(text)
    links = list(dict.fromkeys(link.rstrip(".,;)") for link in links))
    if not links:
        raise Permanent(f"{path.name} holds no link", reason="no_link")
    for link in links:
        check_link(link)
    return links


def _webloc_url(data: bytes, name: str) -> str:
    try:
        document = plistlib.loads(data)
    except (plistlib.InvalidFileException, ValueError, ExpatError) as exc:
        raise Permanent(f"{name} is not a valid .webloc (plist) file", reason="no_link") from exc
    url = document.get("URL") if isinstance(document, dict) else None
    if not isinstance(url, str):
        raise Permanent(f"{name} has no URL entry", reason="no_link")
    return url.strip()


def check_link(link: str) -> None:
    parts = urlsplit(link)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise Permanent(f"unsupported link {link[:200]!r}: only http and https links are "
                        "downloaded", reason="bad_link")


def write_url_file(path: Path, link: str) -> Path:
    path.write_text(f"[InternetShortcut]\nURL={link}\n", encoding="utf-8")
    return path


class _Answer:
    """Collects the download process's JSON lines: progress goes on, the last one stays."""

    def __init__(self, progress: Callable[[float], None]) -> None:
        self.progress = progress
        self.final: dict[str, Any] | None = None

    def __call__(self, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if message.get("event") == "progress":
            self.progress(0.95 * min(1.0, float(message["fraction"])))
        else:
            self.final = message


class DownloadStep:
    """Links in, media out; other files pass through untouched."""

    name = "download"
    needs_workdir = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._tools: Tools | None = None

    @property
    def archive(self) -> Path:
        return self.settings.download.archive or (
            self.settings.daemon.state_dir / "download-archive.txt")

    async def run(self, ctx: StepContext) -> StepResult:
        if ctx.input.suffix.lower() not in LINK_SUFFIXES:
            return StepResult()
        links = read_links(ctx.input)
        if len(links) > 1:
            return self._split(links, ctx)
        return await self._download(links[0], ctx)

    def _split(self, links: list[str], ctx: StepContext) -> StepResult:
        width = len(str(len(links)))
        files = [write_url_file(ctx.workdir / f"{ctx.job.stem}-{i:0{width}d}.url", link)
                 for i, link in enumerate(links, start=1)]
        ctx.log.info("links_split", links=len(links))
        return StepResult(spawn=files, finish=True, facts={"links": len(links)})

    async def _download(self, link: str, ctx: StepContext) -> StepResult:
        answer = await self._run_worker(link, ctx)
        event = answer.get("event")
        if event == "playlist":
            return self._split_playlist(link, answer["urls"], ctx)
        if event == "archived":
            raise Permanent(f"already downloaded: {link} is in the download archive "
                            f"{self.archive}", reason="duplicate")
        if event == "error":
            raise _error(answer)
        media = Path(answer["media"])
        await self._check_media(media, ctx)
        ctx.progress(1.0)
        ctx.log.info("downloaded", title=answer.get("title"), media=media.name)
        info = ctx.workdir / "media.info.json"
        artifacts = {f"{ctx.job.stem}.info.json": info} if info.is_file() else {}
        facts = {"url": link, "title": answer.get("title"), "extractor": answer.get("extractor"),
                 RECORD_WHEN_DONE: [{"file": str(self.archive), "line": answer["key"]}]}
        return StepResult(artifacts=artifacts, media=media, facts=facts)

    def _split_playlist(self, link: str, urls: list[str], ctx: StepContext) -> StepResult:
        links = [u for u in urls if _is_http(u)]
        if not links:
            raise Permanent(f"{link} is a playlist without entries", reason="no_link")
        return self._split(links, ctx)

    async def _run_worker(self, link: str, ctx: StepContext) -> dict[str, Any]:
        limits = self.settings.download
        job = {"url": link, "folder": str(ctx.workdir.absolute()), "archive": str(self.archive),
               "max_filesize": limits.max_filesize_mb * 2**20,
               "max_duration": limits.max_duration_seconds,
               "allow_private": limits.allow_private}
        argv = [sys.executable, "-m", "traxd.pipeline.ytdlp_worker", json.dumps(job)]
        answer = _Answer(ctx.progress)
        result = await run_process(argv, limits=ctx.limits, on_stdout_line=answer)
        if answer.final is None:
            how = result.signal_name or f"exit status {result.returncode}"
            raise Retry(f"download of {link} ended without an answer ({how}): "
                        f"{result.stderr_tail[-1500:]}", reason="download")
        return answer.final

    async def _check_media(self, media: Path, ctx: StepContext) -> None:
        """Duration is often unknown before the download (direct links): check it now."""
        if self._tools is None:
            self._tools = find_tools()
        info = await probe(media, self._tools, ctx.limits)
        limit = self.settings.download.max_duration_seconds
        if info.duration is not None and info.duration > limit:
            raise Permanent(f"downloaded media is {info.duration:.0f} s long, over "
                            f"max_duration_seconds ({limit:.0f} s)", reason="too_long")

    async def aclose(self) -> None:
        return None


def _is_http(link: str) -> bool:
    return urlsplit(link).scheme.lower() in ("http", "https")


def _error(answer: dict[str, Any]) -> TraxdError:
    message = f"download failed: {answer.get('message')}"
    if answer.get("category") == "retry":
        return Retry(message, reason="download")
    return Permanent(message, reason="download")
