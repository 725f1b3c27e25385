"""The real daemon process: drop files, kill it mid-batch, restart, every file exactly once."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.helpers import (
    DaemonProcess,
    base_daemon,
    copy_step,
    files_under,
    running_daemon,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration


def setup_inbox(tmp_path: Path, delay: float = 0.0, **daemon: object) -> tuple[Path, Path, Path]:
    root = tmp_path / "box"
    (root / "inbox").mkdir(parents=True)
    ledger = tmp_path / "ledger"
    config = write_config(tmp_path / "traxd.toml", base_daemon(tmp_path, **daemon), [{
        "name": "main", "path": str(root / "inbox"),
        "pipeline": [{"command": copy_step(ledger, delay)}],
    }])
    return root, config, ledger


def settled_everything(root: Path, expected: int) -> bool:
    failed = [f for f in files_under(root / "failed") if not f.endswith(".error.json")]
    return (len(files_under(root / "done")) + len(failed) == expected
            and not files_under(root / "inbox") and not files_under(root / "processing"))


def test_dropped_files_end_in_done_with_outputs(tmp_path: Path) -> None:
    root, config, ledger = setup_inbox(tmp_path)
    with running_daemon(config, tmp_path / "log") as daemon:
        # When files are dropped, one nested and one hidden, one being downloaded
        (root / "inbox" / "a.mp3").write_bytes(b"alpha")
        (root / "inbox" / "deep" / "er").mkdir(parents=True)
        (root / "inbox" / "deep" / "er" / "b.wav").write_bytes(b"beta")
        (root / "inbox" / ".hidden.mp3").write_bytes(b"no")
        (root / "inbox" / "c.mp3.part").write_bytes(b"no")
        wait_until(lambda: len(files_under(root / "done")) == 2, 30, message="two files done")
        # Then each is done once, outputs keep the sub-folder, ignored files stay put
        assert files_under(root / "done") == ["a.mp3", "deep/er/b.wav"]
        assert files_under(root / "outputs") == ["a.txt", "deep/er/b.txt"]
        assert (root / "outputs" / "deep/er/b.txt").read_bytes() == b"beta"
        assert files_under(root / "inbox") == [".hidden.mp3", "c.mp3.part"]
        # And renaming the download when it completes makes it a job
        (root / "inbox" / "c.mp3.part").rename(root / "inbox" / "c.mp3")
        wait_until(lambda: "c.mp3" in files_under(root / "done"), 30, message="c.mp3 done")
        assert daemon.terminate() == 0
    assert sorted(ledger.read_text().split()) == ["a.mp3", "b.wav", "c.mp3"]
    events = [json.loads(line)["event"] for line in (tmp_path / "log").read_text().splitlines()
              if line.startswith("{")]
    assert "batch_finished" in events
    assert events[-1] == "stopped"


def test_a_file_written_slowly_in_place_is_not_taken_early(tmp_path: Path) -> None:
    root, config, _ = setup_inbox(tmp_path, settle_seconds=1.0)
    target = root / "inbox" / "slow.mp3"
    with running_daemon(config, tmp_path / "log"):
        with target.open("wb") as handle:
            for _ in range(8):  # 8 chunks, 0.4 s apart: always less than settle_seconds quiet
                handle.write(b"x" * 1000)
                handle.flush()
                os.fsync(handle.fileno())
                assert files_under(root / "processing") == []
                assert files_under(root / "done") == []
                time.sleep(0.4)  # the writer's pace, not synchronisation
        wait_until(lambda: files_under(root / "done") == ["slow.mp3"], 30, message="slow done")
    assert (root / "outputs" / "slow.txt").stat().st_size == 8000


def test_files_present_at_start_are_found(tmp_path: Path) -> None:
    root, config, _ = setup_inbox(tmp_path)
    for n in range(5):
        (root / "inbox" / f"old{n}.mp3").write_bytes(b"x%d" % n)
    with running_daemon(config, tmp_path / "log"):
        wait_until(lambda: settled_everything(root, 5), 30, message="five files done")


def test_a_name_that_is_not_utf8_is_processed_like_any_other(tmp_path: Path) -> None:
    # Given a file whose name is Latin-1 bytes (not valid UTF-8), and one that fails
    root, config, _ = setup_inbox(tmp_path)
    inbox = os.fsencode(root / "inbox")
    with running_daemon(config, tmp_path / "log") as daemon:
        # When they are dropped
        with open(inbox + b"/caf\xe9.mp3", "wb") as good:
            good.write(b"latin")
        with open(inbox + b"/\xff\xfe.mp3", "wb") as bad:
            bad.write(b"FAIL latin")
        # Then each ends where it should, with its output or its sidecar, the daemon alive
        wait_until(lambda: settled_everything(root, 2), 30, message="both finished")
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert daemon.terminate() == 0
    assert os.listdir(os.fsencode(root / "done")) == [b"caf\xe9.mp3"]
    assert os.listdir(os.fsencode(root / "outputs")) == [b"caf\xe9.txt"]
    assert sorted(os.listdir(os.fsencode(root / "failed"))) == [
        b"\xff\xfe.mp3", b"\xff\xfe.mp3.error.json"]
    sidecar = json.loads((root / "failed" / os.fsdecode(b"\xff\xfe.mp3.error.json")).read_text(
        errors="strict"))
    assert sidecar["file"] == os.fsdecode(b"\xff\xfe.mp3")
    # And a restart reads the journal back
    with running_daemon(config, tmp_path / "log2"):
        pass


def test_files_in_sub_folders_claimed_while_others_finish_never_lose_their_folder(
        tmp_path: Path) -> None:
    # Given many files in a few sub-folders, and workers enough to claim some while others
    # in the same folders finish (and their emptied folders are removed)
    root, config, _ = setup_inbox(tmp_path, workers=8)
    stage = tmp_path / "stage"
    names = [f"d{n % 4}/f{n:03d}.mp3" for n in range(240)]
    for name in names:
        (stage / name).parent.mkdir(parents=True, exist_ok=True)
        (stage / name).write_bytes(name.encode())
    with running_daemon(config, tmp_path / "log"):
        # When they are dropped a folder at a time
        for folder in sorted(stage.iterdir()):
            folder.rename(root / "inbox" / folder.name)
        wait_until(lambda: settled_everything(root, len(names)), 120, message="all settled")
    # Then every one is done; none failed on a folder that vanished under it
    assert files_under(root / "failed") == []
    assert files_under(root / "done") == sorted(names)


def test_files_in_processing_that_the_journal_does_not_know_are_adopted(tmp_path: Path) -> None:
    # Given files left in processing/ with no journal (it was moved aside on advice, or lost)
    root, config, _ = setup_inbox(tmp_path)
    (root / "processing" / "sub").mkdir(parents=True)
    (root / "processing" / "orphan.mp3").write_bytes(b"orphan")
    (root / "processing" / "sub" / "deep.mp3").write_bytes(b"deep")
    # When the daemon starts
    with running_daemon(config, tmp_path / "log") as daemon:
        # Then each goes back through the inbox and is processed, with a warning
        wait_until(lambda: settled_everything(root, 2), 30, message="both adopted and done")
        log = daemon.log_text()
    assert files_under(root / "done") == ["orphan.mp3", "sub/deep.mp3"]
    assert files_under(root / "outputs") == ["orphan.txt", "sub/deep.txt"]
    assert log.count('"stray_adopted"') == 2


def test_sigkill_mid_batch_then_restart_processes_each_file_once(tmp_path: Path) -> None:
    # Given a daemon with slow steps and a batch of files in flight
    root, config, ledger = setup_inbox(tmp_path, delay=0.3, workers=3)
    names = [f"f{n:02d}.mp3" for n in range(12)]
    for name in names:
        (root / "inbox" / name).write_bytes(name.encode())
    log = tmp_path / "log"
    for _ in range(3):
        daemon = DaemonProcess(config, log).start()
        # When it is killed with SIGKILL while jobs are running
        wait_until(lambda: files_under(root / "processing"), 30, message="a job running")
        daemon.kill()
    # Then a restart finishes everything
    with running_daemon(config, log):
        wait_until(lambda: settled_everything(root, len(names)), 60, message="all done")
    # exactly once: each original in done/ once, one output each, nothing left behind
    assert files_under(root / "done") == names
    assert files_under(root / "outputs") == [n.replace(".mp3", ".txt") for n in names]
    for name in names:
        assert (root / "outputs" / name.replace(".mp3", ".txt")).read_bytes() == name.encode()
    assert not list(root.rglob("*.traxd-tmp"))
    assert not list((tmp_path / "state" / "work").glob("*"))
    runs = ledger.read_text().split()
    assert set(runs) == set(names)


def test_sigterm_during_work_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    root, config, _ = setup_inbox(tmp_path, delay=2.0, shutdown_grace="0.2s")
    (root / "inbox" / "long.mp3").write_bytes(b"long")
    daemon = DaemonProcess(config, tmp_path / "log").start()
    wait_until(lambda: files_under(root / "processing"), 30, message="job running")
    assert daemon.terminate() == 0
    # the job went back to queued, still claimed; a restart finishes it
    assert files_under(root / "processing") == ["long.mp3"]
    with running_daemon(config, tmp_path / "log"):
        wait_until(lambda: files_under(root / "done") == ["long.mp3"], 30, message="resumed")
    assert files_under(root / "outputs") == ["long.txt"]


def test_duplicate_content_is_not_processed_again_but_gets_its_outputs(tmp_path: Path) -> None:
    # Given a file done, with its output
    root, config, ledger = setup_inbox(tmp_path)
    with running_daemon(config, tmp_path / "log") as daemon:
        (root / "inbox" / "one.mp3").write_bytes(b"same")
        wait_until(lambda: files_under(root / "done") == ["one.mp3"], 30, message="one done")
        # When the same bytes arrive under another name
        (root / "inbox" / "two.mp3").write_bytes(b"same")
        wait_until(lambda: len(files_under(root / "done")) == 2, 30, message="two moved")
        log = daemon.log_text()
    # Then the step did not run again, the copy got the original's output under its own
    # name, and the log names the original
    assert ledger.read_text().split() == ["one.mp3"]
    assert files_under(root / "outputs") == ["one.txt", "two.txt"]
    assert (root / "outputs" / "two.txt").read_bytes() == b"same"
    found = next(json.loads(line) for line in log.splitlines() if '"duplicate_found"' in line)
    assert (found["file"], found["original"], found["outputs"]) == (
        "two.mp3", "one.mp3", ["two.txt"])


def test_a_second_daemon_on_the_same_state_refuses(tmp_path: Path) -> None:
    _, config, _ = setup_inbox(tmp_path)
    with running_daemon(config, tmp_path / "log"):
        second = subprocess.run([sys.executable, "-m", "traxd", "run", "--config", str(config)],
                                capture_output=True, text=True, timeout=30, check=False)
    assert second.returncode == 1
    assert "another traxd uses" in second.stderr


def test_bad_config_stops_start_up_with_file_key_and_reason(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[daemon]\nworkers = -1\n")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "traxd", "run", "--config", str(config)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert f"{config}: daemon.workers: must be at least 1" in result.stderr
    assert time.monotonic() - started < 30


def test_a_restart_stops_step_processes_left_by_a_killed_daemon(tmp_path: Path) -> None:
    # Given a daemon killed while a long step process runs
    root, config, _ = setup_inbox(tmp_path, delay=60.0)
    (root / "inbox" / "long.mp3").write_bytes(b"long")
    daemon = DaemonProcess(config, tmp_path / "log").start()
    assert daemon.proc is not None
    parent = psutil.Process(daemon.proc.pid)
    step = wait_until(lambda: parent.children(recursive=True), 30, message="a step process")[0]
    daemon.kill()
    assert step.is_running()
    # When it starts again, the orphan is stopped and the step runs anew
    with running_daemon(config, tmp_path / "log"):
        wait_until(lambda: not step.is_running() or step.status() == psutil.STATUS_ZOMBIE, 30,
                   message="the orphan stopped")
    assert "orphans_stopped" in (tmp_path / "log").read_text()


def test_a_metrics_port_in_use_is_an_operator_message_not_a_traceback(tmp_path: Path) -> None:
    # Given a config whose metrics address another program holds
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        _, config, _ = setup_inbox(tmp_path, metrics_address=f"127.0.0.1:{port}")
        # When the daemon is started
        result = subprocess.run([sys.executable, "-m", "traxd", "run", "--config", str(config)],
                                capture_output=True, text=True, timeout=60, check=False)
    # Then it says which key, why and what to do, and leaves no socket behind
    assert result.returncode == 2
    assert "daemon.metrics_address" in result.stderr and "in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state" / "traxd.sock").exists()


def readyz(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_an_inbox_deleted_and_made_again_is_watched_again(tmp_path: Path) -> None:
    # Given a running daemon with its metrics endpoint
    root, config, _ = setup_inbox(tmp_path, metrics_address="127.0.0.1:0",
                                  reconcile_interval="10m")
    with running_daemon(config, tmp_path / "log") as daemon:
        url = json.loads(next(line for line in daemon.log_text().splitlines()
                              if '"http_listening"' in line))["url"]
        assert readyz(url)[0] == 200
        # When the inbox folder is deleted
        shutil.rmtree(root / "inbox")
        # Then the daemon says it is not ready, and why
        wait_until(lambda: readyz(url)[0] == 503, 30, message="not ready")
        body = readyz(url)[1]
        assert "inbox folder missing" in body and "main" in body
        # And when it is made again, a file dropped into it is processed at once (no rescan)
        (root / "inbox").mkdir()
        wait_until(lambda: '"watch_rearmed"' in daemon.log_text(), 30, message="rearmed")
        (root / "inbox" / "back.mp3").write_bytes(b"back")
        wait_until(lambda: files_under(root / "done") == ["back.mp3"], 30, message="back done")
        assert readyz(url)[0] == 200
