"""Bad input: each bad file ends with a clear reason, the daemon keeps running, and a good
file dropped afterwards is still processed."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from tests.faults.kit import (
    Box,
    FaultDaemon,
    Tally,
    job_of,
    log_events,
    make_media,
    read_jobs,
)
from tests.helpers import base_daemon, copy_step, files_under, wait_until, write_config
from traxd.control import request
from traxd.journal import Journal

pytestmark = pytest.mark.faults

OUTCOME_TIMEOUT = 30.0


@dataclass
class Rig:
    """One daemon for the whole module: a `command` inbox and a `preprocess` inbox."""

    root: Path
    config: Path
    daemon: FaultDaemon
    cmd: Box
    media: Box
    ledger: Path
    outside: Path  # a folder no inbox contains: symbolic links point here
    sources: dict[str, Path]  # real media made with espeak-ng and ffmpeg
    tally: Tally
    serial: Iterator[int] = field(default_factory=count)

    @property
    def state(self) -> Path:
        return self.root / "state"

    def control(self, command: str, **args: Any) -> dict[str, Any]:
        return request(self.state / "traxd.sock", command, **args)

    def tried(self, what: str) -> None:
        self.tally.bad_inputs.append(what)
        self.tally.files_dropped += 1

    def wait_failed(self, box: Box, name: str) -> dict[str, Any]:
        """The sidecar is written first, then the original moves: wait for both."""
        def settled() -> bool:
            still = set(files_under(box.inbox)) | set(files_under(box.processing))
            return box.has_error(name) and name not in still

        wait_until(settled, OUTCOME_TIMEOUT, message=f"{name!r} failed")
        return box.error_of(name)

    def wait_done(self, box: Box, name: str) -> None:
        wait_until(lambda: name in files_under(box.done), OUTCOME_TIMEOUT,
                   message=f"{name!r} done")

    def assert_healthy(self) -> None:
        """The daemon still runs, and a good file dropped now is processed."""
        if not self.daemon.alive():
            self.tally.daemon_crashes += 1
            raise AssertionError("the daemon died:\n" + self.daemon.log_text()[-3000:])
        name = f"good-{next(self.serial)}.mp3"
        (self.cmd.inbox / name).write_bytes(name.encode())
        self.tally.files_dropped += 1
        self.wait_done(self.cmd, name)
        assert (self.cmd.outputs / name.replace(".mp3", ".txt")).read_bytes() == name.encode()


@pytest.fixture(scope="module")
def rig(tally: Tally) -> Iterator[Rig]:
    root = Path(tempfile.mkdtemp(prefix="traxd-bad-", dir="/tmp"))
    cmd, media = Box(root / "cmd").make(), Box(root / "media").make()
    ledger = root / "ledger"
    config = write_config(root / "traxd.toml", base_daemon(
        root, settle_seconds=0.1, batch_interval="0.1s", reconcile_interval="1s",
        max_retries=2), [
        {"name": "cmd", "path": str(cmd.inbox), "pipeline": [{"command": copy_step(ledger)}]},
        {"name": "media", "path": str(media.inbox), "pipeline": ["preprocess"]},
    ])
    outside = root / "outside"
    outside.mkdir()
    sources = make_media(root / "sources")
    daemon = FaultDaemon(config, root / "daemon.log")
    daemon.start()
    try:
        yield Rig(root, config, daemon, cmd, media, ledger, outside, sources, tally)
    finally:
        exit_code = daemon.terminate() if daemon.alive() else None
        if exit_code != 0:
            tally.daemon_crashes += 1
        shutil.rmtree(root, ignore_errors=True)


def drop(box: Box, name: str, data: bytes) -> Path:
    path = box.inbox / name
    path.write_bytes(data)
    return path


# --- undecodable and odd media (the preprocess step) ---------------------------------------


@pytest.mark.parametrize(("name", "data", "reason", "words"), [
    ("empty.mp3", b"", "empty", "empty.mp3 is an empty file (0 bytes)"),
    ("noise.mp3", hashlib.sha512(b"seed").digest() * 300, "undecodable",
     "cannot decode noise.mp3: not audio or video that ffmpeg can read"),
    ("letter.mp4", b"Dear reader,\nthis is text, not a video.\n" * 20, "undecodable",
     "cannot decode letter.mp4: not audio or video that ffmpeg can read"),
])
def test_undecodable_input_fails_permanently_with_a_readable_reason(
        rig: Rig, name: str, data: bytes, reason: str, words: str) -> None:
    # Given a file that is no media at all, named like media
    rig.tried(name)
    # When it is dropped into an inbox whose pipeline is ffmpeg preprocessing
    drop(rig.media, name, data)
    # Then it fails at once (no retries), with a sentence a person can act on
    error = rig.wait_failed(rig.media, name)
    assert error["category"] == "permanent"
    assert error["reason"] == reason
    assert error["step"] == "preprocess"
    assert error["attempts"] == 1
    assert words in error["message"]
    assert (rig.media.failed / name).read_bytes() == data
    rig.assert_healthy()


def test_truncated_mp3_keeps_the_audio_that_is_there(rig: Rig) -> None:
    # Given an mp3 of real speech cut in the middle of a frame
    rig.tried("truncated mp3")
    data = rig.sources["mp3"].read_bytes()
    drop(rig.media, "cut.mp3", data[: len(data) // 2 + 7])
    # When it is preprocessed
    # Then the frames that survive are decoded: done, no error sidecar
    rig.wait_done(rig.media, "cut.mp3")
    assert not rig.media.has_error("cut.mp3")
    rig.assert_healthy()


def test_truncated_wav_keeps_the_audio_that_is_there(rig: Rig) -> None:
    # Given a wav whose header promises more samples than the file holds
    rig.tried("truncated wav")
    drop(rig.media, "cut.wav", rig.sources["wav"].read_bytes()[:20_000])
    # Then it is decoded as far as it goes
    rig.wait_done(rig.media, "cut.wav")
    assert not rig.media.has_error("cut.wav")
    rig.assert_healthy()


def test_truncated_m4a_without_its_index_fails_as_undecodable(rig: Rig) -> None:
    # Given an m4a cut before its index (moov atom) was written
    rig.tried("truncated m4a")
    drop(rig.media, "cut.m4a", rig.sources["m4a"].read_bytes()[:3000])
    # Then it is a permanent failure that says it cannot be decoded
    error = rig.wait_failed(rig.media, "cut.m4a")
    assert (error["category"], error["reason"]) == ("permanent", "undecodable")
    assert "cannot decode cut.m4a" in error["message"]
    rig.assert_healthy()


def test_silence_is_valid_audio_for_preprocessing(rig: Rig) -> None:
    # Given two seconds of silence: audio with no speech in it
    rig.tried("silence")
    drop(rig.media, "quiet.wav", rig.sources["silence"].read_bytes())
    # Then preprocessing (which does not judge speech) takes it: done, no error
    rig.wait_done(rig.media, "quiet.wav")
    assert not rig.media.has_error("quiet.wav")
    rig.assert_healthy()


# --- files that change or vanish while queued ---------------------------------------------


def paused_and_queued(rig: Rig, name: str, data: bytes) -> Path:
    """Pause the command inbox, drop a file, wait until the journal has it queued."""
    rig.control("pause", inbox="cmd")
    path = drop(rig.cmd, name, data)
    wait_until(lambda: (job := job_of(rig.state, name)) is not None
               and job["state"] == "queued", OUTCOME_TIMEOUT, message=f"{name} queued")
    return path


def test_a_file_deleted_while_queued_is_reported_not_retried(rig: Rig) -> None:
    # Given a file queued in a paused inbox
    rig.tried("deleted while queued")
    try:
        path = paused_and_queued(rig, "gone.mp3", b"soon gone")
        # When it is deleted before a worker claims it, and the inbox resumes
        path.unlink()
    finally:
        rig.control("resume", inbox="cmd")
    # Then its job fails with the reason, once, and nothing is left behind
    error = rig.wait_failed(rig.cmd, "gone.mp3")
    assert (error["category"], error["step"]) == ("permanent", "claim")
    assert "vanished" in error["message"]
    assert "gone.mp3" not in files_under(rig.cmd.failed)
    rig.assert_healthy()


def test_a_file_replaced_while_queued_is_processed_as_its_new_content(rig: Rig) -> None:
    # Given a file queued in a paused inbox
    rig.tried("replaced while queued")
    try:
        path = paused_and_queued(rig, "swap.mp3", b"first version")
        # When it is replaced by another file of the same name before it is claimed
        replacement = rig.cmd.inbox / ".swap.mp3.part"
        replacement.write_bytes(b"second, longer version")
        replacement.rename(path)
    finally:
        rig.control("resume", inbox="cmd")
    # Then the new content is processed, once, after settling again
    rig.wait_done(rig.cmd, "swap.mp3")
    assert (rig.cmd.done / "swap.mp3").read_bytes() == b"second, longer version"
    assert (rig.cmd.outputs / "swap.txt").read_bytes() == b"second, longer version"
    assert [n for n in files_under(rig.cmd.outputs) if n.startswith("swap")] == ["swap.txt"]
    assert rig.ledger.read_text().split().count("swap.mp3") == 1
    assert not rig.cmd.has_error("swap.mp3")
    rig.assert_healthy()


def test_a_file_without_read_permission(rig: Rig) -> None:
    # Given a file nobody may read (mode 000)
    rig.tried("no read permission")
    path = rig.cmd.inbox / ".locked.mp3"
    path.write_bytes(b"private")
    path.chmod(0)
    path.rename(rig.cmd.inbox / "locked.mp3")
    if os.geteuid() == 0:
        # Then, for root (who may read anything, as these tests run here), it is processed
        rig.wait_done(rig.cmd, "locked.mp3")
        assert (rig.cmd.outputs / "locked.txt").read_bytes() == b"private"
    else:
        # Then, for anyone else, it fails with the reason and is not retried
        error = rig.wait_failed(rig.cmd, "locked.mp3")
        assert error["category"] == "permanent"
        assert "no read permission" in error["message"]
    rig.assert_healthy()


# --- things that are not regular files ------------------------------------------------------


def test_a_fifo_is_refused_without_being_opened(rig: Rig) -> None:
    # Given a named pipe in the inbox (opening it to read would block forever)
    rig.tried("fifo")
    os.mkfifo(rig.cmd.inbox / "pipe.mp3")
    # Then it is moved to failed/ as it is, with the reason
    error = rig.wait_failed(rig.cmd, "pipe.mp3")
    assert error["category"] == "permanent"
    assert "not a regular file" in error["message"]
    assert stat.S_ISFIFO((rig.cmd.failed / "pipe.mp3").lstat().st_mode)
    rig.assert_healthy()


def test_a_directory_is_walked_and_an_empty_one_left_alone(rig: Rig) -> None:
    # Given a folder holding a file, and an empty folder
    rig.tried("directory")
    (rig.cmd.inbox / "album" / "disc 1").mkdir(parents=True)
    (rig.cmd.inbox / "album" / "disc 1" / "track.mp3").write_bytes(b"track one")
    (rig.cmd.inbox / "empty folder").mkdir()
    # Then the file inside is processed with its relative path kept, the folder it came
    # from is tidied away, and the empty folder is neither failed nor removed
    rig.wait_done(rig.cmd, "album/disc 1/track.mp3")
    assert (rig.cmd.outputs / "album" / "disc 1" / "track.txt").read_bytes() == b"track one"
    wait_until(lambda: not (rig.cmd.inbox / "album").exists(), 10, message="album tidied")
    assert (rig.cmd.inbox / "empty folder").is_dir()
    assert not any("folder" in f for f in files_under(rig.cmd.failed))
    rig.assert_healthy()


def test_symbolic_links_are_never_followed(rig: Rig) -> None:
    # Given links in the inbox: to a file inside, to a file outside, to a folder outside
    rig.tried("symbolic links")
    secret = rig.outside / "secret.mp3"
    secret.write_bytes(b"outside the inbox")
    (rig.outside / "dir").mkdir()
    (rig.outside / "dir" / "deep.mp3").write_bytes(b"deep outside")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in rig.outside.rglob("*.mp3")}
    staging = rig.cmd.inbox / ".staging"
    staging.mkdir()
    (staging / "real.mp3").write_bytes(b"the real one")
    (staging / "inner-link.mp3").symlink_to("real.mp3")
    (staging / "outer-link.mp3").symlink_to(secret)
    (staging / "outer-dir").symlink_to(rig.outside / "dir")
    for entry in sorted(staging.iterdir()):
        entry.rename(rig.cmd.inbox / entry.name)
    staging.rmdir()
    # Then the real file is processed once, and every link fails with the reason, moved
    # to failed/ still a link, its target untouched
    rig.wait_done(rig.cmd, "real.mp3")
    for link in ("inner-link.mp3", "outer-link.mp3", "outer-dir"):
        error = rig.wait_failed(rig.cmd, link)
        assert error["category"] == "permanent"
        assert "symbolic link" in error["message"], error
        assert (rig.cmd.failed / link).is_symlink()
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in rig.outside.rglob("*.mp3")}
    assert after == before
    assert not any(n.startswith(("secret", "deep", "outer", "inner"))
                   for n in files_under(rig.cmd.outputs))
    assert rig.ledger.read_text().split().count("real.mp3") == 1
    rig.assert_healthy()


def _outside_twin(rig: Rig, name: str, queued: Path) -> Path:
    """A file outside the inbox with the queued file's size and time (no tell at claim)."""
    twin = rig.outside / name
    twin.parent.mkdir(parents=True, exist_ok=True)
    twin.write_bytes(b"S" * queued.stat().st_size)
    info = queued.stat()
    os.utime(twin, ns=(info.st_mtime_ns, info.st_mtime_ns))
    return twin


def test_a_queued_folder_swapped_for_a_link_takes_nothing_outside(rig: Rig) -> None:
    # Given a file queued in a sub-folder of a paused inbox, and its twin outside
    rig.tried("folder swapped for a link after queueing")
    (rig.cmd.inbox / "swapdir").mkdir()
    try:
        queued = paused_and_queued(rig, "swapdir/talk.mp3", b"mine")
        twin = _outside_twin(rig, "swapdir/talk.mp3", queued)
        # When the sub-folder is swapped for a link to the outside before the claim
        (rig.cmd.inbox / "swapdir").rename(rig.root / "moved-away")
        (rig.cmd.inbox / "swapdir").symlink_to(rig.outside / "swapdir")
    finally:
        rig.control("resume", inbox="cmd")
    # Then the claim takes nothing through the link: the twin stays, nothing is published
    error = rig.wait_failed(rig.cmd, "swapdir/talk.mp3")
    assert "symbolic link" in error["message"]
    assert twin.read_bytes() == b"SSSS"
    assert not any(n.startswith("swapdir") for n in files_under(rig.cmd.outputs))
    rig.assert_healthy()


def test_a_queued_file_swapped_for_a_link_takes_nothing_outside(rig: Rig) -> None:
    # Given a queued file in a paused inbox, and its twin outside
    rig.tried("file swapped for a link after queueing")
    try:
        queued = paused_and_queued(rig, "swapfile.mp3", b"mine")
        twin = _outside_twin(rig, "swapfile.mp3", queued)
        # When the file is swapped for a link to the twin before the claim
        queued.unlink()
        queued.symlink_to(twin)
    finally:
        rig.control("resume", inbox="cmd")
    # Then the link itself fails, still a link, and the twin is untouched and unread
    error = rig.wait_failed(rig.cmd, "swapfile.mp3")
    assert "symbolic link" in error["message"]
    assert (rig.cmd.failed / "swapfile.mp3").is_symlink() and twin.read_bytes() == b"SSSS"
    assert "swapfile.txt" not in files_under(rig.cmd.outputs)
    rig.assert_healthy()


# --- names ----------------------------------------------------------------------------------

ODD_NAMES = [
    "new\nline.mp3",
    "it's \"quoted\" `back` $(x).mp3",
    "-rf",
    "--help.mp3",
    "ünïcødé 日本語 🎧.mp3",
    "a" * 251 + ".mp3",  # 255 bytes, the longest name a Linux filesystem allows
    "ü" * 125 + "x.mp3",  # 255 bytes again, most of them in two-byte characters
]


@pytest.mark.parametrize("name", ODD_NAMES, ids=["newline", "quotes", "dash-rf", "dash-help",
                                                 "unicode", "255-bytes", "255-bytes-utf8"])
def test_odd_names_are_processed_as_names(rig: Rig, name: str) -> None:
    # Given a file whose name is legal but awkward
    assert len(os.fsencode(name)) <= 255
    rig.tried(f"name {name[:12]!r}…" if len(name) > 12 else f"name {name!r}")
    content = b"named " + os.fsencode(name)
    drop(rig.cmd, name, content)
    # Then it is processed like any other: one output, the original in done/
    rig.wait_done(rig.cmd, name)
    stem = name.rsplit(".", 1)[0] if name.endswith(".mp3") else name
    assert (rig.cmd.outputs / f"{stem}.txt").read_bytes() == content
    assert not rig.cmd.has_error(name)
    rig.assert_healthy()


def test_a_failing_file_with_a_255_byte_name_still_gets_its_error_report(rig: Rig) -> None:
    # Given a file with the longest possible name whose step fails
    name = "b" * 251 + ".mp3"
    rig.tried("255-byte name, failing")
    drop(rig.cmd, name, b"FAIL on purpose")
    # Then it lands in failed/ with a readable report beside it (under a shortened name
    # when "<name>.error.json" would be too long), and the daemon carries on
    wait_until(lambda: name in files_under(rig.cmd.failed), OUTCOME_TIMEOUT,
               message="long name failed")
    reports = [f for f in files_under(rig.cmd.failed)
               if f.startswith("bbbbbbbb") and f.endswith(".error.json")]
    assert len(reports) == 1, files_under(rig.cmd.failed)
    assert len(os.fsencode(reports[0])) == 255
    report = json.loads((rig.cmd.failed / reports[0]).read_text())
    assert report["file"] == name
    assert report["category"] == "permanent" and "refusing to copy" in report["message"]
    rig.assert_healthy()


# --- the journal and the configuration --------------------------------------------------------


def run_traxd(config: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "traxd", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def one_inbox_config(root: Path) -> Path:
    return write_config(root / "traxd.toml", base_daemon(root), [{
        "name": "main", "path": str(root / "box" / "inbox"),
        "pipeline": [{"command": copy_step(root / "ledger")}]}])


def damaged_pages(path: Path) -> None:
    """A real journal with rows, then garbage written over its pages after the header."""
    journal = Journal.open(path)
    for n in range(200):
        journal.add_seen("main", f"file-{n}.mp3", n, n, 5)
    journal.close()
    data = bytearray(path.read_bytes())
    data[4096:] = hashlib.sha512(b"damage").digest() * ((len(data) - 4096) // 64)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["not-a-database", "damaged-pages"])
def test_a_corrupt_journal_stops_start_up_and_is_left_as_it_was(
        tmp_path: Path, tally: Tally, damage: str) -> None:
    # Given a journal that is not a database, or whose pages are garbage
    tally.bad_inputs.append(f"journal: {damage}")
    config = one_inbox_config(tmp_path)
    journal = tmp_path / "state" / "journal.sqlite3"
    journal.parent.mkdir(parents=True)
    if damage == "not-a-database":
        journal.write_bytes(b"this is not SQLite\n" * 500)
    else:
        damaged_pages(journal)
    before = journal.read_bytes()
    # When the daemon starts
    result = run_traxd(config)
    # Then it refuses with a message naming the file and what to do, and touches nothing
    assert result.returncode == 1, result.stderr
    assert str(journal) in result.stderr
    assert "move it aside" in result.stderr or "move the file aside" in result.stderr
    assert "Traceback" not in result.stderr
    assert journal.read_bytes() == before


def test_a_journal_locked_by_another_process_stops_start_up(tmp_path: Path,
                                                             tally: Tally) -> None:
    # Given another process holding the state directory's lock
    tally.bad_inputs.append("journal: locked")
    config = one_inbox_config(tmp_path)
    lock = tmp_path / "state" / "traxd.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, sys, time\n"
                               "f = open(sys.argv[1], 'a')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True)\n"
                               "time.sleep(60)\n", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with lock.open("a") as probe, pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # When the daemon starts
        result = run_traxd(config)
    finally:
        holder.kill()
        holder.wait(10)
    # Then it says another traxd uses the state directory, and exits non-zero
    assert result.returncode == 1
    assert f"another traxd uses {lock.parent}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_config_that_fails_to_load_on_sighup_keeps_the_old_one(rig: Rig) -> None:
    # Given the running daemon's config file replaced by one that does not load
    rig.tried("config broken on SIGHUP")
    good = rig.config.read_text()
    rig.config.write_text(good.replace("workers = 2", "workers = -3"))
    try:
        # When it is told to reload
        rig.daemon.signal(signal.SIGHUP)
        wait_until(lambda: any(e["event"] == "reload_failed" for e in log_events(rig.daemon.log)),
                   OUTCOME_TIMEOUT, message="reload_failed logged")
    finally:
        rig.config.write_text(good)
    # Then it says why, keeps the running configuration, and goes on working
    failed = [e for e in log_events(rig.daemon.log) if e["event"] == "reload_failed"]
    assert "daemon.workers" in failed[-1]["error"]
    assert not any(e["event"] == "reloaded" for e in log_events(rig.daemon.log))
    rig.assert_healthy()
    # (the journal records a finish just after the move: wait for its commit)
    wait_until(lambda: all(r["state"] in ("done", "failed") for r in read_jobs(rig.state)
                           if r["inbox"] == "cmd"), OUTCOME_TIMEOUT, message="rows finished")


def test_a_second_file_with_a_255_byte_name_gets_a_numbered_name_that_fits(rig: Rig) -> None:
    # Given a file with the longest possible name already in done/
    name = "c" * 251 + ".mp3"
    rig.tried("255-byte name, twice")
    drop(rig.cmd, name, b"first of two")
    rig.wait_done(rig.cmd, name)
    # When another file of that name (different content) arrives
    drop(rig.cmd, name, b"second of two")
    # Then both are kept: the second under a numbered name shortened to fit
    wait_until(lambda: len([f for f in files_under(rig.cmd.done) if f.startswith("ccc")]) == 2,
               OUTCOME_TIMEOUT, message="both long names done")
    done = sorted(f for f in files_under(rig.cmd.done) if f.startswith("ccc"))
    outputs = sorted(f for f in files_under(rig.cmd.outputs) if f.startswith("ccc"))
    assert all(len(os.fsencode(f)) <= 255 for f in done + outputs)
    assert sorted((rig.cmd.done / f).read_bytes() for f in done) == [b"first of two",
                                                                     b"second of two"]
    assert next(f for f in done if f != name).endswith(" (1).mp3")
    assert len(outputs) == 2
    rig.assert_healthy()


# --- a disk that fills up ---------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    """`folder` as a tmpfs of `size` (needs the right to mount: root here), for as long as
    the block lasts."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs ({mounted.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def tiny_outputs(short_root: Path) -> Iterator[Path]:
    """outputs/ on a 64 KiB disk."""
    with small_disk(short_root / "box" / "outputs", "64k") as outputs:
        yield outputs


def copying_inbox_that_retries(root: Path) -> tuple[Box, Path, Path]:
    """An inbox with a copy step whose publish is retried often and quickly: its box, the
    step's ledger and the config."""
    box, ledger = Box(root / "box").make(), root / "ledger"
    config = write_config(root / "traxd.toml", base_daemon(
        root, settle_seconds=0.1, batch_interval="0.1s", max_retries=50,
        retry_backoff="0.2s", retry_backoff_max="0.5s"), [{
            "name": "main", "path": str(box.inbox), "pipeline": [{"command": copy_step(ledger)}]}])
    return box, ledger, config


def test_a_disk_that_fills_while_outputs_are_written(short_root: Path, tiny_outputs: Path,
                                                     tally: Tally) -> None:
    # Given an inbox whose outputs/ folder has 64 KiB of room
    tally.bad_inputs.append("disk full while writing outputs")
    box, ledger, config = copying_inbox_that_retries(short_root)
    big = hashlib.sha512(b"big").digest() * 3000  # 192 KB: cannot fit
    daemon = FaultDaemon(config, short_root / "log").start()
    tally.files_dropped += 1
    try:
        # When a file whose output cannot fit is processed
        drop(box, "big.mp3", big)
        wait_until(lambda: sum(e["event"] == "job_retry" for e in daemon.events()) >= 2, 30,
                   message="two retries")
        # Then no partial output is left, the file waits in processing/, not failed
        retries = [e for e in daemon.events() if e["event"] == "job_retry"]
        assert retries[0]["step"] == "publish"
        assert "No space left on device" in retries[0]["error"]
        assert os.listdir(tiny_outputs) == []
        assert files_under(box.processing) == ["big.mp3"]
        assert files_under(box.failed) == []
        # And once there is room again, the retry completes it: one whole output
        subprocess.run(["mount", "-o", "remount,size=1m", str(tiny_outputs)], check=True)
        wait_until(lambda: files_under(box.done) == ["big.mp3"], 30, message="big.mp3 done")
        assert daemon.alive()
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
    assert files_under(box.outputs) == ["big.txt"]
    assert (box.outputs / "big.txt").read_bytes() == big
    assert ledger.read_text().split() == ["big.mp3"]  # the step ran once; publish retried


@pytest.fixture
def tiny_state(short_root: Path) -> Iterator[Path]:
    """The state folder (journal) on a 16 MiB disk."""
    with small_disk(short_root / "state", "16m") as state:
        yield state


def fill(folder: Path) -> Path:
    """A file that takes every free byte of `folder`'s file system."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
    return filler


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_full_disk_under_the_journal_pauses_intake_and_resumes(short_root: Path,
                                                                 tiny_state: Path,
                                                                 tally: Tally) -> None:
    tally.bad_inputs.append("disk full under the journal")
    # Given a daemon whose journal lives on a small disk, with one file done
    box = Box(short_root / "box").make()
    ledger = short_root / "ledger"
    config = write_config(short_root / "traxd.toml", base_daemon(
        short_root, settle_seconds=0.1, batch_interval="0.1s", metrics_address="127.0.0.1:0"),
        [{"name": "main", "path": str(box.inbox), "pipeline": [{"command": copy_step(ledger)}]}])
    daemon = FaultDaemon(config, short_root / "log").start()
    url = next(e["url"] for e in daemon.events() if e["event"] == "http_listening")
    try:
        drop(box, "first.mp3", b"first")
        wait_until(lambda: files_under(box.done) == ["first.mp3"], 30, message="first done")
        # When the disk fills up and many files arrive
        filler = fill(tiny_state)
        names = [f"f{n:03}.mp3" for n in range(300)]
        for name in names:
            (box.inbox / name).write_bytes(name.encode())
        tally.files_dropped += 301
        # Then the daemon stays up, says why it is not ready, and counts it in a metric
        wait_until(lambda: any(e["event"] == "journal_write_held" for e in daemon.events()), 60,
                   message="writes held")
        status, body = http_get(url + "/readyz")
        assert status == 503 and "full" in body
        assert 'traxd_throttled{reason="disk_full"} 1.0' in http_get(url + "/metrics")[1]
        assert daemon.alive()
        # And when space returns, everything is processed once, with nothing lost
        filler.unlink()
        wait_until(lambda: len(files_under(box.done)) == 301, 120, message="all done")
        assert http_get(url + "/readyz")[0] == 200
        assert sorted(ledger.read_text().split()) == sorted(["first.mp3", *names])
        assert daemon.terminate() == 0
    finally:
        daemon.stop()


def test_a_full_disk_at_start_is_not_called_a_damaged_journal(short_root: Path,
                                                               tiny_state: Path,
                                                               tally: Tally) -> None:
    tally.bad_inputs.append("disk full before start")
    # Given a full disk where the journal is to be made
    box = Box(short_root / "box").make()
    config = write_config(short_root / "traxd.toml", base_daemon(short_root),
                          [{"name": "main", "path": str(box.inbox)}])
    fill(tiny_state)
    # When traxd starts
    result = subprocess.run([sys.executable, "-m", "traxd", "run", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)
    # Then it says the disk is full, not that the journal should be moved aside
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "is full" in result.stderr and "move" not in result.stderr, result.stderr


def test_a_read_only_inbox_fails_each_file_once_and_leaves_it(short_root: Path,
                                                               tally: Tally) -> None:
    tally.bad_inputs.append("read-only inbox mount")
    # Given an inbox on a mount of its own, read-only, holding one file
    box = Box(short_root / "box")
    with small_disk(box.inbox, "1m"):
        ledger = short_root / "ledger"
        config = write_config(short_root / "traxd.toml", base_daemon(
            short_root, settle_seconds=0.1, reconcile_interval="0.5s", log_level="debug"), [
                {"name": "main", "path": str(box.inbox),
                 "pipeline": [{"command": copy_step(ledger)}]}])
        (box.inbox / "talk.mp3").write_bytes(b"talk")
        subprocess.run(["mount", "-o", "remount,ro", str(box.inbox)], check=True)
        tally.files_dropped += 1
        daemon = FaultDaemon(config, short_root / "log").start()
        try:
            _fails_once_and_is_left(daemon, box, short_root / "state", ledger)
            # And once the folder can be written, the file is processed
            subprocess.run(["mount", "-o", "remount,rw", str(box.inbox)], check=True)
            wait_until(lambda: files_under(box.done) == ["talk.mp3"], 30, message="done")
            assert ledger.read_text().split() == ["talk.mp3"]
            assert daemon.terminate() == 0
        finally:
            daemon.stop()


def _fails_once_and_is_left(daemon: FaultDaemon, box: Box, state: Path, ledger: Path) -> None:
    """When the daemon finds talk.mp3, it fails once, with the reason, and the file stays;
    later rescans leave it alone: no second job, no copy anywhere."""
    wait_until(lambda: box.has_error("talk.mp3"), OUTCOME_TIMEOUT, message="error report")
    error = box.error_of("talk.mp3")
    assert error["reason"] == "read_only" and "cannot be written" in error["message"]
    assert files_under(box.inbox) == ["talk.mp3"]
    assert files_under(box.processing) == [] and box.failed_originals() == []
    probed = sum(e["event"] == "intake_probed" for e in daemon.events())
    wait_until(lambda: sum(e["event"] == "intake_probed" for e in daemon.events())
               >= probed + 3, 30, message="three more rescans")
    assert [r["state"] for r in read_jobs(state)] == ["failed"]
    assert box.failed_originals() == [] and not ledger.exists()


def test_a_journal_deleted_under_the_running_daemon_is_written_again(short_root: Path,
                                                                     tally: Tally) -> None:
    tally.bad_inputs.append("journal deleted while running")
    # Given a running daemon that has done one file
    box = Box(short_root / "box").make()
    ledger, state = short_root / "ledger", short_root / "state"
    config = write_config(short_root / "traxd.toml", base_daemon(short_root, settle_seconds=0.1),
                          [{"name": "main", "path": str(box.inbox),
                            "pipeline": [{"command": copy_step(ledger)}]}])
    daemon = FaultDaemon(config, short_root / "log").start()
    tally.files_dropped += 2
    try:
        drop(box, "before.mp3", b"before")
        wait_until(lambda: files_under(box.done) == ["before.mp3"], 30, message="before done")
        # When its journal files are deleted (as `rm journal.sqlite3*` would)
        for path in state.glob("journal.sqlite3*"):
            path.unlink()
        # Then it says so and writes the journal again, and goes on working
        wait_until(lambda: any(e["event"] == "journal_file_restored" for e in daemon.events()),
                   30, message="journal restored")
        drop(box, "after.mp3", b"after")
        wait_until(lambda: files_under(box.done) == ["after.mp3", "before.mp3"], 30,
                   message="after done")
    finally:
        daemon.stop()  # SIGKILL
    # And the journal on disk knows both files (the last finish may still be on its way to
    # disk at the SIGKILL: the restart completes it), so a restart redoes neither
    assert {r["rel_path"] for r in read_jobs(state)} == {"before.mp3", "after.mp3"}
    restarted = FaultDaemon(config, short_root / "log2").start()
    try:
        drop(box, "again.mp3", b"again")
        wait_until(lambda: "again.mp3" in files_under(box.done), 30, message="again done")
        assert restarted.terminate() == 0
    finally:
        restarted.stop()
    assert sorted(ledger.read_text().split()) == ["after.mp3", "again.mp3", "before.mp3"]
    assert {r["rel_path"]: r["state"] for r in read_jobs(state)} == {
        "before.mp3": "done", "after.mp3": "done", "again.mp3": "done"}


def test_an_outputs_folder_on_a_read_only_mount_makes_jobs_wait_not_fail(
        short_root: Path, tiny_outputs: Path, tally: Tally) -> None:
    # Given an inbox whose outputs/ folder is a read-only mount
    tally.bad_inputs.append("read-only outputs mount")
    box, ledger, config = copying_inbox_that_retries(short_root)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_outputs)], check=True)
    daemon = FaultDaemon(config, short_root / "log").start()
    tally.files_dropped += 1
    try:
        # When a file is processed
        drop(box, "talk.mp3", b"talk")
        # Then publishing is retried, the file waits in processing/ and is not failed
        wait_until(lambda: sum(e["event"] == "job_retry" for e in daemon.events()) >= 2, 30,
                   message="two retries")
        assert "Read-only file system" in next(
            e["error"] for e in daemon.events() if e["event"] == "job_retry")
        assert files_under(box.processing) == ["talk.mp3"] and files_under(box.failed) == []
        # And once the folder can be written, it is done, its step run once
        subprocess.run(["mount", "-o", "remount,rw", str(tiny_outputs)], check=True)
        wait_until(lambda: files_under(box.done) == ["talk.mp3"], 30, message="done")
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
    assert files_under(box.outputs) == ["talk.txt"]
    assert ledger.read_text().split() == ["talk.mp3"]
