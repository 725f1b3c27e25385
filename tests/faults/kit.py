"""Shared helpers of the fault-injection suite: the tally, inbox layouts, the journal read
from outside, kill-phase classification and the exactly-once invariants."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.helpers import DaemonProcess, files_under, wait_until
from traxd.folders import sidecar_path

# --- the tally printed at the end of the run ---------------------------------------------


@dataclass
class Tally:
    """What the fault tests tried and found; the tests assert, the summary reports."""

    kills: Counter[str] = field(default_factory=Counter)  # phase -> SIGKILLs landed there
    # phase -> SIGKILLs that caught several jobs in it at once (a batched claim or finish)
    batched: Counter[str] = field(default_factory=Counter)
    bad_inputs: list[str] = field(default_factory=list)
    operator_mistakes: list[str] = field(default_factory=list)
    secret_shapes: list[str] = field(default_factory=list)  # secrets looked for in artefacts
    leaks: int = 0  # secrets found where they must not be
    files_dropped: int = 0
    files_lost: int = 0
    processed_twice: int = 0
    daemon_crashes: int = 0
    orphans_waited: int = 0  # step processes still running after their daemon was SIGKILLed
    constructed: list[str] = field(default_factory=list)  # crash states built, not SIGKILLed
    seeds: list[int] = field(default_factory=list)
    ran: bool = False

    def lines(self) -> list[str]:
        by_phase = ", ".join(f"{phase} {n}" for phase, n in sorted(self.kills.items()))
        return [
            f"kill points tried: {sum(self.kills.values())} ({by_phase or 'none'})"
            + (f"; seed {', '.join(map(str, self.seeds))}" if self.seeds else ""),
            "kills inside a batch (several jobs in one phase): "
            + (", ".join(f"{phase} {n}" for phase, n in sorted(self.batched.items())) or "none"),
            f"crash states constructed: {len(self.constructed)}"
            + (f" ({', '.join(self.constructed)})" if self.constructed else ""),
            f"bad inputs tried: {len(self.bad_inputs)}"
            + (f" ({', '.join(self.bad_inputs)})" if self.bad_inputs else ""),
            f"operator mistakes tried: {len(self.operator_mistakes)}"
            + (f" ({', '.join(self.operator_mistakes)})" if self.operator_mistakes else ""),
            f"secret shapes looked for: {len(self.secret_shapes)}"
            + (f" ({', '.join(self.secret_shapes)})" if self.secret_shapes else ""),
            f"files dropped: {self.files_dropped}",
            f"files lost: {self.files_lost}",
            f"files processed twice: {self.processed_twice}",
            f"daemon crashes: {self.daemon_crashes}",
            f"secrets leaked: {self.leaks}",
            f"step processes orphaned by SIGKILL (waited for): {self.orphans_waited}",
        ]


TALLY = Tally()


# --- inbox layouts ------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """An inbox and its siblings, as the tests see them."""

    root: Path

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def processing(self) -> Path:
        return self.root / "processing"

    @property
    def done(self) -> Path:
        return self.root / "done"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def failed(self) -> Path:
        return self.root / "failed"

    def make(self) -> Box:
        self.inbox.mkdir(parents=True, exist_ok=True)
        return self

    def failed_originals(self) -> list[str]:
        return [f for f in files_under(self.failed) if not f.endswith(".error.json")]

    def error_path(self, name: str) -> Path:
        """failed/<name>.error.json (shortened by traxd when that is too long a name)."""
        return sidecar_path(self.failed / name)

    def error_of(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.error_path(name).read_text())
        return data

    def has_error(self, name: str) -> bool:
        return self.error_path(name).is_file()


# --- a command step with several outputs ---------------------------------------------------

# Like tests.helpers.COPY_SCRIPT, but writes the copy under several names, so that publishing
# (one atomic copy per output) takes long enough for kills to land in it.
MULTI_COPY_SCRIPT = (
    "import os, shutil, sys, time\n"
    "src, out, stem, ledger, delay = sys.argv[1:6]\n"
    "time.sleep(float(delay))\n"
    "if open(src, 'rb').read(4) == b'FAIL':\n"
    "    sys.exit('refusing to copy ' + os.path.basename(src))\n"
    "for ext in sys.argv[6:]:\n"
    "    shutil.copyfile(src, os.path.join(out, stem + '.' + ext))\n"
    "with open(ledger, 'a') as f:\n"
    "    f.write(os.path.basename(src) + '\\n')\n"
)
OUTPUT_EXTS = ("txt", "srt", "vtt", "json")


def multi_copy_step(ledger: Path, delay: float = 0.0) -> list[str]:
    return [sys.executable, "-c", MULTI_COPY_SCRIPT, "{input}", "{output_dir}", "{stem}",
            str(ledger), str(delay), *OUTPUT_EXTS]


def outputs_of(name: str, exts: tuple[str, ...] = ("txt",)) -> set[str]:
    return {str(Path(name).with_suffix("." + ext)) for ext in exts}


# --- the journal, read from outside -------------------------------------------------------


def read_jobs(state_dir: Path) -> list[dict[str, Any]]:
    """Every row of the journal, read-only (WAL included), as dicts."""
    path = state_dir / "journal.sqlite3"
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute("SELECT * FROM jobs ORDER BY id")]
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


def job_of(state_dir: Path, rel_path: str) -> dict[str, Any] | None:
    rows = [r for r in read_jobs(state_dir) if r["rel_path"] == rel_path]
    return rows[-1] if rows else None


TERMINAL = ("done", "failed", "duplicate")

# Ordered from the most to the least delicate: a kill is counted once, in the first phase
# any of its in-flight jobs was in.
PHASES = ("move", "publish/write", "claim", "step", "intake", "idle")


def job_phase(job: dict[str, Any], steps: int, box: Box) -> str | None:
    """The phase one job was in when the daemon died, from the journal and the disk."""
    state = job["state"]
    if state in TERMINAL or state == "waiting":
        return None
    if job["final_path"] is not None:
        return "move"  # destination written down, the original not (yet) recorded as moved
    if job["claimed_path"] is not None and os.path.lexists(box.inbox / job["rel_path"]):
        return "claim"  # processing/ path written down, the rename not done
    if state == "running":
        if job["step"] >= steps or job["outputs"] is not None:
            return "publish/write"
        return "step"
    if job["claimed_path"] is None:
        return "intake"  # seen or queued, still in the inbox
    return None  # claimed earlier and put back in the queue: not touched by this daemon


def classify_kill(state_dir: Path, box: Box, steps: int) -> tuple[str, Counter[str]]:
    """The phase a kill landed in, and how many jobs were in each phase then."""
    phases = Counter(p for job in read_jobs(state_dir) if (p := job_phase(job, steps, box)))
    if any(p.name.endswith(".traxd-tmp") for p in box.root.rglob("*")):
        phases["publish/write"] += 1
    return next(p for p in PHASES if p in phases or p == "idle"), phases


# --- daemons ------------------------------------------------------------------------------


class FaultDaemon(DaemonProcess):
    """A DaemonProcess that can also be started without waiting, to kill it during start-up."""

    def start(self) -> FaultDaemon:
        super().start()
        return self

    def spawn(self) -> FaultDaemon:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "traxd", "run", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})})
        return self

    def is_ready(self) -> bool:
        return '"ready"' in self.log_text()

    def ready_or_dead(self) -> bool:
        return self.is_ready() or not self.alive()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def events(self) -> list[dict[str, Any]]:
        return log_events(self.log)


def log_events(log: Path) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    if not log.exists():
        return events
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


def processes_mentioning(marker: str) -> list[psutil.Process]:
    """Live processes whose command line contains marker (step processes of a test)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if any(marker in arg for arg in cmdline) and proc.pid != os.getpid():
            found.append(proc)
    return found


def wait_for_orphans(marker: str, timeout: float = 20.0) -> int:
    """Wait until the step processes of a SIGKILLed daemon have ended; returns how many."""
    orphans = processes_mentioning(marker)
    if orphans:
        wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                   for p in orphans), timeout, message="orphaned steps to end")
    return len(orphans)


# --- exactly once -------------------------------------------------------------------------


@dataclass
class Verdict:
    lost: list[str]
    twice: list[str]
    problems: list[str]


def check_exactly_once(box: Box, state_dir: Path, good: dict[str, bytes], bad: set[str],
                       exts: tuple[str, ...] = ("txt",)) -> Verdict:
    """Every good file once in done/ with one output, every bad one once in failed/ with
    its sidecar; nothing left in the inbox, processing/ or the work folder; no temporaries."""
    done, failed = files_under(box.done), box.failed_originals()
    outputs = files_under(box.outputs)
    expected_outputs = {o for n in good for o in outputs_of(n, exts)}
    lost = sorted(n for n in good if n not in done or not outputs_of(n, exts) <= set(outputs))
    lost += sorted(n for n in bad if n not in failed)
    twice = sorted({o for o in outputs if o not in expected_outputs})
    problems: list[str] = []
    if unexpected := sorted(set(done) - set(good)) + sorted(set(failed) - bad):
        problems.append(f"in the wrong folder or unknown: {unexpected}")
    for name, content in good.items():
        for out in outputs_of(name, exts):
            if (box.outputs / out).exists() and (box.outputs / out).read_bytes() != content:
                problems.append(f"output {out} differs from its input")
    sidecars = {f.removesuffix(".error.json") for f in files_under(box.failed)
                if f.endswith(".error.json")}
    if sidecars != bad:
        problems.append(f"error sidecars {sorted(sidecars ^ bad)[:10]} do not match the "
                        "files failed by design")
    if left := files_under(box.inbox) + files_under(box.processing):
        problems.append(f"left in inbox/processing: {left[:10]}")
    if temporaries := [str(p) for p in box.root.rglob("*") if p.name.endswith(".traxd-tmp")]:
        problems.append(f"temporaries left: {temporaries[:10]}")
    work = state_dir / "work"
    if work.exists() and (leftover := list(work.iterdir())):
        problems.append(f"state_dir/work not empty: {leftover[:10]}")
    rows = Counter(r["rel_path"] for r in read_jobs(state_dir) if r["state"] != "duplicate")
    if several := sorted(n for n, count in rows.items() if count > 1):
        problems.append(f"more than one journal row: {several[:10]}")
    return Verdict(lost, twice, problems)


def wait_all_settled(box: Box, expected: int, timeout: float) -> None:
    wait_until(lambda: len(files_under(box.done)) + len(box.failed_originals()) >= expected
               and not files_under(box.inbox) and not files_under(box.processing),
               timeout, interval=0.1, message=f"{expected} files settled")


# --- media --------------------------------------------------------------------------------


def make_media(folder: Path) -> dict[str, Path]:
    """Real media from espeak-ng speech: wav, mp3, m4a, and two seconds of silence."""
    folder.mkdir(parents=True, exist_ok=True)
    speech = folder / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(speech),
                    "Hello there, this is a short test of the transcription daemon."],
                   check=True, capture_output=True, timeout=60)
    made = {"wav": speech}
    for suffix, codec in (("mp3", ["-b:a", "32k"]), ("m4a", ["-c:a", "aac"])):
        made[suffix] = folder / f"speech.{suffix}"
        ffmpeg("-i", str(speech), "-ar", "16000", "-ac", "1", *codec, str(made[suffix]))
    made["silence"] = folder / "silence.wav"
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "2", str(made["silence"]))
    return made


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True,
                   capture_output=True, timeout=60)
