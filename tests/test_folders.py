"""Folders: collision-free names, atomic writes, moves across filesystems, what is ignored."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from traxd.folders import (
    copy_atomic,
    describe_unprocessable,
    is_ignored,
    move,
    scan,
    sweep_temporaries,
    unique_path,
    write_atomic,
)


@pytest.mark.parametrize("name", [".hidden.mp3", "~lock.mp3", "a.part", "b.TMP", "c.crdownload",
                                  "d.download", ".x.mp3.traxd-tmp"])
def test_names_still_being_written_are_ignored(name: str) -> None:
    assert is_ignored(name)


@pytest.mark.parametrize("name", ["talk.mp3", "-rf.mp3", "a'b\".wav", "日本語.m4a", "x.partial"])
def test_ordinary_names_are_not_ignored(name: str) -> None:
    assert not is_ignored(name)


def test_unique_path_numbers_before_the_extension(tmp_path: Path) -> None:
    assert unique_path(tmp_path, "talk.mp3") == tmp_path / "talk.mp3"
    (tmp_path / "talk.mp3").touch()
    (tmp_path / "talk (1).mp3").touch()
    assert unique_path(tmp_path, "talk.mp3") == tmp_path / "talk (2).mp3"
    assert unique_path(tmp_path, "sub/x.txt", taken={tmp_path / "sub/x.txt"}) == \
        tmp_path / "sub/x (1).txt"


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "talk.txt"
    write_atomic(dest, b"one")
    write_atomic(dest, b"two")
    assert dest.read_bytes() == b"two"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["talk.txt"]


def test_failed_write_leaves_old_content_and_no_temporary(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "talk.txt"
    write_atomic(dest, b"old")

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_atomic(dest, b"new")
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["talk.txt"]


def test_move_across_filesystems_copies_then_unlinks(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    src, dest = tmp_path / "a" / "x.mp3", tmp_path / "b" / "x.mp3"
    src.parent.mkdir()
    src.write_bytes(b"media")
    real_rename = os.rename
    calls: list[str] = []

    def cross_device(a: str | Path, b: str | Path) -> None:
        calls.append(str(a))
        if Path(a) == src:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", cross_device)
    move(src, dest)
    assert dest.read_bytes() == b"media"
    assert not src.exists()
    assert calls[0] == str(src)


def test_copy_atomic_is_repeatable(tmp_path: Path) -> None:
    src = tmp_path / "s.txt"
    src.write_text("x")
    copy_atomic(src, tmp_path / "o" / "d.txt")
    copy_atomic(src, tmp_path / "o" / "d.txt")
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["d.txt"]


def test_scan_recurses_but_never_follows_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.mp3").write_text("x")
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    (inbox / "sub" / "a.mp3").write_text("x")
    (inbox / "b.mp3.part").write_text("x")
    (inbox / "link-dir").symlink_to(outside)
    (inbox / "link.mp3").symlink_to(outside / "secret.mp3")
    names = sorted(scan(inbox))
    assert names == ["link-dir", "link.mp3", "sub/a.mp3"]
    assert "symbolic link" in (describe_unprocessable(inbox / "link.mp3") or "")
    assert "symbolic link" in (describe_unprocessable(inbox / "link-dir") or "")


def test_fifo_is_unprocessable(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.mp3"
    os.mkfifo(fifo)
    assert "not a regular file" in (describe_unprocessable(fifo) or "")


def test_sweep_removes_only_our_temporaries(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".talk.txt.traxd-tmp").write_text("partial")
    (tmp_path / "keep.txt").write_text("x")
    assert sweep_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["keep.txt"]
