"""The command line as a user runs it: init, batch (progress, resume, failures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import copy_step, files_under, write_config
from traxd.config import load_settings


def traxd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "traxd", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, check=False)


def test_init_demo_writes_a_config_that_loads_and_the_folders(tmp_path: Path) -> None:
    result = traxd("init", "--demo", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
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
    outputs = tmp_path / "outputs"
    assert [f for f in files_under(outputs) if not f.startswith(".traxd")] == [
        "a.txt", "b.txt", "failed.jsonl", "sub/c.txt"]
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
