"""The download process of the `download` step: `python -m traxd.pipeline.ytdlp_worker JOB`.

JOB is a JSON object (url, folder, archive, max_filesize, max_duration, allow_private).
Every connection is checked by traxd.pipeline.netguard first. yt-dlp runs here,
not in the daemon, so that a download can be stopped at any moment. Answers are JSON lines
on stdout: {"event": "progress"} any number of times, then one of "done", "archived",
"playlist" or "error" (with a category: "retry" or "permanent"). The daemon records a
download in the archive once it has checked the media.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urljoin

from traxd.errors import Category, classify_http_status
from traxd.pipeline import netguard
from traxd.pipeline.jsonlines import protocol_stream, send

PLAYLIST_LIMIT = 500
REDIRECTS = (301, 302, 303, 307, 308)


class TooLarge(Exception):
    """More bytes arrived than max_filesize allows (a body without Content-Length)."""


class Messages:
    """yt-dlp's logger: everything to stderr; the last line (the reason) kept for errors."""

    def __init__(self) -> None:
        self.last: deque[str] = deque(maxlen=1)

    def _keep(self, message: str) -> None:
        print(message, file=sys.stderr)
        self.last.append(message)

    debug = info = warning = error = _keep


def archive_key(info: dict[str, Any]) -> str:
    """yt-dlp's archive line; a generic link is known by its URL, not its file name."""
    from yt_dlp.utils import make_archive_id

    extractor = str(info.get("extractor_key") or info.get("extractor") or "generic")
    if extractor.lower() == "generic":
        url = str(info.get("webpage_url") or info.get("url"))
        return str(make_archive_id("generic", hashlib.sha256(url.encode()).hexdigest()[:32]))
    return str(make_archive_id(extractor, str(info["id"])))


def in_archive(archive: Path, key: str) -> bool:
    if not archive.is_file():
        return False
    return key in archive.read_text(encoding="utf-8").splitlines()


def duration_filter(limit: float) -> Callable[..., str | None]:
    def check(info: dict[str, Any], *, incomplete: object = False) -> str | None:
        duration = info.get("duration")
        if duration is not None and duration > limit:
            return f"{duration:.0f} s is longer than max_duration_seconds ({limit:.0f} s)"
        return None

    return check


def options(job: dict[str, Any], log: Messages, out: TextIO) -> dict[str, Any]:
    limit = job["max_filesize"]

    def hook(status: dict[str, Any]) -> None:
        received = status.get("downloaded_bytes") or 0
        if received > limit:  # yt-dlp checks only a Content-Length it is given
            raise TooLarge(f"the download passed max_filesize_mb ({limit / 2**20:.0f} MB) "
                           "and was stopped")
        total = status.get("total_bytes") or status.get("total_bytes_estimate")
        if status.get("status") == "downloading" and total:
            send(out, {"event": "progress", "fraction": status["downloaded_bytes"] / total})

    return {
        "format": "bestaudio/best", "outtmpl": str(Path(job["folder"]) / "media.%(ext)s"),
        "writeinfojson": True, "noplaylist": True, "extract_flat": "in_playlist",
        "max_filesize": job["max_filesize"], "match_filter": duration_filter(job["max_duration"]),
        "quiet": True, "noprogress": True, "logger": log, "progress_hooks": [hook],
        "socket_timeout": 30, "retries": 3, "restrictfilenames": True,
    }


def too_big(info: dict[str, Any], job: dict[str, Any]) -> str | None:
    size = info.get("filesize") or info.get("filesize_approx")
    if size and size > job["max_filesize"]:
        return (f"{size / 2**20:.0f} MB is larger than max_filesize_mb "
                f"({job['max_filesize'] / 2**20:.0f} MB)")
    return duration_filter(job["max_duration"])(info)


def playlist(info: dict[str, Any]) -> dict[str, Any]:
    entries = list(info.get("entries") or [])[:PLAYLIST_LIMIT]
    urls = [str(e.get("url") or e.get("webpage_url")) for e in entries
            if e and (e.get("url") or e.get("webpage_url"))]
    return {"event": "playlist", "urls": urls}


def download(job: dict[str, Any], log: Messages, out: TextIO) -> dict[str, Any]:
    from yt_dlp import YoutubeDL

    archive = Path(job["archive"])
    with YoutubeDL(options(job, log, out)) as ydl:
        only_urllib(ydl)
        info = ydl.extract_info(job["url"], download=False)
        if info is None:
            return _error("permanent", "nothing to download", log)
        if info.get("_type") in ("playlist", "multi_video"):
            return playlist(info)
        key = archive_key(info)
        if in_archive(archive, key):
            return {"event": "archived", "key": key}
        if reason := too_big(info, job):
            return _error("permanent", reason, log)
        result = ydl.process_ie_result(info, download=True)
    files = [d.get("filepath") for d in (result or {}).get("requested_downloads") or []]
    media = [f for f in files if f and Path(f).is_file()]
    if not media:
        return _error("permanent", "nothing was downloaded", log)
    return {"event": "done", "media": media[0], "key": key, "title": info.get("title"),
            "duration": info.get("duration"), "extractor": info.get("extractor_key")}


def _error(category: str, message: str, log: Messages) -> dict[str, Any]:
    said = " | ".join(log.last)
    return {"event": "error", "category": category,
            "message": f"{message}{' (yt-dlp: ' + said + ')' if said else ''}"}


def causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        exc_info = getattr(current, "exc_info", None)
        todo += [current.__cause__, current.__context__,
                 exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) > 1 else None,
                 *getattr(current, "unexpected_errors", ())]  # NoSupportingHandlers


def category_of(exc: BaseException) -> str:
    """HTTP status where one is known; network trouble is worth a retry; else permanent."""
    from yt_dlp.networking.exceptions import HTTPError, TransportError

    for cause in causes(exc):
        if isinstance(cause, HTTPError):
            return "retry" if classify_http_status(cause.status) is Category.RETRY else "permanent"
    retryable = (TransportError, TimeoutError, ConnectionError)
    return "retry" if any(isinstance(c, retryable) for c in causes(exc)) else "permanent"


def only_urllib(ydl: Any) -> None:
    """Every request through urllib, whose redirects guard_redirects checks: yt-dlp would
    prefer `requests` or curl_cffi where they are installed, and curl resolves names itself,
    out of netguard's sight."""
    from yt_dlp.networking._urllib import UrllibRH

    ydl._request_director = ydl.build_request_director([UrllibRH])


def guard_redirects() -> None:
    """Check the target of every redirect before urllib follows it (netguard checks the
    address when it connects; this refuses ftp:, file: and data: with a clear reason)."""
    from yt_dlp.networking._urllib import RedirectHandler

    follow = RedirectHandler.http_error_302

    def checked(self: Any, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
        target = headers.get("location") or headers.get("uri")
        if target:
            netguard.check_redirect(urljoin(req.full_url, target))
        return follow(self, req, fp, code, msg, headers)

    for code in REDIRECTS:
        setattr(RedirectHandler, f"http_error_{code}", checked)


def failure(exc: BaseException) -> dict[str, Any]:
    """The error answer: a refusal of ours says why in its own words."""
    for cause in causes(exc):
        if isinstance(cause, netguard.AddressRefused | TooLarge):
            return {"event": "error", "category": "permanent", "message": str(cause)}
    return {"event": "error", "category": category_of(exc), "message": str(exc)}


def main(argv: Sequence[str] | None = None) -> int:
    job = json.loads((argv or sys.argv[1:])[0])
    out = protocol_stream()
    log = Messages()
    try:
        netguard.install(bool(job.get("allow_private")))
        guard_redirects()
        reply = download(job, log, out)
    except Exception as exc:  # every failure goes back to the daemon, classified
        reply = failure(exc)
    send(out, reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
