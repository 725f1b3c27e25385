"""`traxd doctor`: check what traxd needs from this machine, before it bites at 3 a.m.

Each check gives ok, warn (works, but read this) or fail (traxd will not work as
configured). Secrets are never shown: an API key is reported as set or not set.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from traxd.config import InboxSettings, Settings
from traxd.errors import BackendFatal, ControlRejected, ControlUnavailable
from traxd.keys import KeyNeed, key_state, needed_keys

Level = Literal["ok", "warn", "fail"]
GIB = 1 << 30
DISK_FAIL_BYTES = 1 * GIB
DISK_WARN_BYTES = 5 * GIB
INOTIFY = Path("/proc/sys/fs/inotify")
_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}
_MEDIA_STEPS = frozenset({"download", "preprocess", "transcribe", "mux"})


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str


def run_doctor(settings: Settings | None, console: Console,
               daemon: DaemonKeys | None = None) -> int:
    """Run every check, print a table (and with `daemon`, its keys beside this shell's);
    1 when any check failed or the running daemon lacks a key it needs."""
    checks = collect_checks(settings)
    rows = key_rows(daemon) if daemon is not None else []
    checks = with_daemon_view(checks, rows)
    console.print(checks_table(checks))
    if daemon is not None and rows:
        console.print(keys_table(daemon, rows))
    elif daemon is not None:
        needs = "needs no API key" if daemon.reached else ""
        console.print(f"running daemon: {daemon.about}{'; ' + needs if needs else ''}",
                      markup=False, highlight=False, style="dim")
    failed = [c for c in checks if c.level == "fail"]
    warned = [c for c in checks if c.level == "warn"]
    lacking = [r for r in rows if r.daemon_lacks]
    summary = f"{len(checks)} checks: {len(failed)} failed, {len(warned)} warnings"
    if lacking:
        summary += (f"; the running daemon lacks {len(lacking)} API key"
                    f"{'s' if len(lacking) > 1 else ''} (it does not see this shell's "
                    "environment)")
    console.print(summary, style="bold red" if failed or lacking else "green", highlight=False)
    return 1 if failed or lacking else 0


def collect_checks(settings: Settings | None) -> list[Check]:
    if settings is None:
        return [*check_ffmpeg(required=False), *check_models(Settings(), required=False),
                Check("config", "fail", "no valid configuration (see the error above)")]
    checks: list[Check] = [*check_ffmpeg(required=_uses_any(settings, _MEDIA_STEPS))]
    per_settings: Sequence[Callable[[Settings], Iterable[Check]]] = (
        check_models, check_api_keys, check_folders, check_disk, check_inotify,
        check_filesystems, check_privacy)
    for check in per_settings:
        checks.extend(check(settings))
    return checks


def checks_table(checks: Sequence[Check]) -> Table:
    table = Table(title="traxd doctor", title_justify="left")
    table.add_column("Check")
    table.add_column("Status")
    table.add_column("Detail", overflow="fold")
    for check in checks:
        table.add_row(check.name, f"[{_STYLE[check.level]}]{check.level}[/]", check.detail)
    return table


def _uses_any(settings: Settings, steps: Iterable[str]) -> bool:
    wanted = set(steps)
    return any(step in wanted for inbox in settings.inboxes for step in inbox.pipeline
               if isinstance(step, str))


# --- ffmpeg ------------------------------------------------------------------------------


def check_ffmpeg(*, required: bool = True) -> list[Check]:
    from traxd.pipeline.ffmpeg import find_tools

    try:
        tools = find_tools()
    except BackendFatal as exc:
        return [Check("ffmpeg", "fail" if required else "warn", exc.message)]
    version = program_version(tools.ffmpeg)
    source = "system" if shutil.which("ffmpeg") == tools.ffmpeg else "imageio-ffmpeg fallback"
    checks = [Check("ffmpeg", "ok", f"{version} ({source}: {tools.ffmpeg})") if version
              else Check("ffmpeg", "fail" if required else "warn",
                         f"{tools.ffmpeg} does not run (`-version` failed)")]
    if tools.ffprobe:
        checks.append(Check("ffprobe", "ok", tools.ffprobe))
    else:
        checks.append(Check("ffprobe", "warn", "not found: media is probed through ffmpeg"))
    return checks


def program_version(binary: str) -> str | None:
    """The first line of `binary -version`, or None when it does not run."""
    try:
        done = subprocess.run([binary, "-version"], capture_output=True, text=True,
                              timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


# --- models and keys ---------------------------------------------------------------------


def check_models(settings: Settings, *, required: bool = True) -> list[Check]:
    if required and not _uses_any(settings, {"transcribe"}):
        return []
    spec = settings.transcribe
    if spec.backend == "openai":
        return [Check("model", "ok", f"{spec.model} on {spec.base_url or 'api.openai.com'}")]
    failing: Level = "fail" if required else "warn"
    if importlib.util.find_spec("faster_whisper") is None:
        return [Check("faster-whisper", failing, "not installed: pip install 'traxd[local]'")]
    checks = [Check("faster-whisper", "ok", "installed")]
    return [*checks, _local_model(spec.model, failing)]


def _local_model(name: str, failing: Level) -> Check:
    from traxd.pipeline.whisper_pool import model_path

    try:
        where = model_path(name)
    except BackendFatal as exc:
        return Check(f"model {name}", failing, exc.message)
    if not where.startswith("/"):
        return Check(f"model {name}", "warn",
                     "downloaded from Hugging Face on first use unless cached (needs network)")
    if (Path(where) / "model.bin").is_file():
        return Check(f"model {name}", "ok", where)
    return Check(f"model {name}", failing, f"no model.bin in {where}")


def check_api_keys(settings: Settings) -> list[Check]:
    """An API key for each remote backend in use; only whether it is set is shown."""
    return [_key_check(need) for need in needed_keys(settings)]


def _key_check(need: KeyNeed) -> Check:
    state = key_state(need)
    if need.file is not None:
        name = f"API key file {need.file}"
        if state.present:
            return Check(name, "ok", f"holds a key (for {need.use})")
        if state.problem == "empty":
            return Check(name, "fail", f"empty: put the key for {need.use} in it")
        return Check(name, "fail", f"{state.problem}: {need.use} needs the key there; the "
                                   "backend would be paused until it is, then `traxd resume`")
    name = f"API key {need.env}"
    if state.present:
        return Check(name, "ok", f"set (for {need.use})")
    if need.local:
        return Check(name, "warn", f"not set; {need.base_url} is local and may not need one")
    return Check(name, "fail", f"not set: {need.use} needs it (export {need.env}=…, or put it "
                               "in the service's environment file); the backend would be paused")


# --- what the running daemon sees --------------------------------------------------------


@dataclass(frozen=True)
class DaemonKeys:
    """The running daemon's answer to `keys`, or why there is none."""

    about: str  # "pid 1234, config /srv/traxd.toml", or why no daemon was asked
    keys: tuple[Mapping[str, Any], ...] = ()
    reached: bool = False


@dataclass(frozen=True)
class KeyRow:
    """One key as this shell and the running daemon see it."""

    label: str
    shell: str
    daemon: str
    daemon_has: bool
    local: bool  # the server is on this machine and may need no key
    need: KeyNeed

    @property
    def daemon_lacks(self) -> bool:
        """The daemon has no key for a remote server: its backend pauses."""
        return not self.daemon_has and not self.local


def ask_daemon(config: Path | None, settings: Settings | None) -> DaemonKeys:
    """Ask the daemon running for this user (the one of `config` when it is named, as
    `traxd status` finds it) what it sees of its keys."""
    from traxd.control import SOCKET_NAME, request, running_daemons

    named = config is not None or bool(os.environ.get("TRAXD_CONFIG"))
    daemons = [] if named else running_daemons()
    mine = settings.source.resolve() if settings and settings.source else None
    if named or not daemons:
        if settings is None:
            return DaemonKeys("none found (no valid configuration to look for it by)")
        socket, about = settings.daemon.state_dir / SOCKET_NAME, "config " + str(mine or "")
    else:
        chosen = [d for d in daemons if mine and d.config == str(mine)] or daemons
        if len(chosen) > 1:
            return DaemonKeys(f"{len(chosen)} daemons are running: name one's config with "
                              "--config to compare its keys")
        socket, about = chosen[0].socket, f"pid {chosen[0].pid}, config {chosen[0].config}"
    try:
        answer = request(socket, "keys", timeout=5.0)
    except (ControlUnavailable, ControlRejected) as exc:
        return DaemonKeys(f"not asked: {exc}")
    keys = tuple(k for k in answer.get("keys") or () if isinstance(k, Mapping))
    if "pid" in answer and about.startswith("config"):
        about = f"pid {answer['pid']}, {about}"
    return DaemonKeys(about, keys, reached=True)


def key_rows(daemon: DaemonKeys) -> list[KeyRow]:
    """Each key the daemon needs, as it sees it and as this shell does."""
    rows = []
    for key in daemon.keys:
        where = str(key.get("where", ""))
        is_file = key.get("source") == "file"
        need = KeyNeed(str(key.get("use", "?")), str(key.get("backend", "?")),
                       "" if is_file else where, Path(where) if is_file else None, None)
        shell = key_state(need)
        present, local = bool(key.get("present")), bool(key.get("local"))
        seen = "key set" if present else f"no key ({key.get('problem') or 'not set'})"
        if not present and key.get("fix"):
            seen += f" -> {key['fix']}"
        if key.get("paused"):
            seen += "; the backend is paused"
        label = f"{need.use}: {'file ' if is_file else ''}{where}"
        rows.append(KeyRow(label, "key set" if shell.present else f"no key ({shell.problem})",
                           seen, present, local, need))
    return rows


def keys_table(daemon: DaemonKeys, rows: Sequence[KeyRow]) -> Table:
    table = Table(title=f"API keys: this shell and the running daemon ({daemon.about})",
                  title_justify="left")
    table.add_column("Key", overflow="fold")
    table.add_column("This shell", overflow="fold")
    table.add_column("Running daemon", overflow="fold")
    for row in rows:
        table.add_row(row.label, row.shell,
                      f"[{_STYLE['fail']}]{escape(row.daemon)}[/]" if row.daemon_lacks
                      else escape(row.daemon))
    return table


def with_daemon_view(checks: Sequence[Check], rows: Sequence[KeyRow]) -> list[Check]:
    """A key this shell lacks but the running daemon has is only a warning."""
    has = {f"API key {r.need.env}" for r in rows if r.need.file is None and r.daemon_has}
    return [Check(c.name, "warn", f"{c.detail} (the running daemon has it)")
            if c.level == "fail" and c.name in has else c for c in checks]


# --- folders and disks -------------------------------------------------------------------


def check_folders(settings: Settings) -> list[Check]:
    checks = [_inbox_folders(inbox, settings) for inbox in settings.inboxes]
    level, detail = folder_state(settings.daemon.state_dir)
    checks.append(Check("state_dir", level, f"{settings.daemon.state_dir}: {detail}"))
    return checks


def _inbox_folders(inbox: InboxSettings, settings: Settings) -> Check:
    names = dataclasses.asdict(settings.folders)
    folders = {"inbox": inbox.path} | {k: inbox.sibling(v) for k, v in names.items()}
    problems, created = [], []
    for label, path in folders.items():
        level, detail = folder_state(path)
        if level != "ok":
            problems.append(f"{label} {path}: {detail}")
        elif not path.exists():
            created.append(label)
    if problems:
        return Check(f"inbox {inbox.name}", "fail", "; ".join(problems))
    extra = f" ({', '.join(created)} will be created)" if created else ""
    return Check(f"inbox {inbox.name}", "ok", f"{inbox.path}: folders writable{extra}")


def folder_state(path: Path) -> tuple[Level, str]:
    """Whether traxd can use `path` as a folder: it is writable, or can be created."""
    if path.exists():
        if not path.is_dir():
            return "fail", "exists but is not a folder"
        if os.access(path, os.W_OK | os.X_OK):
            return "ok", "writable"
        return "fail", "not writable by this user"
    ancestor = existing_ancestor(path)
    if os.access(ancestor, os.W_OK | os.X_OK):
        return "ok", "missing; will be created"
    return "fail", f"missing, and {ancestor} is not writable to create it"


def existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")


def check_disk(settings: Settings) -> list[Check]:
    """Free space on each filesystem holding an inbox tree or the state directory."""
    places = [(f"inbox {i.name}", i.path) for i in settings.inboxes]
    places.append(("state_dir", settings.daemon.state_dir))
    by_device: dict[int, tuple[Path, list[str]]] = {}
    for label, path in places:
        existing = existing_ancestor(path)
        entry = by_device.setdefault(existing.stat().st_dev, (existing, []))
        entry[1].append(label)
    return [_disk_check(path, labels) for path, labels in by_device.values()]


def _disk_check(path: Path, labels: list[str]) -> Check:
    usage = shutil.disk_usage(path)
    detail = (f"{usage.free / GIB:.1f} GiB free of {usage.total / GIB:.1f} GiB at {path} "
              f"({', '.join(labels)})")
    level: Level = ("fail" if usage.free < DISK_FAIL_BYTES else
                    "warn" if usage.free < DISK_WARN_BYTES else "ok")
    return Check("disk space", level, detail)


# --- watching ----------------------------------------------------------------------------


def check_inotify(settings: Settings, root: Path = INOTIFY) -> list[Check]:
    """inotify limits against what the native watchers need (Linux only)."""
    if not sys.platform.startswith("linux"):
        return []
    from traxd.watcher import use_polling

    native = [i for i in settings.inboxes if not use_polling(i, _fstype(i.path))]
    try:
        watches = int((root / "max_user_watches").read_text())
        instances = int((root / "max_user_instances").read_text())
    except (OSError, ValueError) as exc:
        return [Check("inotify", "warn", f"cannot read the limits in {root}: {exc}")]
    directories = sum(count_directories(i.path, limit=watches + 1) for i in native)
    return [_limit_check("inotify watches", directories, watches, "directories to watch",
                         "fs.inotify.max_user_watches"),
            _limit_check("inotify instances", len(native), instances, "watched inboxes",
                         "fs.inotify.max_user_instances")]


def _limit_check(name: str, needed: int, limit: int, what: str, sysctl: str) -> Check:
    detail = f"{needed} {what}, limit {limit} (shared with other programs of this user)"
    raise_it = f"; raise it: sysctl -w {sysctl}={max(limit * 4, needed * 2)}"
    if needed > limit:
        return Check(name, "fail", detail + raise_it)
    if needed > limit // 2:
        return Check(name, "warn", detail + raise_it)
    return Check(name, "ok", detail)


def count_directories(path: Path, *, limit: int) -> int:
    """Directories under (and including) path, not following links; stops at `limit`."""
    if not path.is_dir():
        return 1
    count = 0
    for _, dirnames, _ in os.walk(path, followlinks=False):
        count += 1
        if count >= limit:
            break
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return count


def check_filesystems(settings: Settings) -> list[Check]:
    """Network and FUSE filesystems give no reliable change events: polling is used."""
    from traxd.watcher import needs_polling, use_polling

    checks = []
    for inbox in settings.inboxes:
        fstype = _fstype(inbox.path) or "unknown"
        polling = use_polling(inbox, fstype)
        if needs_polling(fstype) and not polling:
            checks.append(Check(f"watching {inbox.name}", "warn",
                                f"{fstype} with polling = \"never\": changes may go unseen "
                                "until the next reconcile scan"))
        elif needs_polling(fstype):
            checks.append(Check(f"watching {inbox.name}", "warn",
                                f"{fstype} is a network/FUSE filesystem: polling will be used"))
        else:
            mode = "polling (configured)" if polling else "native events"
            checks.append(Check(f"watching {inbox.name}", "ok", f"{fstype}: {mode}"))
    return checks


def _fstype(path: Path) -> str:
    from traxd.watcher import filesystem_type

    return filesystem_type(existing_ancestor(path))


def check_privacy(settings: Settings, *, platform: str | None = None,
                  home: Path | None = None) -> list[Check]:
    """macOS asks before a program reads ~/Documents, ~/Desktop, ~/Downloads, /Volumes."""
    if (platform or sys.platform) != "darwin":
        return []
    home = home or Path.home()
    guarded = [home / "Documents", home / "Desktop", home / "Downloads", Path("/Volumes")]
    checks = []
    for inbox in settings.inboxes:
        path = inbox.path.expanduser().absolute()
        inside = next((g for g in guarded if path.is_relative_to(g)), None)
        if inside is not None:
            checks.append(Check(f"privacy {inbox.name}", "warn",
                                f"{path} is under {inside}, which macOS protects: give Full "
                                f"Disk Access to {sys.executable} (System Settings > Privacy & "
                                "Security), or the service sees an empty folder"))
    return checks
