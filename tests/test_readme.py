"""The README as a new user reads it: every shell command in its code blocks is run here
exactly as printed (in a copy of the repository, with a HOME of its own), or is listed in
NOT_RUN with the reason; its TOML is valid configuration.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import wait_until
from traxd.config import parse_settings

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VENV_BIN = Path(sys.prefix) / "bin"
DEMO_METRICS = ("127.0.0.1", 9108)  # what `traxd init --demo` writes
CLUSTER = ("the scale-out walk-through starts redis-server, a daemon and two workers in the "
           "background and copies from a placeholder path (/path/to/*.mp3): "
           "tests/cluster/test_cluster_daemon.py runs that set-up (and its config is checked "
           "below)")
# Commands of the README not run here, and why.
NOT_RUN = {
    "make test": "the whole suite, this file among it: CI runs it (.ci/run)",
    "pipx install '.[local]'": "installs from the network into the user's own environment; "
                               "`make` installs the same package for the suite",
    "redis-server --port 6390 --save '' --appendonly no --daemonize yes": CLUSTER,
    "mkdir -p ~/trax-cluster && cd ~/trax-cluster": CLUSTER,
    "cat > traxd.toml <<'EOF'": CLUSTER,
    "traxd run --config traxd.toml &": CLUSTER,
    "traxd worker --config traxd.toml --threads 1 > worker1.log 2>&1 &": CLUSTER,
    "traxd worker --config traxd.toml --threads 1 > worker2.log 2>&1 &": CLUSTER,
    "cp /path/to/*.mp3 talks/inbox/": CLUSTER,
    "traxd status --config traxd.toml": CLUSTER,
}
SHELLS = ("sh", "bash", "shell", "console")
COMMENT = re.compile(r"\s{2,}#.*$")
HEREDOC = re.compile(r"<<\s*'?(\w+)'?\s*$")


@dataclass(frozen=True)
class Command:
    printed: str  # the line as printed, comment and all (a heredoc: all its lines)

    @property
    def command(self) -> str:
        """The command without its comment (the first line of a heredoc)."""
        return COMMENT.sub("", self.printed.splitlines()[0]).strip()

    @property
    def comment(self) -> str:
        line = self.printed.splitlines()[0]
        return line.split("#", 1)[1].strip() if COMMENT.search(line) else ""


def code_blocks(text: str) -> Iterator[tuple[str, str]]:
    """(language, body) of each fenced block."""
    for match in re.finditer(r"^```(\S*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        yield match[1], match[2]


def commands_of(body: str) -> list[Command]:
    found: list[Command] = []
    lines = iter(body.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        rest = []
        if heredoc := HEREDOC.search(line):
            for more in lines:
                rest.append(more)
                if more.strip() == heredoc[1]:
                    break
        found.append(Command("\n".join([line, *rest])))
    return found


def readme_commands() -> list[Command]:
    return [c for lang, body in code_blocks(README.read_text()) if lang in SHELLS
            for c in commands_of(body)]


def printed(command: str) -> Command:
    """The README's command, as printed; fails when the README no longer has it."""
    matches = [c for c in readme_commands() if c.command == command]
    assert matches, f"the README no longer shows `{command}`"
    return matches[0]


RUN = (
    "make run", "cp talk.mp3 demo/inbox/", "ls demo/outputs/", "ls demo/done/",
    ".venv/bin/traxd status", "traxd init", "traxd doctor", "traxd service install --user",
    "traxd service status --user", "traxd service uninstall --user", "traxd report",
    "traxd report --last --json", "traxd batch talks",
    "traxd report talks.transcripts/report.json",
)


def test_every_command_in_the_readme_is_run_or_said_why_not() -> None:
    shown = [c.command for c in readme_commands()]
    assert len(shown) == len(set(shown)), "a command shown twice: run once, keep it once"
    assert set(shown) == set(RUN) | set(NOT_RUN), (
        f"not run and not excused: {sorted(set(shown) - set(RUN) - set(NOT_RUN))}; "
        f"run or excused but gone from the README: {sorted(set(RUN) | set(NOT_RUN) - set(shown))}")
    untagged = [body for lang, body in code_blocks(README.read_text()) if not lang]
    assert not untagged, f"a code block without a language hides its commands: {untagged}"


def test_the_readme_toml_is_valid_configuration(tmp_path: Path) -> None:
    blocks = [body for lang, body in code_blocks(README.read_text()) if lang == "toml"]
    heredoc = printed("cat > traxd.toml <<'EOF'").printed.split("\n", 1)[1].rsplit("EOF", 1)[0]
    for body in [*blocks, heredoc]:
        parse_settings(tomllib.loads(body), source=tmp_path / "traxd.toml")
    assert len(blocks) >= 4


# --- running them ------------------------------------------------------------------------


def sh(command: Command, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a command exactly as the README prints it."""
    return subprocess.run(["bash", "-c", command.printed], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=120, check=False)


def user_env(home: Path, repo: Path) -> dict[str, str]:
    """A new user: a home of their own, traxd on PATH (as pipx puts it), no config yet."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRAXD_CONFIG", "INVOCATION_ID") and not k.startswith("XDG_")}
    return {**env, "HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run"),
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", "PYTHONPATH": str(repo),
            "COLUMNS": "100"}


def speak(text: str, out: Path) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    wav = out.with_suffix(".wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), text], check=True)
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(wav), str(out)],
                   check=True)
    wav.unlink()


def fresh_clone(tmp_path: Path) -> Path:
    """A copy of the repository whose .venv is the one running these tests, installed."""
    stamp = Path(sys.prefix) / ".installed-local"
    if not (VENV_BIN / "traxd").exists() or not stamp.exists():
        pytest.skip("needs the checkout's .venv made by `make` (with its stamp files)")
    clone = tmp_path / "traxd"
    shutil.copytree(REPO, clone, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "demo", "__pycache__", ".*_cache", "*.egg-info"))
    (clone / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    installed = stamp.stat().st_mtime
    os.utime(clone / "pyproject.toml", (installed - 1, installed - 1))  # nothing to install
    planned = subprocess.run(["make", "-n", "run"], cwd=clone, capture_output=True, text=True,
                             timeout=60, check=True).stdout
    assert "pip install" not in planned, planned
    return clone


def port_free(address: tuple[str, int]) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(address)
        except OSError:
            return False
    return True


@pytest.mark.integration
def test_make_run_the_demo_and_its_reports_as_printed(tmp_path: Path) -> None:
    if not port_free(DEMO_METRICS):
        pytest.skip("the demo's metrics address 127.0.0.1:9108 is in use")
    clone = fresh_clone(tmp_path)
    env = user_env(tmp_path / "home", clone)
    speak("Welcome to the demo of traxd.", clone / "talk.mp3")
    (clone / "talks").mkdir()
    speak("A lecture about sound.", clone / "talks" / "lecture.mp3")
    log = tmp_path / "make-run.log"
    with log.open("wb") as out:
        make = subprocess.Popen(["bash", "-c", printed("make run").printed], cwd=clone,
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until(lambda: " ready " in log.read_text() or make.poll() is not None, 60,
                   interval=0.2, message="`make run` ready")
        assert make.poll() is None, log.read_text()
        the_demo(clone, env)
        the_reports(clone, env)
    finally:
        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C, as in the terminal running it
        try:
            make.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait(10)
    assert "stopped" in log.read_text(), log.read_text()


def the_demo(clone: Path, env: dict[str, str]) -> None:
    assert sh(printed("cp talk.mp3 demo/inbox/"), clone, env).returncode == 0
    wait_until((clone / "demo" / "done" / "talk.mp3").exists, 60, interval=0.2,
               message="talk.mp3 done")
    for listing in ("ls demo/outputs/", "ls demo/done/"):
        command = printed(listing)
        shown = sh(command, clone, env)
        assert shown.returncode == 0, shown.stderr
        assert sorted(shown.stdout.split()) == sorted(command.comment.split()), listing
    status = sh(printed(".venv/bin/traxd status"), clone, env)
    assert status.returncode == 0, status.stderr
    assert "demo" in status.stdout and "Inboxes" in status.stdout


def the_reports(clone: Path, env: dict[str, str]) -> None:
    reports = clone / "demo" / "state" / "reports"
    wait_until(lambda: list(reports.glob("*.json")), 30, message="the demo batch's report")
    shown = sh(printed("traxd report"), clone, env)
    assert shown.returncode == 0, shown.stderr
    assert "demo/talk.mp3" in shown.stdout
    as_json = sh(printed("traxd report --last --json"), clone, env)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["done"] == 1
    batch = sh(printed("traxd batch talks"), clone, env)
    assert batch.returncode == 0, batch.stdout + batch.stderr
    of_batch = sh(printed("traxd report talks.transcripts/report.json"), clone, env)
    assert of_batch.returncode == 0, of_batch.stderr
    assert "batch/lecture.mp3" in of_batch.stdout


@pytest.mark.integration
def test_the_install_section_as_printed(tmp_path: Path) -> None:
    # `pipx install` puts traxd on PATH: here the .venv running the tests does
    home = tmp_path / "home"
    env = user_env(home, REPO)
    init = sh(printed("traxd init"), REPO, env)
    assert init.returncode == 0, init.stderr
    assert (home / ".config" / "traxd" / "traxd.toml").is_file()
    assert (home / "Trax" / "inbox").is_dir()
    doctor = sh(printed("traxd doctor"), REPO, env)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "running daemon: not asked: traxd is not running" in doctor.stdout


@pytest.mark.integration
def test_the_service_commands_as_printed_without_a_service_manager(tmp_path: Path) -> None:
    from traxd.service import no_service_manager

    if no_service_manager() is None:
        pytest.skip("a service manager runs here: these would install a real unit")
    env = user_env(tmp_path / "home", REPO)
    assert sh(printed("traxd init"), REPO, env).returncode == 0
    for name in ("traxd service install --user", "traxd service status --user",
                 "traxd service uninstall --user"):
        result = sh(printed(name), REPO, env)
        # Then each says in one line that there is no service manager, and changes nothing
        assert result.returncode == 1, result.stdout + result.stderr
        assert result.stderr.startswith("traxd service: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "home" / ".config" / "systemd").exists()
