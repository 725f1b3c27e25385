"""API keys: which ones the configured backends need, whether a process has each, and
where a missing one goes. Only whether a key is there is ever told, never the key.

`traxd doctor` asks this of its own shell and, through the control socket (`keys`), of the
running daemon, whose environment may differ.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from traxd.config import EnhanceSettings, Settings, TranscribeSettings

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
LAUNCHD_LABEL = "com.trax.traxd"
Manager = Literal["systemd-user", "systemd-system", "launchd", "none"]


@dataclass(frozen=True)
class KeyNeed:
    """One key a step of the configured pipelines needs."""

    use: str  # the step: "transcribe" or "enhance"
    backend: str  # what a missing key pauses: "openai", "enhance"
    env: str  # the variable it is read from, unless `file` is named
    file: Path | None
    base_url: str | None

    @property
    def source(self) -> Literal["env", "file"]:
        return "file" if self.file is not None else "env"

    @property
    def where(self) -> str:
        """The variable's name or the file's path."""
        return str(self.file) if self.file is not None else self.env

    @property
    def local(self) -> bool:
        """A server on this machine, which may need no key."""
        return bool(self.base_url) and urlparse(self.base_url).hostname in LOOPBACK


@dataclass(frozen=True)
class KeyState:
    present: bool
    problem: str = ""  # why not: "not set", "empty", "cannot read it (...)"


def needed_keys(settings: Settings) -> list[KeyNeed]:
    """Each distinct key the inboxes' pipelines need (their own sections included)."""
    found: dict[tuple[str, str, Path | None, str | None], KeyNeed] = {}
    for inbox in settings.inboxes:
        steps = {s for s in inbox.pipeline if isinstance(s, str)}
        own = settings.for_inbox(inbox.name)
        sections: list[tuple[str, str, TranscribeSettings | EnhanceSettings]] = []
        if "transcribe" in steps and own.transcribe.backend == "openai":
            sections.append(("transcribe", "openai", own.transcribe))
        if "enhance" in steps:
            sections.append(("enhance", "enhance", own.enhance))
        for use, backend, section in sections:
            need = KeyNeed(use, backend, section.api_key_env, section.api_key_file,
                           section.base_url)
            found.setdefault((use, need.env, need.file, need.base_url), need)
    return list(found.values())


def key_state(need: KeyNeed, environ: Mapping[str, str] | None = None) -> KeyState:
    """Whether this process has the key: in its file (read now), else in its environment."""
    if need.file is not None:
        try:
            key = need.file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            return KeyState(False, f"cannot read it ({why})")
        return KeyState(True) if key else KeyState(False, "empty")
    value = (os.environ if environ is None else environ).get(need.env, "")
    return KeyState(True) if value.strip() else KeyState(False, "not set")


def service_manager(environ: Mapping[str, str] | None = None, ppid: int | None = None,
                    platform: str | None = None) -> Manager:
    """What started this process: a systemd user or system unit, the launchd agent, or a
    person (a shell, `make run`)."""
    environ = os.environ if environ is None else environ
    if (platform or sys.platform) == "darwin":
        return "launchd" if environ.get("XPC_SERVICE_NAME", "").startswith(LAUNCHD_LABEL) \
            else "none"
    if not environ.get("INVOCATION_ID"):
        return "none"
    return "systemd-system" if (os.getppid() if ppid is None else ppid) == 1 \
        else "systemd-user"


def env_file(manager: Manager, environ: Mapping[str, str] | None = None) -> Path | None:
    """The environment file the unit reads (its EnvironmentFile=, %E/traxd/traxd.env)."""
    environ = os.environ if environ is None else environ
    if manager == "systemd-system":
        return Path("/etc/traxd/traxd.env")
    if manager == "systemd-user":
        base = environ.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
        return Path(base) / "traxd" / "traxd.env"
    return None


def where_to_put(need: KeyNeed, manager: Manager,
                 environ: Mapping[str, str] | None = None) -> str:
    """How a process started by `manager` gets the key, as an instruction."""
    if need.file is not None:
        return (f"put the key in {need.file}, then `traxd resume` (the file is read again; "
                "no restart)")
    if manager in ("systemd-user", "systemd-system"):
        scope = "--user " if manager == "systemd-user" else ""
        return (f"put {need.env}=… in {env_file(manager, environ)} (mode 0600), then "
                f"`systemctl {scope}restart traxd`")
    if manager == "launchd":
        return (f"add {need.env} under EnvironmentVariables in ~/Library/LaunchAgents/"
                f"{LAUNCHD_LABEL}.plist, then `launchctl kickstart -k gui/$UID/"
                f"{LAUNCHD_LABEL}`")
    return (f"export {need.env}=… where `traxd run` starts and start it again, or name a "
            "file with api_key_file (read again on `traxd resume`)")


def report(settings: Settings, paused: Mapping[str, str],
           environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What a daemon answers to `keys`: per key it needs, whether it has it and from where,
    and where a missing one goes. Reads the key files: run it in a thread."""
    manager = service_manager(environ)
    keys = []
    for need in needed_keys(settings):
        state = key_state(need, environ)
        keys.append({
            "use": need.use, "backend": need.backend, "source": need.source,
            "where": need.where, "present": state.present, "problem": state.problem,
            "local": need.local, "paused": paused.get(need.backend),
            "fix": "" if state.present else where_to_put(need, manager, environ)})
    return {"keys": keys, "manager": manager, "pid": os.getpid()}
