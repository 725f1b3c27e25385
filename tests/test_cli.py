"""The command line as a user runs it: init, batch (progress, resume, failures)."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import io
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
from collections.abc import Sequence
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from tests.faults.kit import ffmpeg
from tests.helpers import base_daemon, copy_step, files_under, wait_until, write_config
from tests.media.openai_server import FakeOpenAI
from traxd.batch import BatchRun
from traxd.cli import build_parser
from traxd.config import InboxSettings, Settings, load_settings
from traxd.eta import Eta, Throughput
from traxd.jobs import JobEnd


def traxd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "traxd", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, check=False)


def test_init_demo_writes_a_config_that_loads_and_the_folders(tmp_path: Path) -> None:
    result = traxd("init", "--demo", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    logged = json.loads(result.stderr.splitlines()[0])
    assert logged["event"] == "config_written" and logged["timestamp"].endswith("Z")
    settings = load_settings(tmp_path / "demo" / "traxd.toml")
    assert settings.inboxes[0].path == tmp_path / "demo" / "inbox"
    assert settings.transcribe.backend == "local"
    assert settings.transcribe.model == "tiny.en"
    for folder in ("inbox", "processing", "done", "outputs", "failed"):
        assert (tmp_path / "demo" / folder).is_dir()
    again = traxd("init", "--demo", str(tmp_path / "demo"))
    assert again.returncode == 1
    assert "exists" in again.stderr


def test_batch_processes_in_place_lists_failures_and_resumes(tmp_path: Path) -> None:
    # Given a folder of files, one of which the command refuses
    ledger = tmp_path / "ledger"
    config = write_config(tmp_path / "c.toml", {"state_dir": str(tmp_path / "state")}, [{
        "name": "x", "path": str(tmp_path / "unused" / "inbox"),
        "pipeline": [{"command": copy_step(ledger)}]}])
    folder = tmp_path / "recordings"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.mp3", "b.mp3", "sub/c.mp3"):
        (folder / name).write_bytes(name.encode())
    (folder / "bad.mp3").write_bytes(b"FAIL")
    # When it is processed once
    first = traxd("batch", str(folder), "--config", str(config), "--workers", "2")
    # Then originals stay, outputs go beside, the failure is listed and the exit status is 1
    assert first.returncode == 1, first.stdout + first.stderr
    assert files_under(folder) == ["a.mp3", "b.mp3", "bad.mp3", "sub/c.mp3"]
    outputs = tmp_path / "recordings.transcripts"
    lines = first.stdout.splitlines()
    assert lines[:2] == [f"traxd batch: 4 to do in {folder}", f"outputs: {outputs}"], lines
    assert [f for f in files_under(outputs) if not f.startswith(".traxd")] == [
        "a.txt", "b.txt", "failed.jsonl", "report.json", "report.md", "sub/c.txt"]
    failed = [json.loads(line) for line in (outputs / "failed.jsonl").read_text().splitlines()]
    assert [f["file"] for f in failed] == ["bad.mp3"]
    assert "refusing to copy" in failed[0]["message"]
    assert "bad.mp3" in first.stdout
    # And a re-run skips what was done, trying only the failed file again
    (folder / "bad.mp3").write_bytes(b"fixed")
    second = traxd("batch", str(folder), "--config", str(config))
    assert second.returncode == 0, second.stdout + second.stderr
    assert sorted(ledger.read_text().split()) == ["a.mp3", "b.mp3", "bad.mp3", "c.mp3"]
    assert (outputs / "bad.txt").read_bytes() == b"fixed"
    assert (outputs / "failed.jsonl").read_text() == ""


def test_a_missing_enhancement_key_is_a_warning_in_batch_mode(tmp_path: Path) -> None:
    # Given a folder of two recordings, a transcription server, and no enhancement key
    folder = tmp_path / "talks"
    folder.mkdir()
    for name in ("a.wav", "b.wav"):
        ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", str(folder / name))
    with FakeOpenAI().running() as server:
        config = write_config(
            tmp_path / "c.toml", {"state_dir": str(tmp_path / "state")},
            [{"name": "x", "path": str(tmp_path / "unused" / "inbox"),
              "pipeline": ["preprocess", "transcribe", "enhance"]}],
            transcribe={"backend": "openai", "base_url": server.base_url,
                        "api_key_env": "TRAXD_TEST_BATCH_TRANSCRIBE_KEY"},
            enhance={"base_url": server.base_url,
                     "api_key_env": "TRAXD_TEST_BATCH_ENHANCE_KEY"})
        env = {**os.environ, "TRAXD_TEST_BATCH_TRANSCRIBE_KEY": "sk-test-" + "t" * 24,
               "COLUMNS": "200"}
        env.pop("TRAXD_TEST_BATCH_ENHANCE_KEY", None)
        # When the folder is processed
        result = subprocess.run([sys.executable, "-m", "traxd", "batch", str(folder),
                                 "--config", str(config)], capture_output=True, text=True,
                                timeout=120, env=env, check=False)
        paths = server.paths()
    # Then both files are done with their transcripts, none failed, and it warns
    assert result.returncode == 0, result.stdout + result.stderr
    outputs = tmp_path / "talks.transcripts"
    assert {"a.txt", "a.warnings.json", "b.txt", "b.warnings.json"} <= set(
        files_under(outputs))
    assert (outputs / "failed.jsonl").read_text() == ""
    assert "warning: enhance has no API key (TRAXD_TEST_BATCH_ENHANCE_KEY: not set)" \
        in result.stdout
    assert "warning: enhance did not run for 2 files (no API key for 127.0.0.1)" \
        in result.stdout
    assert '"backend_paused"' not in result.stdout  # no one resumes a batch
    assert all(path.endswith("/audio/transcriptions") for path in paths), paths
    report = json.loads((outputs / "report.json").read_text())
    assert (report["done"], report["failed"]) == (2, 0), report
    assert [w["step"] for w in report["warnings"]] == ["enhance", "enhance"]


def test_two_folders_in_one_parent_never_share_outputs(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", {"state_dir": str(tmp_path / "state")}, [{
        "name": "x", "path": str(tmp_path / "unused" / "inbox"),
        "pipeline": [{"command": copy_step(tmp_path / "ledger")}]}])
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "clip.mp3").write_bytes(name.encode())
        result = traxd("batch", str(tmp_path / name), "--config", str(config))
        assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "a.transcripts" / "clip.txt").read_bytes() == b"a"
    assert (tmp_path / "b.transcripts" / "clip.txt").read_bytes() == b"b"
    assert files_under(tmp_path / "b.transcripts") == [
        ".traxd/batch.sqlite3", "clip.txt", "failed.jsonl", "report.json", "report.md"]


def test_an_empty_folder_is_nothing_to_do(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = traxd("batch", str(tmp_path / "empty"))
    assert result.returncode == 0, result.stderr
    assert "holds no files; nothing to do" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_files_that_are_not_media_are_skipped_with_the_reason(tmp_path: Path) -> None:
    # Given recordings with notes and slides beside them, and a media pipeline
    config = write_config(tmp_path / "c.toml", {"state_dir": str(tmp_path / "state")}, [{
        "name": "x", "path": str(tmp_path / "unused" / "inbox"),
        "pipeline": ["download", "preprocess"]}])
    folder = tmp_path / "talks"
    folder.mkdir()
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                    "sine=f=300:r=16000", "-t", "1", str(folder / "talk.wav")], check=True)
    (folder / "notes.txt").write_text("Questions for the speaker:\n- see https://example.com\n")
    (folder / "slides.pdf").write_bytes(b"%PDF-1.4")
    # When it is processed
    result = traxd("batch", str(folder), "--config", str(config))
    # Then only the recording is processed, the others are named with why, and none failed
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped notes.txt: a text file that is not a list of links" in result.stdout
    assert "skipped slides.pdf: not audio or video (.pdf)" in result.stdout
    assert (tmp_path / "talks.transcripts" / "failed.jsonl").read_text() == ""


def test_a_text_file_of_links_and_comments_is_a_link_file(tmp_path: Path) -> None:
    from traxd.batch import lists_links

    (tmp_path / "links.txt").write_text("# talks\nhttps://example.com/a\n\nhttp://x.org/b\n")
    (tmp_path / "prose.txt").write_text("see https://example.com/a for more\n")
    (tmp_path / "blank.txt").write_text("# nothing yet\n")
    assert [lists_links(tmp_path / n) for n in ("links.txt", "prose.txt", "blank.txt")] == [
        True, False, False]


def test_ctrl_c_in_batch_prints_the_summary_and_how_to_resume(tmp_path: Path) -> None:
    # Given a batch whose steps take long
    folder = tmp_path / "slow"
    folder.mkdir()
    for name in ("a.mp3", "b.mp3", "c.mp3"):
        (folder / name).write_bytes(name.encode())

    def config(delay: float) -> Path:
        return write_config(tmp_path / "c.toml", {"state_dir": str(tmp_path / "state")}, [{
            "name": "x", "path": str(tmp_path / "unused" / "inbox"),
            "pipeline": [{"command": copy_step(tmp_path / "ledger", delay)}]}])

    out = tmp_path / "out"
    with out.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "traxd", "batch", str(folder), "--config",
                                 str(config(60)), "--workers", "1"], stdout=sink,
                                stderr=subprocess.STDOUT)
        try:
            # When Ctrl-C comes while a step runs
            wait_until(lambda: psutil.Process(proc.pid).children(), 60, message="a step")
            proc.send_signal(signal.SIGINT)
            code = proc.wait(30)
        finally:
            proc.kill()
    # Then it stops at once, with the summary so far and the command that resumes
    text = out.read_text()
    assert code == 130, text
    assert "MB processed" in text, text
    assert f"interrupted: 3 of 3 files not finished; to resume, run again: traxd batch {folder}" \
        in text, text
    # And that command resumes
    again = traxd("batch", str(folder), "--config", str(config(0)))
    assert again.returncode == 0, again.stdout + again.stderr
    assert sorted(ledger for ledger in (tmp_path / "ledger").read_text().split()) == [
        "a.mp3", "b.mp3", "c.mp3"]


def test_log_lines_go_above_the_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    # Given a batch on a terminal whose files fail (each failure is logged)
    config = write_config(tmp_path / "c.toml", {"state_dir": str(tmp_path / "state"),
                                                "log_format": "console"}, [{
        "name": "x", "path": str(tmp_path / "unused" / "inbox"),
        "pipeline": [{"command": copy_step(tmp_path / "ledger", 0.3)}]}])
    folder = tmp_path / "bad"
    folder.mkdir()
    for n in range(3):
        (folder / f"{n}.mp3").write_bytes(b"FAIL")
    # When it runs
    text = run_on_terminal([sys.executable, "-m", "traxd", "batch", str(folder), "--config",
                            str(config), "--workers", "1"])
    # Then every log line stands alone: no bar before it on its line
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    logged = [part for part in re.split(r"[\r\n]", plain) if "job_failed" in part]
    assert len(logged) == 3, plain
    assert all(part.lstrip().startswith("20") for part in logged), logged


def run_on_terminal(argv: list[str]) -> str:
    """The output of argv run with a pseudo-terminal (80 columns) as stdout and stderr."""
    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "80"}
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=side, stderr=side, env=env)
    os.close(side)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(60)
    finally:
        proc.kill()
        os.close(main)
    return b"".join(chunks).decode("utf-8", "replace")


def test_every_command_and_option_is_explained() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        assert command.description, name
        assert "exit status:" in (command.epilog or ""), name
        assert "examples:" in (command.epilog or ""), name
        for action in command._actions:
            assert action.help, f"traxd {name} {action.dest}: no help text"
    shown = traxd("batch", "--help")
    assert "DIR.transcripts" in shown.stdout and "130  interrupted" in shown.stdout


def test_options_are_validated(tmp_path: Path) -> None:
    for option in ("--workers", "--memory-limit"):
        refused = traxd("batch", str(tmp_path), option, "0")
        assert refused.returncode == 2
        assert f"argument {option}: 0 is too small: 1 or more" in refused.stderr


def test_service_dry_run_prints_unit_lines_whole_when_piped(tmp_path: Path) -> None:
    root = tmp_path / ("a-folder-with-a-long-name-" * 3)
    root.mkdir()
    config = write_config(root / "traxd.toml", base_daemon(root), [{
        "name": "main", "path": str(root / "inbox"), "pipeline": ["preprocess"]}])
    result = traxd("service", "install", "--user", "--dry-run", "--config", str(config))
    assert result.returncode == 0, result.stderr
    start = [line for line in result.stdout.splitlines() if line.startswith("ExecStart=")]
    assert len(start) == 1 and len(start[0]) > 80, result.stdout
    assert start[0].endswith(f" -m traxd run --config {config.resolve()}"), start


def test_config_errors_suggest_the_key_meant_and_have_no_placeholder(tmp_path: Path) -> None:
    typo = tmp_path / "typo.toml"
    typo.write_text("[daemon]\nworkerz = 3\n")
    broken = tmp_path / "broken.toml"
    broken.write_text("[daemon\n")
    said = traxd("doctor", "--config", str(typo))
    assert f"{typo}: daemon.workerz: unknown key; did you mean 'workers'?" in said.stderr
    run = traxd("run", "--config", str(broken))
    assert run.returncode == 2
    assert f"traxd: configuration error: {broken}: not valid TOML" in run.stderr, run.stderr


def service_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    return {**env, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}


def service_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "traxd.toml", base_daemon(tmp_path), [{
        "name": "main", "path": str(tmp_path / "inbox"), "pipeline": ["preprocess"]}])


@pytest.mark.skipif(Path("/run/systemd/system").is_dir(), reason="systemd runs here")
def test_service_install_without_systemd_says_so_in_one_line(tmp_path: Path) -> None:
    config = service_config(tmp_path)
    result = subprocess.run([sys.executable, "-m", "traxd", "service", "install", "--user",
                             "--config", str(config)], capture_output=True, text=True,
                            timeout=60, check=False, env=service_env(tmp_path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "traxd service: systemd is not running on this machine (no /run/systemd/system): "
        f"start `traxd run --config {config}` from the service manager it has"]
    assert not (tmp_path / "xdg").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the warning is for root")
def test_a_system_unit_that_would_run_as_root_is_warned_of(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "traxd", "service", "install", "--dry-run",
                             "--config", str(service_config(tmp_path))], capture_output=True,
                            text=True, timeout=60, check=False, env=service_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "note: warning: this unit runs traxd as root" in result.stdout
    assert "add User=traxd under [Service]" in result.stdout


def test_service_uninstall_stops_disables_and_removes_the_unit(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    from rich.console import Console

    from traxd import service

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    unit = tmp_path / "xdg" / "systemd" / "user" / "traxd.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\n")
    shown = subprocess.run([sys.executable, "-m", "traxd", "service", "uninstall", "--user",
                            "--dry-run"], capture_output=True, text=True, timeout=60,
                           check=False, env=service_env(tmp_path))
    assert shown.stdout.splitlines() == [
        "would run: systemctl --user disable --now traxd.service", f"would remove {unit}",
        "would run: systemctl --user daemon-reload"]
    ran: list[tuple[str, ...]] = []

    def runner(argv: Sequence[str]) -> int:
        ran.append(tuple(argv))
        return 0

    code = service.uninstall(user=True, console=Console(file=io.StringIO()), runner=runner,
                             platform="linux")
    assert code == 0 and not unit.exists()
    assert ran == [("systemctl", "--user", "disable", "--now", "traxd.service"),
                   ("systemctl", "--user", "daemon-reload")]
    assert service.status(user=True, runner=runner, platform="linux") == 0
    assert ran[-1] == ("systemctl", "--user", "status", "--no-pager", "traxd.service")


def test_make_run_says_how_to_reach_the_daemon_from_another_terminal() -> None:
    root = Path(__file__).resolve().parent.parent
    planned = subprocess.run(["make", "-n", "run"], cwd=root, capture_output=True, text=True,
                             timeout=60, check=True).stdout
    assert "from another terminal, in this folder: .venv/bin/traxd status" in planned


async def test_the_batch_eta_counts_the_media_seconds_the_headers_state(tmp_path: Path) -> None:
    # Given a batch of a 1 s and a 3 s recording, not yet started
    folder, output = tmp_path / "talks", tmp_path / "talks.transcripts"
    folder.mkdir()
    output.mkdir()
    for name, seconds in (("a.wav", 1), ("b.wav", 3)):
        ffmpeg("-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
               str(folder / name))
    inbox = InboxSettings("batch", folder, pipeline=("preprocess", "transcribe"))
    run = BatchRun(Settings(inboxes=(inbox,)), folder, output, Console(file=io.StringIO()))
    try:
        jobs = await asyncio.to_thread(run.jobs)
        run.left = {job.id for job in jobs}
        # When their durations are probed
        await run._probe_durations(jobs)
        assert sorted(run.durations.values()) == [pytest.approx(1, abs=0.05),
                                                  pytest.approx(3, abs=0.05)]
        # And a file of 4 s was done 2 s into the batch
        clock = Clock()
        run.throughput = Throughput(clock, min_span=1.0, started=0.0)
        clock.now = 2.0
        run._ended(JobEnd(999, "batch", "earlier.wav", "done", 1, 2.0, media_seconds=4.0))
        # Then the 4 s of media left take 2 s at that rate (twice real time)
        assert parts(run.eta()) == (pytest.approx(2.0, abs=0.05), "media")
    finally:
        run.journal.close()


def parts(eta: Eta | None) -> tuple[object, ...] | None:
    """An estimate as a tuple, to compare with pytest.approx seconds."""
    return None if eta is None else (eta.seconds, eta.basis)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now
