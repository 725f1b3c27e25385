"""The folders beside an inbox, file names in them, and moves and writes that survive a crash."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from traxd.config import FolderNames, InboxSettings, Settings
from traxd.errors import ConfigError

TMP_SUFFIX = ".traxd-tmp"
IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", ".download", TMP_SUFFIX)
NAME_MAX = 255  # bytes in one path component (Linux, macOS)


@dataclass(frozen=True)
class InboxFolders:
    """An inbox and its siblings: X/inbox, X/processing, X/done, X/outputs, X/failed."""

    inbox: Path
    processing: Path
    done: Path
    outputs: Path
    failed: Path
    library: Path | None = None  # subtitles go here (not beside the original); not traxd's

    @classmethod
    def of(cls, inbox: InboxSettings, names: FolderNames,
           library: Path | None = None) -> InboxFolders:
        root = inbox.path.parent
        return cls(inbox.path, root / names.processing, root / names.done,
                   root / names.outputs, root / names.failed, library)

    def all(self) -> tuple[Path, ...]:
        return (self.inbox, self.processing, self.done, self.outputs, self.failed)

    def create(self) -> None:
        for folder in self.all():
            folder.mkdir(parents=True, exist_ok=True)


def create_folders(settings: Settings) -> None:
    """Every inbox and its siblings; a place that cannot be a folder is a ConfigError."""
    for index, inbox in enumerate(settings.inboxes):
        try:
            InboxFolders.of(inbox, settings.folders).create()
        except OSError as exc:
            raise ConfigError(str(settings.source or "<config>"), f"inbox[{index}].path",
                              why_not_a_folder(exc)) from exc


def why_not_a_folder(exc: OSError) -> str:
    """What went wrong creating a folder, and what to do, for an operator."""
    place = exc.filename
    if exc.errno == errno.EEXIST:
        return f"{place} is a file, not a folder: name another place or move the file"
    if exc.errno == errno.ENOTDIR:
        return f"a parent of {place} is a file, not a folder: name another place"
    return f"cannot create the folder {place}: {exc.strerror}"


def is_ignored(name: str) -> bool:
    """Names still being written or hidden: `.x`, `~x`, `x.part`, `x.tmp`, `x.crdownload`, …"""
    return name.startswith((".", "~")) or name.lower().endswith(IGNORED_SUFFIXES)


def folder_prefix(root: Path) -> str:
    """`root` as a string ending in a separator, for `relative_below`."""
    return str(root).rstrip(os.sep) + os.sep


def relative_below(prefix: str, path: str) -> str | None:
    """`path` below the folder `prefix` (see folder_prefix) as a posix name; None when it is
    outside, the folder itself, or hidden or partial in any part. Strings only: it runs for
    every watcher event."""
    if not path.startswith(prefix) or len(path) == len(prefix):
        return None
    rel = path[len(prefix):]
    if os.sep != "/":
        rel = rel.replace(os.sep, "/")
    if any(not part or part in (".", "..") or is_ignored(part) for part in rel.split("/")):
        return None
    return rel


def relative_name(root: Path, path: Path) -> str | None:
    """`path` relative to `root` as a posix string; None when outside or any part is ignored."""
    return relative_below(folder_prefix(root), str(path))


def scan(root: Path) -> Iterator[str]:
    """Relative names of candidate files under root, never following symbolic links."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        linked = [d for d in dirnames if (base / d).is_symlink()]
        dirnames[:] = [d for d in dirnames if not is_ignored(d) and d not in linked]
        for name in [*filenames, *linked]:  # a linked folder is reported, to be refused
            rel = relative_name(root, base / name)
            if rel is not None:
                yield rel


def fit_name(stem: str, tail: str) -> str:
    """stem + tail, the stem shortened (never the tail) to fit in NAME_MAX bytes."""
    room = NAME_MAX - len(os.fsencode(tail))
    while len(os.fsencode(stem)) > room:
        stem = stem[:-1]  # whole characters, so that a UTF-8 name stays valid
    return stem + tail


def numbered(name: str, n: int) -> str:
    """`talk.mp3` -> `talk (n).mp3`; `archive.tar.gz` keeps only the last suffix.

    A name already near NAME_MAX loses the end of its stem to make room for the number.
    """
    path = PurePosixPath(name)
    return str(path.with_name(fit_name(path.stem, f" ({n}){path.suffix}")))


def sidecar_path(path: Path, suffix: str = ".error.json") -> Path:
    """`failed/talk.mp3` -> `failed/talk.mp3.error.json`, shortened when too long."""
    return path.with_name(fit_name(path.name, suffix))


def unique_path(folder: Path, rel: str, taken: set[Path] | None = None) -> Path:
    """A path under folder for rel that exists nowhere yet: `x.mp3`, `x (1).mp3`, …"""
    candidate, n = folder / rel, 0
    while os.path.lexists(candidate) or (taken is not None and candidate in taken):
        n += 1
        candidate = folder / numbered(rel, n)
    return candidate


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path_for(dest: Path) -> Path:
    """`.name.traxd-tmp` beside dest; for a name near NAME_MAX, a digest of it instead."""
    name = f".{dest.name}{TMP_SUFFIX}"
    if len(os.fsencode(name)) > NAME_MAX:
        name = f".{hashlib.sha256(os.fsencode(dest.name)).hexdigest()[:32]}{TMP_SUFFIX}"
    return dest.with_name(name)


def fsync_dirs(folders: set[Path]) -> None:
    """Make renames and new names in these folders durable: one fsync per folder."""
    for folder in sorted(folders):
        fsync_dir(folder)


def _sync_dir(folder: Path, later: set[Path] | None) -> None:
    if later is None:
        fsync_dir(folder)
    else:
        later.add(folder)


@contextlib.contextmanager
def atomic_file(dest: Path, later: set[Path] | None = None) -> Iterator[BinaryIO]:
    """A file that becomes dest only when the block ends without error (tmp, fsync, replace).

    Until then dest is absent or old, never partial; on error the temporary file is removed.
    With `later`, the folder is added to it for one fsync per batch (`fsync_dirs`) instead
    of being synced here.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(dest)
    try:
        with tmp.open("wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _sync_dir(dest.parent, later)


def write_atomic(dest: Path, data: bytes, later: set[Path] | None = None) -> None:
    with atomic_file(dest, later) as handle:
        handle.write(data)


def copy_atomic(src: Path, dest: Path, later: set[Path] | None = None) -> None:
    with src.open("rb") as source, atomic_file(dest, later) as handle:
        shutil.copyfileobj(source, handle, 1 << 20)


def move(src: Path, dest: Path, later: set[Path] | None = None) -> None:
    """Rename src to dest; across filesystems copy, fsync, rename, then unlink src.

    dest must not exist (callers pick it with unique_path); a symbolic link is moved as a link.
    With `later`, both folders are added to it for `fsync_dirs` instead of synced here.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        if src.is_symlink():
            os.symlink(os.readlink(src), dest)
        else:
            copy_atomic(src, dest, later)
        try:
            src.unlink()
        except OSError:
            dest.unlink()  # the original stays: no second copy of it is left behind
            raise
    _sync_dir(dest.parent, later)
    if src.parent != dest.parent:
        _sync_dir(src.parent, later)


def movable(path: Path) -> bool:
    """Whether a file can be moved out of its folder (the folder is writable to us)."""
    return os.access(path.parent, os.W_OK)


class LinkOnPath(OSError):
    """A folder between an inbox and a file is a symbolic link: nothing is taken through it."""


def move_out_of(root: Path, rel: str, dest: Path, later: set[Path] | None = None) -> None:
    """Rename root/rel to dest without following a symbolic link in any folder of rel.

    Each folder is opened below the one before with O_NOFOLLOW, and the rename names the
    file relative to the last one, so a folder swapped for a link after the file was seen
    cannot lead outside `root` (LinkOnPath). Across filesystems, `move` takes over.
    """
    *folders, name = PurePosixPath(rel).parts
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for folder in folders:
            try:
                inner = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise LinkOnPath(exc.errno, f"{folder!r} on the way to {rel!r} is a "
                                     "symbolic link or not a folder; traxd never follows links "
                                     "out of an inbox") from exc
                raise
            os.close(fd)
            fd = inner
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(name, dest, src_dir_fd=fd)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            move(root / rel, dest, later)
            return
    finally:
        os.close(fd)
    _sync_dir(dest.parent, later)
    _sync_dir((root / rel).parent, later)


def append_lines(records: list[tuple[Path, str]]) -> None:
    """Append each line to its file (made when missing), synced: a record that must
    outlive a crash, such as the download archive."""
    for path, line in records:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def remove_empty_parents(path: Path, stop: Path) -> None:
    """Remove empty folders from path's parent up to, not including, stop."""
    folder = path.parent
    while folder != stop and folder.is_relative_to(stop):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def sweep_temporaries(folder: Path) -> int:
    """Delete temporary files left by a crash mid-write; returns how many."""
    removed = 0
    if not folder.is_dir():
        return 0
    for dirpath, _, filenames in os.walk(folder, followlinks=False):
        for name in filenames:
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
                (Path(dirpath) / name).unlink(missing_ok=True)
                removed += 1
    return removed


def describe_unprocessable(path: Path) -> str | None:
    """Why a path in the inbox cannot be processed as a regular file, or None when it can."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return "the file vanished from the inbox"
    if stat.S_ISLNK(info.st_mode):
        return "a symbolic link: traxd never follows links; move or copy the file in instead"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (a FIFO, socket or device)"
    if not os.access(path, os.R_OK):
        return "no read permission for the traxd user"
    return None
