"""TOML configuration into frozen, validated settings objects grouped by concern."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from traxd.errors import ConfigError

StepSpec = str | tuple[str, ...]  # a step name, or the argv template of a command step

STEP_NAMES = ("download", "preprocess", "transcribe", "enhance")
FORMATS = ("txt", "srt", "vtt", "json")


@dataclass(frozen=True)
class DaemonSettings:
    state_dir: Path = field(default_factory=lambda: Path("~/.local/state/traxd").expanduser())
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    memory_limit_mb: int = 2048
    memory_reserve_mb: int = 512
    cpu_limit_percent: float = 90.0
    batch_interval: float = 5.0
    settle_seconds: float = 2.0
    reconcile_interval: float = 60.0
    metrics_address: str = "127.0.0.1:9108"
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "info"
    max_retries: int = 5
    retry_backoff: float = 5.0
    retry_backoff_max: float = 3600.0
    step_timeout: float = 4 * 3600.0
    stall_seconds: float = 600.0
    shutdown_grace: float = 30.0
    on_duplicate: Literal["skip", "reprocess"] = "skip"
    umask: int = 0o022


@dataclass(frozen=True)
class FolderNames:
    processing: str = "processing"
    done: str = "done"
    outputs: str = "outputs"
    failed: str = "failed"


@dataclass(frozen=True)
class InboxSettings:
    name: str
    path: Path
    pipeline: tuple[StepSpec, ...] = ("download", "preprocess", "transcribe")
    formats: tuple[str, ...] = FORMATS
    priority: int = 5
    schedule: str = "always"
    polling: Literal["auto", "always", "never"] = "auto"

    def sibling(self, folder: str) -> Path:
        return self.path.parent / folder


@dataclass(frozen=True)
class TranscribeSettings:
    backend: Literal["local", "openai"] = "local"
    model: str = "tiny.en"
    language: str | None = None
    chunk_seconds: float = 600.0
    beam_size: int = 1
    vad_filter: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compute_type: str = "int8"
    processes: int = 0  # 0: chosen from the CPU count
    threads: int = 0  # per model process; 0: chosen from the CPU count
    idle_unload_seconds: float = 300.0
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 600.0
    requests_per_minute: int = 0  # 0: unlimited
    max_concurrent: int = 4


@dataclass(frozen=True)
class EnhanceSettings:
    base_url: str = "https://api.deepseek.com"
    model: str = "deepseek-chat"
    api_key_env: str = "DEEPSEEK_API_KEY"
    window_words: int = 1500
    overlap_words: int = 100
    max_change_ratio: float = 0.15
    timeout: float = 300.0
    requests_per_minute: int = 0
    max_concurrent: int = 4


@dataclass(frozen=True)
class DownloadSettings:
    max_filesize_mb: int = 2048
    max_duration_seconds: float = 6 * 3600.0
    archive: Path | None = None  # default: state_dir/download-archive.txt


@dataclass(frozen=True)
class ClusterSettings:
    broker: str | None = None
    queue: str = "traxd"


@dataclass(frozen=True)
class Settings:
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    folders: FolderNames = field(default_factory=FolderNames)
    inboxes: tuple[InboxSettings, ...] = ()
    transcribe: TranscribeSettings = field(default_factory=TranscribeSettings)
    enhance: EnhanceSettings = field(default_factory=EnhanceSettings)
    download: DownloadSettings = field(default_factory=DownloadSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    source: Path | None = None

    def inbox(self, name: str) -> InboxSettings:
        for inbox in self.inboxes:
            if inbox.name == name:
                return inbox
        raise KeyError(name)


# --- lookup -------------------------------------------------------------------------------


def user_config_path() -> Path:
    if sys.platform == "darwin":
        return Path("~/Library/Application Support/traxd/traxd.toml").expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or "~/.config"
    return Path(base).expanduser() / "traxd" / "traxd.toml"


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file: argument, then $TRAXD_CONFIG, then the user and system places."""
    if explicit is not None:
        return Path(explicit).expanduser()
    if env := os.environ.get("TRAXD_CONFIG"):
        return Path(env).expanduser()
    for candidate in (user_config_path(), Path("/etc/traxd/traxd.toml")):
        if candidate.is_file():
            return candidate
    raise ConfigError(str(user_config_path()), "-", "no config file found (try `traxd init`)")


def load_settings(explicit: str | os.PathLike[str] | None = None) -> Settings:
    path = find_config(explicit)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(str(path), "-", f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), "-", f"not UTF-8 text (byte {exc.start}): save it as "
                          "UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "-", f"not valid TOML: {exc}") from exc
    return parse_settings(raw, source=path)


# --- parsing ------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from 5, 2.5, "5s", "2m", "1h", "250ms"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5, \"5s\", \"2m\" or \"1h\"")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str) and (match := _DURATION.match(value)):
        return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"expected a duration such as 5, \"5s\", \"2m\" or \"1h\", not {value!r}")


T = TypeVar("T")
Converter = Callable[[object], object]


class _Section:
    """Reads one TOML table into a dataclass, naming file and key in every error."""

    def __init__(self, source: str, prefix: str, table: object) -> None:
        if not isinstance(table, Mapping):
            raise ConfigError(source, prefix, "expected a table")
        self.source, self.prefix, self.table = source, prefix, dict(table)

    def build(self, cls: type[T], converters: Mapping[str, Converter], **fixed: Any) -> T:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kwargs: dict[str, Any] = dict(fixed)
        for key, value in self.table.items():
            if key not in known or key in fixed:
                raise ConfigError(self.source, self.key(key), "unknown key")
            convert = converters.get(key, _identity)
            try:
                kwargs[key] = convert(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(self.source, self.key(key), str(exc)) from exc
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(self.source, self.prefix, str(exc)) from exc

    def key(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key


def _identity(value: object) -> object:
    return value


def _typed(kind: type, *, minimum: float | None = None, maximum: float | None = None) -> Converter:
    def convert(value: object) -> object:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ValueError(f"expected {kind.__name__}, got {type(value).__name__}")
        if minimum is not None and value < minimum:  # type: ignore[operator]
            raise ValueError(f"must be at least {minimum}")
        if maximum is not None and value > maximum:  # type: ignore[operator]
            raise ValueError(f"must be at most {maximum}")
        return value

    return convert


def _choice(*options: str) -> Converter:
    def convert(value: object) -> object:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(map(repr, options))}, not {value!r}")
        return value

    return convert


def _path(value: object) -> object:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a path")
    return Path(value).expanduser()


def _positive_duration(value: object) -> object:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than zero")
    return seconds


def _umask(value: object) -> object:
    if isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{3}", value):
        return int(value.replace("o", ""), 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    raise ValueError("expected an octal string such as \"022\"")


def _address(value: object) -> object:
    if not isinstance(value, str) or (value and not re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", value)):
        raise ValueError("expected host:port, or \"\" to turn the metrics server off")
    return value


def _formats(value: object) -> object:
    if not isinstance(value, list) or not all(v in FORMATS for v in value):
        raise ValueError(f"expected a list drawn from {list(FORMATS)}")
    return tuple(value)


def _pipeline(value: object) -> object:
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of steps")
    return tuple(_step(item) for item in value)


def _step(item: object) -> StepSpec:
    if isinstance(item, str):
        if item not in STEP_NAMES:
            raise ValueError(f"unknown step {item!r}; steps are {', '.join(STEP_NAMES)} or "
                             "{ command = [...] }")
        return item
    if isinstance(item, Mapping) and set(item) == {"command"}:
        argv = item["command"]
        if isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv):
            return tuple(argv)
    raise ValueError("a command step is { command = [\"program\", \"arg\", ...] }")


def _schedule(value: object) -> object:
    if not isinstance(value, str):
        raise ValueError("expected \"always\" or a cron expression with five fields")
    from traxd.schedule import Window

    Window.parse(value)  # raises ValueError with the reason
    return value


_INT_MIN1 = _typed(int, minimum=1)
_NONNEG_INT = _typed(int, minimum=0)
_PERCENT = _typed(float, minimum=1, maximum=100)
_STR = _typed(str)
_BOOL = _typed(bool)

_DAEMON: dict[str, Converter] = {
    "state_dir": _path, "workers": _INT_MIN1, "memory_limit_mb": _INT_MIN1,
    "memory_reserve_mb": _NONNEG_INT, "cpu_limit_percent": _PERCENT,
    "batch_interval": _positive_duration, "settle_seconds": parse_duration,
    "reconcile_interval": _positive_duration, "metrics_address": _address,
    "log_format": _choice("auto", "json", "console"),
    "log_level": _choice("debug", "info", "warning", "error"),
    "max_retries": _NONNEG_INT, "retry_backoff": _positive_duration,
    "retry_backoff_max": _positive_duration, "step_timeout": _positive_duration,
    "stall_seconds": _positive_duration, "shutdown_grace": parse_duration,
    "on_duplicate": _choice("skip", "reprocess"), "umask": _umask,
}
_FOLDERS: dict[str, Converter] = {k: _STR for k in ("processing", "done", "outputs", "failed")}
_INBOX: dict[str, Converter] = {
    "name": _STR, "path": _path, "pipeline": _pipeline, "formats": _formats,
    "priority": _typed(int), "schedule": _schedule, "polling": _choice("auto", "always", "never"),
}
_API = {"requests_per_minute": _NONNEG_INT, "max_concurrent": _INT_MIN1,
        "timeout": _positive_duration, "api_key_env": _STR}
_TRANSCRIBE: dict[str, Converter] = {
    **_API, "backend": _choice("local", "openai"), "model": _STR, "language": _STR,
    "chunk_seconds": _positive_duration, "beam_size": _INT_MIN1, "vad_filter": _BOOL,
    "device": _choice("auto", "cpu", "cuda"), "compute_type": _STR, "processes": _NONNEG_INT,
    "threads": _NONNEG_INT, "idle_unload_seconds": _positive_duration, "base_url": _STR,
}
_ENHANCE: dict[str, Converter] = {
    **_API, "base_url": _STR, "model": _STR, "window_words": _typed(int, minimum=50),
    "overlap_words": _NONNEG_INT, "max_change_ratio": _typed(float, minimum=0, maximum=1),
}
_DOWNLOAD: dict[str, Converter] = {
    "max_filesize_mb": _INT_MIN1, "max_duration_seconds": _positive_duration, "archive": _path,
}
_CLUSTER: dict[str, Converter] = {"broker": _STR, "queue": _STR}
_TOP = {"daemon", "folders", "inbox", "transcribe", "enhance", "download", "cluster"}


def parse_settings(raw: Mapping[str, Any], *, source: Path | None = None) -> Settings:
    """Validate a parsed TOML document; the first problem raises ConfigError."""
    where = str(source or "<config>")
    for key in raw:
        if key not in _TOP:
            raise ConfigError(where, key, "unknown section")

    def section(name: str) -> _Section:
        return _Section(where, name, raw.get(name, {}))

    folders = section("folders").build(FolderNames, _FOLDERS)
    names = {folders.processing, folders.done, folders.outputs, folders.failed}
    if len(names) != 4 or not all(n and "/" not in n and n not in (".", "..") for n in names):
        raise ConfigError(where, "folders", "the four folder names must differ and be plain names")
    daemon = section("daemon").build(DaemonSettings, _DAEMON)
    inboxes = _inboxes(where, raw.get("inbox", []), folders)
    _check_places(where, daemon.state_dir, inboxes, folders)
    return Settings(
        daemon=daemon,
        folders=folders,
        inboxes=inboxes,
        transcribe=section("transcribe").build(TranscribeSettings, _TRANSCRIBE),
        enhance=section("enhance").build(EnhanceSettings, _ENHANCE),
        download=section("download").build(DownloadSettings, _DOWNLOAD),
        cluster=section("cluster").build(ClusterSettings, _CLUSTER),
        source=source,
    )


def _inboxes(where: str, tables: object, folders: FolderNames) -> tuple[InboxSettings, ...]:
    if not isinstance(tables, list):
        raise ConfigError(where, "inbox", "expected [[inbox]] tables")
    inboxes: list[InboxSettings] = []
    for index, table in enumerate(tables):
        prefix = f"inbox[{index}]"
        sec = _Section(where, prefix, table)
        for required in ("name", "path"):
            if required not in sec.table:
                raise ConfigError(where, f"{prefix}.{required}", "missing")
        inbox = sec.build(InboxSettings, _INBOX)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", inbox.name):
            raise ConfigError(where, f"{prefix}.name", "use letters, digits, '.', '_' and '-'")
        if any(other.name == inbox.name for other in inboxes):
            raise ConfigError(where, f"{prefix}.name", f"duplicate inbox name {inbox.name!r}")
        if inbox.path.name in vars(folders).values():
            raise ConfigError(where, f"{prefix}.path", "an inbox cannot be named like a sibling")
        _check_no_overlap(where, prefix, inbox, inboxes)
        inboxes.append(inbox)
    return tuple(inboxes)


def _check_no_overlap(
    where: str, prefix: str, inbox: InboxSettings, others: list[InboxSettings]
) -> None:
    mine = inbox.path.resolve()
    for other in others:
        theirs = other.path.resolve()
        if mine == theirs or mine.is_relative_to(theirs) or theirs.is_relative_to(mine):
            raise ConfigError(where, f"{prefix}.path", f"overlaps inbox {other.name!r}")


def _family(inbox: InboxSettings, folders: FolderNames) -> dict[str, Path]:
    """An inbox and its sibling folders, resolved: what traxd moves files in and out of."""
    root = inbox.path.resolve()
    return {"inbox": root, **{name: root.parent / folder for name, folder in vars(folders).items()}}


def _check_places(where: str, state_dir: Path, inboxes: tuple[InboxSettings, ...],
                  folders: FolderNames) -> None:
    """No inbox inside another inbox's folders, and the state folder inside none of them
    (traxd would move its own journal, or process its outputs again)."""
    state = state_dir.resolve()
    for index, inbox in enumerate(inboxes):
        for role, place in _family(inbox, folders).items():
            if state.is_relative_to(place):
                raise ConfigError(where, "daemon.state_dir", f"overlaps the {role} folder "
                                  f"{place} of inbox {inbox.name!r}; put it elsewhere")
            for other in inboxes[:index]:
                theirs = _family(other, folders)
                if any(place.is_relative_to(t) or t.is_relative_to(place)
                       for t in theirs.values()):
                    raise ConfigError(where, f"inbox[{index}].path", f"its {role} folder "
                                      f"{place} overlaps the folders of inbox {other.name!r}")


def with_overrides(settings: Settings, **daemon: Any) -> Settings:
    """A copy with some daemon settings replaced (command-line flags win over the file)."""
    changes = {k: v for k, v in daemon.items() if v is not None}
    return dataclasses.replace(settings, daemon=dataclasses.replace(settings.daemon, **changes))
