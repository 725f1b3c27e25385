"""Operator mistakes: a real `traxd run` (or `traxd batch`) given a bad config or a bad place
answers with the file, the key and what to do, exits 2, leaves nothing behind, and never
prints a traceback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.kit import Tally
from tests.helpers import base_daemon, files_under, running_daemon, wait_until, write_config

Mistake = Callable[[Path], tuple[Path, str]]  # root -> (config file, key named in the message)


def _daemon_value(key: str, raw: str) -> Mistake:
    """A config whose [daemon] `key` is the TOML text `raw`."""
    def make(root: Path) -> tuple[Path, str]:
        daemon = {k: v for k, v in base_daemon(root).items() if k != key}
        config = write_config(root / "traxd.toml", daemon,
                              [{"name": "main", "path": str(root / "inbox")}])
        config.write_text(config.read_text().replace("[daemon]\n", f"[daemon]\n{key} = {raw}\n"))
        return config, f"daemon.{key}"
    return make


def _inbox_at(place: str) -> Mistake:
    """An inbox whose path is `place` below root, after a file `afile` is made there."""
    def make(root: Path) -> tuple[Path, str]:
        (root / "afile").write_bytes(b"not a folder")
        return write_config(root / "traxd.toml", base_daemon(root),
                            [{"name": "main", "path": str(root / place)}]), "inbox[0].path"
    return make


def _state_in_a_file(root: Path) -> tuple[Path, str]:
    (root / "afile").write_bytes(b"not a folder")
    return write_config(root / "traxd.toml", base_daemon(root, state_dir=str(root / "afile")),
                        [{"name": "main", "path": str(root / "inbox")}]), "daemon.state_dir"


def _not_utf8(root: Path) -> tuple[Path, str]:
    config = root / "traxd.toml"
    config.write_bytes(b"[daemon]\nstate_dir = \"caf\xe9\"\n")
    return config, "UTF-8"


def _state_inside_the_inbox(root: Path) -> tuple[Path, str]:
    return write_config(root / "traxd.toml",
                        base_daemon(root, state_dir=str(root / "inbox" / "state")),
                        [{"name": "main", "path": str(root / "inbox")}]), "daemon.state_dir"


def _inbox_inside_done(root: Path) -> tuple[Path, str]:
    return write_config(root / "traxd.toml", base_daemon(root), [
        {"name": "main", "path": str(root / "a" / "inbox")},
        {"name": "second", "path": str(root / "a" / "done" / "inbox")}]), "inbox[1].path"


MISTAKES: dict[str, Mistake] = {
    "config not UTF-8": _not_utf8,
    "duration that overflows (1e300)": _daemon_value("batch_interval", "1e300"),
    "duration nan": _daemon_value("settle_seconds", "nan"),
    "duration inf": _daemon_value("step_timeout", "inf"),
    "number inf": _daemon_value("cpu_limit_percent", "inf"),
    "integer past 32 bits": _daemon_value("workers", "9223372036854775807"),
    "metrics port out of range": _daemon_value("metrics_address", '"127.0.0.1:99999"'),
    "inbox path is a file": _inbox_at("afile"),
    "inbox parent is a file": _inbox_at("afile/inbox"),
    "state_dir is a file": _state_in_a_file,
    "state_dir inside an inbox": _state_inside_the_inbox,
    "inbox inside another inbox's done/": _inbox_inside_done,
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_an_operator_mistake_gets_a_message_not_a_traceback(short_root: Path, tally: Tally,
                                                            mistake: str) -> None:
    tally.operator_mistakes.append(mistake)
    # Given a config with the mistake
    config, key = MISTAKES[mistake](short_root)
    # When the daemon is started
    result = subprocess.run([sys.executable, "-m", "traxd", "run", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)
    # Then it names the file and the key, exits 2, and leaves no socket behind
    if "Traceback" in result.stderr or result.returncode not in (0, 2):
        tally.daemon_crashes += 1
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    assert str(config.name) in result.stderr and key in result.stderr, result.stderr
    assert not list(short_root.rglob("traxd.sock"))


def test_batch_output_that_is_a_file_gets_a_message(short_root: Path, tally: Tally) -> None:
    tally.operator_mistakes.append("batch --output is a file")
    (short_root / "in").mkdir()
    (short_root / "out").write_bytes(b"a file")
    config = write_config(short_root / "traxd.toml", base_daemon(short_root), [])
    result = subprocess.run([sys.executable, "-m", "traxd", "batch", str(short_root / "in"),
                             "--output", str(short_root / "out"), "--config", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in result.stderr + result.stdout
    assert result.returncode == 2
    assert "--output" in result.stdout and "is a file" in result.stdout
    assert (short_root / "out").read_bytes() == b"a file"


def test_relative_paths_are_read_against_the_config_files_folder(short_root: Path,
                                                                 tally: Tally) -> None:
    tally.operator_mistakes.append("relative paths, started from another folder")
    # Given a config with relative paths, in a folder other than the current one
    site = short_root / "site"
    site.mkdir()
    daemon = {**base_daemon(short_root), "state_dir": "state"}
    config = write_config(site / "traxd.toml", daemon, [{
        "name": "main", "path": "media/inbox", "pipeline": [{"command": ["true"]}]}])
    # When it runs (the test's current folder is elsewhere) and a file is dropped
    with running_daemon(config, short_root / "log"):
        (site / "media" / "inbox" / "a.mp3").write_bytes(b"a")
        wait_until(lambda: files_under(site / "media" / "done") == ["a.mp3"], 30,
                   message="done beside the config")
        # Then the folders and the journal are beside the config file
        assert (site / "state" / "journal.sqlite3").is_file()
    tally.files_dropped += 1
