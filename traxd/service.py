"""`traxd service install`: write and enable the systemd unit or the launchd agent.

The templates in traxd/templates/ are the one source of the unit and the plist; the
examples in the repository (systemd/, launchd/) are renderings of them with
EXAMPLE values, rewritten by ``python -m traxd.service --write-examples ROOT`` and
compared by a test. Templates use ``@NAME@`` placeholders; a line holding only a
placeholder whose value is empty is dropped.
"""

from __future__ import annotations

import argparse
import getpass
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

from rich.console import Console

from traxd.config import Settings, load_settings
from traxd.errors import ConfigError

UNIT_NAME = "traxd.service"
LABEL = "com.trax.traxd"
STOP_MARGIN = 15  # seconds TimeoutStopSec/ExitTimeOut allow beyond shutdown_grace
EXAMPLE_PYTHON = "/opt/traxd/venv/bin/python"
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
_NEEDS_QUOTES = re.compile(r"[\s\"'\\;]")

Runner = Callable[[Sequence[str]], int]


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    check: bool = True  # a failure stops the installation


@dataclass(frozen=True)
class Plan:
    """What an installation writes and runs."""

    files: tuple[tuple[Path, str], ...]
    commands: tuple[Command, ...]
    directories: tuple[Path, ...] = ()
    notes: tuple[str, ...] = ()


# --- rendering ---------------------------------------------------------------------------


def render(template: str, values: Mapping[str, str]) -> str:
    """The template traxd/templates/<template> with its @NAME@ placeholders filled."""
    text = resources.files("traxd").joinpath("templates", template).read_text(encoding="utf-8")

    def fill(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise KeyError(f"{template} needs a value for @{match.group(1)}@")
        return values[match.group(1)]

    lines = []
    for line in text.splitlines(keepends=True):
        rendered = _PLACEHOLDER.sub(fill, line)
        if rendered.strip() or not line.strip():
            lines.append(rendered)
    return "".join(lines)


def systemd_word(word: str, *, specifiers: bool = False) -> str:
    """One argument for ExecStart=: quoted when needed, '%' and '$' escaped."""
    text = word.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$")
    if not specifiers:
        text = text.replace("%", "%%")
    return f'"{text}"' if not word or _NEEDS_QUOTES.search(word) else text


def exec_start(python: str, config: str, *, specifiers: bool = False) -> str:
    words = [systemd_word(python), "-m", "traxd", "run", "--config",
             systemd_word(config, specifiers=specifiers)]
    return " ".join(words)


def read_write_paths(paths: Sequence[Path]) -> str:
    """ReadWritePaths= value; '-' lets the unit start while a path is missing."""
    words = []
    for path in paths:
        word = "-" + str(path).replace("%", "%%")
        words.append(f'"{word}"' if _NEEDS_QUOTES.search(word) else word)
    return " ".join(words)


def unit_values(settings: Settings, python: str, config: Path, *, user: bool) -> dict[str, str]:
    """Values of traxd.service.in for one installation."""
    return {
        "DESCRIPTION": "traxd media transcription daemon",
        "EXEC_START": exec_start(python, str(config)),
        "USER": "" if user else _system_user(),
        "TIMEOUT_STOP_SEC": str(stop_timeout(settings)),
        "STATE_DIRECTORY": "traxd",
        "READ_WRITE_PATHS": read_write_paths(writable_paths(settings)),
        "WANTED_BY": "default.target" if user else "multi-user.target",
    }


def plist_values(settings: Settings, python: str, config: Path, home: Path) -> dict[str, str]:
    return {
        "PYTHON": xml_escape(python),
        "CONFIG": xml_escape(str(config)),
        "TIMEOUT_STOP_SEC": str(stop_timeout(settings)),
        "LOG_DIR": xml_escape(str(home / "Library" / "Logs" / "traxd")),
    }


def stop_timeout(settings: Settings) -> int:
    """Seconds the service manager waits after SIGTERM: the grace period plus a margin."""
    return math.ceil(settings.daemon.shutdown_grace) + STOP_MARGIN


def writable_paths(settings: Settings) -> list[Path]:
    """The folders traxd writes: each inbox's parent (holding its siblings), state_dir."""
    wanted = {inbox.path.parent.resolve() for inbox in settings.inboxes}
    wanted.add(settings.daemon.state_dir.resolve())
    if settings.download.archive is not None:
        wanted.add(settings.download.archive.parent.resolve())
    ordered = sorted(wanted)
    return [p for p in ordered if not any(p != q and p.is_relative_to(q) for q in ordered)]


def _system_user() -> str:
    name = os.environ.get("SUDO_USER") or getpass.getuser()
    return "" if name == "root" else f"User={name}"


# --- examples in the repository ----------------------------------------------------------


def example_files() -> dict[str, str]:
    """systemd/ and launchd/ files of the repository, keyed by their relative path."""
    defaults = Settings()
    system = {
        "DESCRIPTION": "traxd media transcription daemon",
        "EXEC_START": exec_start(EXAMPLE_PYTHON, "/etc/traxd/traxd.toml"),
        "USER": "User=traxd",
        "TIMEOUT_STOP_SEC": str(stop_timeout(defaults)),
        "STATE_DIRECTORY": "traxd",
        "READ_WRITE_PATHS": "-/srv/traxd",
        "WANTED_BY": "multi-user.target",
    }
    instance = {**system, "DESCRIPTION": "traxd media transcription daemon (%i)",
                "EXEC_START": exec_start(EXAMPLE_PYTHON, "/etc/traxd/%i.toml", specifiers=True),
                "STATE_DIRECTORY": "traxd/%i", "READ_WRITE_PATHS": "-/srv/traxd/%i"}
    home = Path("/Users/you")
    mac = plist_values(defaults, EXAMPLE_PYTHON,
                       home / "Library/Application Support/traxd/traxd.toml", home)
    return {
        "systemd/traxd.service": render("traxd.service.in", system),
        "systemd/traxd@.service": render("traxd.service.in", instance),
        "launchd/com.trax.traxd.plist": render("com.trax.traxd.plist.in", mac),
    }


def write_examples(root: Path) -> list[Path]:
    written = []
    for relative, text in example_files().items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        written.append(target)
    return written


# --- planning ----------------------------------------------------------------------------


def plan_install(config: Path, *, user: bool, platform: str | None = None,
                 python: str | None = None, home: Path | None = None) -> Plan:
    """What installing the service for `config` means on `platform` (default: this one)."""
    config = config.expanduser().resolve()
    settings = load_settings(config)
    platform, python, home = platform or sys.platform, python or sys.executable, home or Path.home()
    if platform.startswith("linux"):
        return _systemd_plan(settings, config, python, user=user, home=home)
    if platform == "darwin":
        return _launchd_plan(settings, config, python, home)
    raise ValueError(f"`traxd service install` knows systemd (Linux) and launchd (macOS), "
                     f"not {platform}; run `traxd run --config {config}` from your own "
                     "service manager")


def _systemd_plan(settings: Settings, config: Path, python: str, *, user: bool,
                  home: Path) -> Plan:
    unit_dir = _unit_dir(user, home)
    values = unit_values(settings, python, config, user=user)
    unit = render("traxd.service.in", values)
    systemctl = ("systemctl", "--user") if user else ("systemctl",)
    scope = " --user" if user else ""
    notes = [f"logs: journalctl{scope} -u traxd -f",
             f"after changing the unit while traxd runs: systemctl{scope} restart traxd"]
    if user:
        notes.append("to keep traxd running after you log out: loginctl enable-linger")
    elif not values["USER"]:
        notes.insert(0, "warning: this unit runs traxd as root (installed as root, not "
                     "through sudo); better, a user of its own: `useradd --system "
                     "--create-home --home-dir /var/lib/traxd traxd`, give it the inbox "
                     "folders, and add User=traxd under [Service]")
    missing = [str(p) for p in writable_paths(settings) if not p.exists()]
    if missing:
        notes.append("create these before starting (the unit cannot create them): "
                     + ", ".join(missing))
    return Plan(files=((unit_dir / UNIT_NAME, unit),),
                commands=(Command((*systemctl, "daemon-reload")),
                          Command((*systemctl, "enable", "--now", UNIT_NAME))),
                notes=tuple(notes))


def _launchd_plan(settings: Settings, config: Path, python: str, home: Path) -> Plan:
    plist = home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    text = render("com.trax.traxd.plist.in", plist_values(settings, python, config, home))
    domain = f"gui/{os.getuid()}"
    return Plan(files=((plist, text),),
                commands=(Command(("launchctl", "bootout", f"{domain}/{LABEL}"), check=False),
                          Command(("launchctl", "enable", f"{domain}/{LABEL}"), check=False),
                          Command(("launchctl", "bootstrap", domain, str(plist)))),
                directories=(home / "Library" / "Logs" / "traxd",),
                notes=(f"logs: {home}/Library/Logs/traxd/traxd.log",
                       f"stop: launchctl bootout {domain}/{LABEL}"))


# --- installing --------------------------------------------------------------------------


def install(config: Path, user: bool, console: Console, dry_run: bool = False,
            runner: Runner | None = None) -> int:
    """Write the unit or agent and enable it; with `dry_run`, only show what would happen."""
    try:
        plan = plan_install(config, user=user)
    except (ConfigError, ValueError) as exc:
        console.print(f"[red]traxd service install:[/red] {exc}", highlight=False)
        return 1
    if dry_run:
        show_plan(plan, console)
        return 0
    try:
        apply_files(plan)
    except PermissionError as exc:
        console.print(f"[red]cannot write {exc.filename}[/red]: run with sudo, or install "
                      "for your own user with --user", highlight=False)
        return 1
    return run_commands(plan, console, runner or _run)


def show_plan(plan: Plan, console: Console) -> None:
    """What install would do; the file texts as they are, never wrapped, so that a copy works."""
    def say(text: str, end: str = "\n") -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True, end=end)

    for path, text in plan.files:
        console.rule(f"would write {path}")
        say(text, end="")
    console.rule()
    for directory in plan.directories:
        say(f"would create {directory}")
    for command in plan.commands:
        say(f"would run: {shlex.join(command.argv)}")
    for note in plan.notes:
        say(f"note: {note}")


def apply_files(plan: Plan) -> None:
    for directory in plan.directories:
        directory.mkdir(parents=True, exist_ok=True)
    for path, text in plan.files:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.chmod(0o644)
        os.replace(temporary, path)


def run_commands(plan: Plan, console: Console, runner: Runner) -> int:
    for path, _ in plan.files:
        console.print(f"wrote {path}", markup=False, highlight=False)
    for command in plan.commands:
        code = runner(command.argv)
        if code != 0 and command.check:
            console.print(f"[red]failed ({code}):[/red] {shlex.join(command.argv)}",
                          highlight=False)
            return code
    for note in plan.notes:
        console.print(note, markup=False, highlight=False)
    return 0


def _run(argv: Sequence[str]) -> int:
    try:
        return subprocess.run(list(argv), check=False).returncode
    except FileNotFoundError:
        return 127


# --- uninstalling and status ---------------------------------------------------------------


def systemd_running() -> bool:
    """Whether systemd is this machine's service manager (as sd_booted(3) decides)."""
    return Path("/run/systemd/system").is_dir()


def no_service_manager(platform: str | None = None) -> str | None:
    """One line saying why `traxd service` cannot work here; None when it can."""
    platform = platform or sys.platform
    if platform.startswith("linux") and not systemd_running():
        return ("systemd is not running on this machine (no /run/systemd/system): start "
                "`traxd run --config FILE` from the service manager it has")
    return None


def installed_file(*, user: bool, platform: str | None = None, home: Path | None = None) -> Path:
    """Where install writes the unit or agent."""
    platform, home = platform or sys.platform, home or Path.home()
    if platform == "darwin":
        return home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    if not platform.startswith("linux"):
        raise ValueError(f"`traxd service` knows systemd (Linux) and launchd (macOS), "
                         f"not {platform}")
    return _unit_dir(user, home) / UNIT_NAME


def _unit_dir(user: bool, home: Path) -> Path:
    if user:
        return Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "systemd/user"
    return Path("/etc/systemd/system")


def uninstall(*, user: bool, console: Console, dry_run: bool = False,
              runner: Runner | None = None, platform: str | None = None) -> int:
    """Stop and disable the service, then remove its unit or agent."""
    platform = platform or sys.platform
    target = installed_file(user=user, platform=platform)
    if platform == "darwin":
        stop, reload = ("launchctl", "bootout", f"gui/{os.getuid()}/{LABEL}"), None
    else:
        systemctl = ("systemctl", "--user") if user else ("systemctl",)
        stop, reload = (*systemctl, "disable", "--now", UNIT_NAME), (*systemctl, "daemon-reload")
    if not target.exists():
        console.print(f"traxd service: nothing to uninstall ({target} does not exist)",
                      markup=False, highlight=False, soft_wrap=True)
        return 0
    if dry_run:
        for line in (f"would run: {shlex.join(stop)}", f"would remove {target}",
                     *([f"would run: {shlex.join(reload)}"] if reload else [])):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        return 0
    run = runner or _run
    run(stop)  # an agent or unit that is not loaded is no reason to keep its file
    target.unlink()
    console.print(f"removed {target}", markup=False, highlight=False, soft_wrap=True)
    return run(reload) if reload else 0


def status(*, user: bool, runner: Runner | None = None, platform: str | None = None) -> int:
    """The service manager's own view of the service (state, recent log lines)."""
    platform = platform or sys.platform
    if platform == "darwin":
        argv: tuple[str, ...] = ("launchctl", "print", f"gui/{os.getuid()}/{LABEL}")
    else:
        systemctl = ("systemctl", "--user") if user else ("systemctl",)
        argv = (*systemctl, "status", "--no-pager", UNIT_NAME)
    return (runner or _run)(argv)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m traxd.service",
                                     description="Render the repository's example units.")
    parser.add_argument("--write-examples", type=Path, metavar="ROOT", required=True,
                        help="repository root whose systemd/ and launchd/ files to rewrite")
    args = parser.parse_args(argv)
    for path in write_examples(args.write_examples):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
