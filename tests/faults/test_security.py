"""Security: no shell, file names never become options, modes follow the configured umask,
the control socket is private, and an API key never reaches a log, file, status or metric."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.faults.kit import Box, FaultDaemon, Tally, make_media
from tests.helpers import base_daemon, copy_step, files_under, wait_until, write_config
from traxd.control import request

pytestmark = pytest.mark.faults

PACKAGE = Path(__file__).resolve().parents[2] / "traxd"
SHELL_PATTERNS = re.compile(
    r"shell\s*=\s*True|os\.system\s*\(|create_subprocess_shell|os\.popen\s*\(|"
    r"subprocess\.getoutput|subprocess\.getstatusoutput|os\.exec[lv]p?e?\s*\(\s*['\"]/bin/sh")


def test_nothing_in_traxd_runs_a_shell() -> None:
    # Given every Python file of the package
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 20
    # When they are searched for ways of running a command through a shell
    found = [f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
             for path in sources
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if SHELL_PATTERNS.search(line)]
    # Then there are none
    assert found == []


# A program that parses its arguments like most tools do: an argument starting with "-"
# that it does not know is an error; it records what it was given as an output.
ARGPARSE_TOOL = (
    "import argparse, json, os, shutil\n"
    "p = argparse.ArgumentParser()\n"
    "p.add_argument('-r', action='store_true'); p.add_argument('-f', action='store_true')\n"
    "p.add_argument('name'); p.add_argument('stem'); p.add_argument('input')\n"
    "p.add_argument('out')\n"
    "a = p.parse_args()\n"
    "shutil.copyfile(a.input, os.path.join(a.out, os.path.basename(a.stem) + '.txt'))\n"
    "with open(os.path.join(a.out, os.path.basename(a.stem) + '.argv.json'), 'w') as f:\n"
    "    json.dump(vars(a), f)\n"
)


def test_names_that_look_like_options_reach_a_command_as_paths(short_root: Path,
                                                               tally: Tally) -> None:
    # Given a command step whose program would take "-rf" or "--help" as options
    box = Box(short_root / "box").make()
    config = write_config(short_root / "traxd.toml", base_daemon(short_root, settle_seconds=0.1), [{
        "name": "main", "path": str(box.inbox), "pipeline": [{"command": [
            sys.executable, "-c", ARGPARSE_TOOL, "{name}", "{stem}", "{input}",
            "{output_dir}"]}]}])
    names = ["--help.mp3", "-rf"]
    tally.bad_inputs += [f"option-like name {n!r}" for n in names]
    tally.files_dropped += len(names)
    daemon = FaultDaemon(config, short_root / "log").start()
    try:
        # When files with such names are dropped
        for name in names:
            (box.inbox / name).write_bytes(name.encode())
        # Then the program gets them as paths ("./-rf"), runs, and both are done
        wait_until(lambda: files_under(box.done) == sorted(names), 30, message="both done")
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
    assert files_under(box.failed) == []
    help_argv = json.loads((box.outputs / "--help.argv.json").read_text())
    rf_argv = json.loads((box.outputs / "-rf.argv.json").read_text())
    assert (help_argv["name"], help_argv["stem"]) == ("./--help.mp3", "./--help")
    assert (rf_argv["name"], rf_argv["stem"], rf_argv["r"], rf_argv["f"]) == (
        "./-rf", "./-rf", False, False)
    assert Path(rf_argv["input"]).is_absolute()
    assert (box.outputs / "-rf.txt").read_bytes() == b"-rf"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_files_follow_the_configured_umask_and_the_socket_is_private(short_root: Path,
                                                                     tally: Tally) -> None:
    # Given a daemon configured with umask "077", started from a permissive umask
    box = Box(short_root / "box").make()
    config = write_config(short_root / "traxd.toml", base_daemon(
        short_root, umask="077", settle_seconds=0.1), [{
            "name": "main", "path": str(box.inbox),
            "pipeline": [{"command": copy_step(short_root / "ledger")}]}])
    old = os.umask(0o002)
    try:
        daemon = FaultDaemon(config, short_root / "log").start()
    finally:
        os.umask(old)
    tally.files_dropped += 2
    try:
        # When a file in a sub-folder is processed and another one fails
        (box.inbox / "sub").mkdir(mode=0o755)
        (box.inbox / "sub" / "talk.mp3").write_bytes(b"talk")
        (box.inbox / "bad.mp3").write_bytes(b"FAIL")
        wait_until(lambda: files_under(box.done) == ["sub/talk.mp3"]
                   and "bad.mp3.error.json" in files_under(box.failed), 30, message="outcomes")
        socket_mode = mode(short_root / "state" / "traxd.sock")
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
    # Then what traxd created is private to its user: outputs, their folder, the error
    # sidecar, the journal, and the control socket
    assert mode(box.outputs / "sub" / "talk.txt") == 0o600
    assert mode(box.outputs / "sub") == 0o700
    assert mode(box.failed / "bad.mp3.error.json") == 0o600
    assert mode(short_root / "state" / "journal.sqlite3") == 0o600
    assert socket_mode == 0o600


# --- secrets --------------------------------------------------------------------------------

KEY = "sk-test-SECRETSECRET1234"
KEY_ENV = "TRAXD_FAULTS_API_KEY"


@dataclass
class FakeProvider:
    """An OpenAI-compatible server that rejects every request and quotes the key back,
    as some providers do: 400 first, then 401 once told to."""

    status: int = 400
    authorizations: list[str] = field(default_factory=list)
    url: str = ""


def serve_provider(provider: FakeProvider) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            auth = self.headers.get("Authorization", "")
            provider.authorizations.append(auth)
            key = auth.removeprefix("Bearer ")
            message = (f"Invalid file format. (key {key})" if provider.status == 400 else
                       f"Incorrect API key provided: {key}. Check it and try again.")
            body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                         "code": "invalid_api_key"}}).encode()
            self.send_response(provider.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    provider.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    return server


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    fake = FakeProvider()
    server = serve_provider(fake)
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


def http_text(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as exc:
        return str(exc.read().decode())


def traxd_cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "traxd", *args], capture_output=True,
                            text=True, timeout=30, check=False)
    return result.stdout + result.stderr


def test_an_api_key_never_appears_in_any_artefact(short_root: Path, provider: FakeProvider,
                                                  tally: Tally) -> None:
    # Given the openai backend with a key in the environment, against a provider that
    # rejects requests and quotes the key in its error messages; metrics on a free port
    box = Box(short_root / "box").make()
    state = short_root / "state"
    config = write_config(
        short_root / "traxd.toml",
        base_daemon(short_root, settle_seconds=0.1, metrics_address="127.0.0.1:0"),
        [{"name": "talks", "path": str(box.inbox), "pipeline": ["preprocess", "transcribe"]}],
        transcribe={"backend": "openai", "base_url": provider.url, "api_key_env": KEY_ENV,
                    "model": "whisper-1"})
    media = make_media(short_root / "media")
    daemon = FaultDaemon(config, short_root / "log", env={KEY_ENV: KEY}).start()
    tally.files_dropped += 2
    try:
        # When one file is rejected with 400 (a permanent failure with a sidecar) ...
        (box.inbox / "first.wav").write_bytes(media["wav"].read_bytes())
        wait_until(lambda: box.has_error("first.wav"), 60, message="first.wav failed")
        # ... and the next with 401 (the backend is paused, the file waits)
        provider.status = 401
        (box.inbox / "second.mp3").write_bytes(media["mp3"].read_bytes())
        status = wait_until(lambda: (s := request(state / "traxd.sock", "status"))[
            "backends_paused"] and s, 60, message="backend paused")
        listening = [e for e in daemon.events() if e["event"] == "http_listening"]
        metrics_url = listening[0]["url"] if listening else None
        artefacts = {
            "status --json": traxd_cli("status", "--json", "--config", str(config)),
            "status": traxd_cli("status", "--config", str(config)),
            "control status": json.dumps(status),
        }
        if metrics_url is not None:
            artefacts["/metrics"] = http_text(metrics_url + "/metrics")
            artefacts["/readyz"] = http_text(metrics_url + "/readyz")
    finally:
        daemon.stop()  # SIGKILL: whatever is in the journal's WAL stays there to be read
    artefacts["daemon log"] = daemon.log_text()
    for path in [*box.root.rglob("*"), *state.rglob("*")]:
        if path.is_file() and not path.is_symlink():
            artefacts[str(path)] = path.read_bytes().decode("latin-1")

    # Then the key was really used, the errors still say what went wrong...
    assert f"Bearer {KEY}" in provider.authorizations
    assert metrics_url is not None, "the metrics address was not logged"
    error = box.error_of("first.wav")
    assert error["category"] == "permanent" and "400" in error["message"]
    assert "(key [redacted])" in error["message"]  # quoted back, and hidden
    assert "401" in status["backends_paused"]["openai"]
    assert "[redacted]" in status["backends_paused"]["openai"]
    assert "traxd_api_requests_total" in artefacts["/metrics"]
    assert any(p.endswith("journal.sqlite3") for p in artefacts)
    # ... and the key is nowhere: not whole, not its distinctive part
    leaks = [name for name, text in artefacts.items()
             if KEY in text or "SECRETSECRET1234" in text]
    assert leaks == []


ENV_DUMP = ("import os, sys\n"
            "sys.stderr.write('\\n'.join(f'{k}={v}' for k, v in sorted(os.environ.items())))\n"
            "sys.exit(3)\n")
CREDENTIALS = {"DEEPSEEK_API_KEY": "dsk_9f8e7d6c5b4a39281706", "GITHUB_TOKEN": "ghp_abcdef12345",
               "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG", "PGPASSWORD": "hunter2hunter2"}


@pytest.mark.parametrize("name", sorted(CREDENTIALS))
def test_a_step_process_inherits_no_credentials(short_root: Path, tally: Tally,
                                                name: str) -> None:
    # Given a daemon with a credential in its environment, and a command that prints the
    # environment it was given (on stderr, which ends in the failure sidecar) and fails
    tally.bad_inputs.append(f"environment dump with {name}")
    box = Box(short_root / "box").make()
    config = write_config(short_root / "traxd.toml", base_daemon(short_root), [{
        "name": "main", "path": str(box.inbox),
        "pipeline": [{"command": [sys.executable, "-c", ENV_DUMP]}]}])
    daemon = FaultDaemon(config, short_root / "log", env={name: CREDENTIALS[name]}).start()
    tally.files_dropped += 1
    try:
        # When a file is processed
        (box.inbox / "a.mp3").write_bytes(b"a")
        wait_until(lambda: box.has_error("a.mp3"), 30, message="a.mp3 failed")
    finally:
        daemon.stop()
    # Then the child saw the environment, but not the credential, so nothing can leak it
    message = box.error_of("a.mp3")["message"]
    assert "PATH=" in message
    assert f"\n{name}=" not in message and CREDENTIALS[name] not in message
    assert CREDENTIALS[name] not in daemon.log_text()


LEAKY = ("import sys\n"
         "sys.stderr.write('the key is ' + open(sys.argv[1]).read() + ' (do not share)')\n"
         "sys.exit(3)\n")
SECRET_SHAPES = {  # name of the variable that holds it -> a value of that shape
    "MY_LLM": "dsk_9f8e7d6c5b4a39281706",  # configured as api_key_env; not a credential name
    "SLACK_BOT_TOKEN": "xoxb-1234-5678-abcdefghijkl",
    "SMTP_PASSWORD": "correct horse battery staple",
    "SERVICE_JWT_TOKEN": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
}


@pytest.mark.parametrize("name", sorted(SECRET_SHAPES))
def test_a_secret_value_is_redacted_whatever_its_shape(short_root: Path, tally: Tally,
                                                       name: str) -> None:
    secret = SECRET_SHAPES[name]
    tally.secret_shapes.append(f"{name} ({secret[:4]}…)")
    # Given a daemon with a key in its environment (MY_LLM named as the enhance key), and a
    # command that gets the same value another way (a file) and prints it as it fails
    box = Box(short_root / "box").make()
    (short_root / "key").write_text(secret)
    config = write_config(short_root / "traxd.toml", base_daemon(short_root), [{
        "name": "main", "path": str(box.inbox),
        "pipeline": [{"command": [sys.executable, "-c", LEAKY, str(short_root / "key")]}]}],
        enhance={"api_key_env": "MY_LLM"})
    daemon = FaultDaemon(config, short_root / "log", env={name: secret}).start()
    tally.files_dropped += 1
    try:
        # When a file is processed and fails
        (box.inbox / "a.mp3").write_bytes(b"a")
        wait_until(lambda: box.has_error("a.mp3"), 30, message="a.mp3 failed")
        assert daemon.terminate() == 0
    finally:
        daemon.stop()
    # Then the message says what happened, with the value hidden in the sidecar, the log and
    # the journal
    assert "the key is [redacted] (do not share)" in box.error_of("a.mp3")["message"]
    places = {"log": daemon.log_text()} | {
        str(p): p.read_bytes().decode("latin-1")
        for p in [*box.root.rglob("*"), *(short_root / "state").rglob("*")] if p.is_file()}
    leaks = [place for place, text in places.items() if secret in text]
    tally.leaks += len(leaks)
    assert leaks == []
