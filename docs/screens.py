"""The README's screens, from real runs at 80 columns: `traxd status`, one frame of
`traxd status --watch`, and `traxd batch`.

    python docs/screens.py

Speaks four short recordings with espeak-ng, starts a real daemon (local tiny.en model,
one worker) on the first, drops the other three, and takes `traxd status` and one frame
of `traxd status --watch` while the second is transcribed; then runs `traxd batch` on a
folder of three. Each screen is printed as the command shows it, the temporary folder
written as `~`, to paste into README.md. Needs espeak-ng, ffmpeg and the `local` extra.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WIDTH = "80"
TALKS = {
    "keynote.mp3": "Welcome, everyone, to the opening keynote of this year's conference.",
    "standup.mp3": "Yesterday I fixed the upload bug. Today I will review the release notes, "
                   "and then I will pair with Sam on the search page.",
    "interview.mp3": "Tell us how the project started. It began as a weekend script that "
                     "turned my voice memos into text, and it grew from there.",
    "lecture.mp3": "Today we look at how sound becomes numbers: sampling, quantisation, and "
                   "why sixteen kilohertz is enough for speech.",
}


def speak(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        wav = folder / f".{name}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), TALKS[name]],
                       check=True)
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(wav),
                        str(folder / name)], check=True)
        wav.unlink()


def traxd(env: dict[str, str], *args: str, cwd: Path | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "traxd", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300, check=False)
    return done.stdout


def wait_for(what: str, check: Callable[[], object], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"screens: gave up waiting for {what}")
        time.sleep(0.1)


def config(root: Path) -> Path:
    path = root / "traxd.toml"
    path.write_text(f"""[daemon]
state_dir = "{root / 'state'}"
workers = 1
metrics_address = ""
batch_interval = "1s"
settle_seconds = 0.5

[[inbox]]
name = "talks"
path = "{root / 'talks' / 'inbox'}"
pipeline = ["preprocess", "transcribe"]

[transcribe]
model = "tiny.en"
""")
    return path


def status_screens(root: Path, env: dict[str, str]) -> tuple[str, str]:
    """`traxd status` and one `--watch` frame while a file is transcribed."""
    speak(root / "staging", list(TALKS))
    inbox = root / "talks" / "inbox"
    log = (root / "daemon.log").open("wb")
    daemon = subprocess.Popen([sys.executable, "-m", "traxd", "run", "--config",
                               str(config(root))], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for("the daemon", lambda: b'"ready"' in (root / "daemon.log").read_bytes())
        os.replace(root / "staging" / "keynote.mp3", inbox / "keynote.mp3")
        wait_for("the first file", (root / "talks" / "done" / "keynote.mp3").exists)
        for name in ("standup.mp3", "interview.mp3", "lecture.mp3"):
            os.replace(root / "staging" / name, inbox / name)
        wait_for("a transcription", lambda: transcribing(env))
        status = traxd(env, "status")
        return status, watch_frame(env)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)


def transcribing(env: dict[str, str]) -> bool:
    text = traxd(env, "status", "--json")
    data: dict[str, Any] = json.loads(text) if text else {}
    running = [job for inbox in data.get("inboxes", []) for job in inbox["running"]]
    return any(job["step"] == "transcribe" for job in running)


def watch_frame(env: dict[str, str]) -> str:
    """What `traxd status --watch` shows when Ctrl-C ends it after a second."""
    watch = subprocess.Popen([sys.executable, "-m", "traxd", "status", "--watch"],
                             stdout=subprocess.PIPE, text=True, env=env)
    time.sleep(1.5)
    watch.send_signal(signal.SIGINT)
    out, _ = watch.communicate(timeout=30)
    return out


def batch_screen(root: Path, env: dict[str, str]) -> str:
    speak(root / "talks", ["standup.mp3", "interview.mp3", "lecture.mp3"])
    return traxd(env, "batch", "talks", cwd=root)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="traxd-", dir="/tmp") as name:
        root = Path(name)
        env = {k: v for k, v in os.environ.items() if k != "TRAXD_CONFIG"}
        env.update(COLUMNS=WIDTH, XDG_RUNTIME_DIR=str(root / "run"),
                   XDG_CONFIG_HOME=str(root / "config"))
        (root / "daemon").mkdir()
        status, watch = status_screens(root / "daemon", env)
        (root / "batch").mkdir()
        batch = batch_screen(root / "batch", env)
        for title, text in (("traxd status", status), ("traxd status --watch", watch),
                            ("traxd batch talks", batch)):
            shown = text.replace(str(root / "batch"), "~")
            print(f"--- {title}\n" + "\n".join(line.rstrip() for line in shown.splitlines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
