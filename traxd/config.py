"""TOML configuration into frozen, validated settings objects grouped by concern."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from traxd.errors import ConfigError

StepSpec = str | tuple[str, ...]  # a step name, or the argv template of a command step

STEP_NAMES = ("download", "preprocess", "transcribe", "enhance", "mux")
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
    max_duration_seconds: float = 12 * 3600.0  # longest media any input may hold
    stall_seconds: float = 600.0
    shutdown_grace: float = 30.0
    on_duplicate: Literal["skip", "reprocess"] = "skip"
    umask: int = 0o022
    report_retention: float = 90 * 86400.0  # per-batch reports older than this are removed


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
    notify: tuple[str, ...] | None = None  # its files' events told ([notify] events if None)
    transcribe: TranscribeSettings | None = None  # [inbox.transcribe] over [transcribe]
    enhance: EnhanceSettings | None = None  # [inbox.enhance] over [enhance]

    def sibling(self, folder: str) -> Path:
        return self.path.parent / folder


@dataclass(frozen=True)
class TranscribeSettings:
    backend: Literal["local", "openai"] = "local"
    model: str = "tiny.en"
    language: str | None = None  # what is spoken; None: detected (English for *.en models)
    task: Literal["transcribe", "translate"] = "transcribe"  # translate: English text
    chunk_seconds: float = 600.0
    beam_size: int = 5  # faster-whisper's own; 1: ~20 % less time, ~28 % more word errors
    vad_filter: bool = True  # local: skip non-speech (silence makes whisper invent words)
    # local: audio at least this long goes through faster-whisper's BatchedInferencePipeline
    # (batch_size windows decoded at once), and a file this long per model process is first
    # cut at pauses into one piece per process; 0: neither (one file, one process, in order)
    long_audio_seconds: float = 60.0
    batch_size: int = 8
    word_timestamps: bool = False  # words with their times in the json output
    max_line_width: int | None = None  # srt/vtt: characters per line; None: no limit
    max_line_count: int | None = None  # srt/vtt: lines per cue; None: no limit
    # "beside": <name>.<lang>.srt/.vtt also beside the original in done/ (media servers);
    # "library": also under `library`, at the original's path relative to its inbox
    subtitles: Literal["outputs", "beside", "library"] = "outputs"
    library: Path | None = None  # the folder a media server reads (Plex, Jellyfin, Emby)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compute_type: str = "int8"
    processes: int = 0  # 0: chosen from the CPU count
    threads: int = 0  # per model process; 0: chosen from the CPU count
    idle_unload_seconds: float = 300.0
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    api_key_file: Path | None = None  # read instead of the variable; again on resume
    timeout: float = 600.0
    requests_per_minute: int = 0  # 0: unlimited
    max_concurrent: int = 4


@dataclass(frozen=True)
class EnhanceSettings:
    base_url: str = "https://api.deepseek.com"
    model: str = "deepseek-chat"
    api_key_env: str = "DEEPSEEK_API_KEY"
    api_key_file: Path | None = None  # read instead of the variable; again on resume
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
    allow_private: bool = False  # links may reach loopback, LAN and link-local addresses


@dataclass(frozen=True)
class ClusterSettings:
    broker: str | None = None  # redis://host:port/db; None: steps run in the daemon
    queue: str = "traxd"  # queues are <queue>.cpu, <queue>.gpu, <queue>.net
    # Daemon path prefix -> this machine's prefix (set on the worker side).
    path_map: tuple[tuple[str, str], ...] = ()
    lease: float = 60.0  # a worker silent this long is dead: its steps go to another
    work_dir: Path | None = None  # steps' folders, on shared storage (default state_dir/work)
    queues: tuple[str, ...] = ("cpu", "gpu", "net")  # what `traxd worker` takes by default
    # Steps one `traxd worker` process runs at once per resource, e.g. (("gpu", 1),);
    # a resource not named runs --threads at once.
    concurrency: tuple[tuple[str, int], ...] = ()

    def threads_for(self, resource: str, default: int) -> int:
        return dict(self.concurrency).get(resource, default)


NOTIFY_EVENTS = ("batch_finished", "file_failed", "backend_paused", "backend_resumed",
                 "disk_full", "daemon_stopped")


@dataclass(frozen=True)
class NotifySettings:
    urls: tuple[str, ...] = ()  # Apprise URLs; they hold tokens: never logged
    events: tuple[str, ...] = ("batch_finished", "file_failed", "backend_paused", "disk_full")
    command: tuple[str, ...] = ()  # argv template; the event as JSON on stdin
    group_seconds: float = 60.0  # failures are sent together, at most one message this often
    retries: int = 3
    timeout: float = 30.0  # one attempt of one notifier

    @property
    def enabled(self) -> bool:
        return bool(self.urls or self.command) and bool(self.events)


@dataclass(frozen=True)
class WebSettings:
    """The status page at / on metrics_address."""

    page: bool = True
    control: bool = False  # pause/resume/retry buttons; need the token
    token_env: str = "TRAXD_WEB_TOKEN"  # noqa: S105 (a variable's name, not its value)
    refresh_seconds: float = 2.0


@dataclass(frozen=True)
class Settings:
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    folders: FolderNames = field(default_factory=FolderNames)
    inboxes: tuple[InboxSettings, ...] = ()
    transcribe: TranscribeSettings = field(default_factory=TranscribeSettings)
    enhance: EnhanceSettings = field(default_factory=EnhanceSettings)
    download: DownloadSettings = field(default_factory=DownloadSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    notify: NotifySettings = field(default_factory=NotifySettings)
    web: WebSettings = field(default_factory=WebSettings)
    source: Path | None = None

    @property
    def key_variables(self) -> tuple[str, ...]:
        """The environment variables named as holding API keys."""
        own = tuple(s.api_key_env for i in self.inboxes for s in (i.transcribe, i.enhance)
                    if s is not None)
        return tuple(dict.fromkeys((self.transcribe.api_key_env, self.enhance.api_key_env,
                                    *own)))

    @property
    def key_files(self) -> tuple[Path, ...]:
        """The files named as holding API keys."""
        sections = (self.transcribe, self.enhance,
                    *(s for i in self.inboxes for s in (i.transcribe, i.enhance) if s))
        return tuple(dict.fromkeys(s.api_key_file for s in sections if s.api_key_file))

    def for_inbox(self, name: str) -> Settings:
        """These settings with the inbox's own [inbox.transcribe] and [inbox.enhance] in
        place of the global sections; unchanged for a name no inbox has."""
        inbox = next((i for i in self.inboxes if i.name == name), None)
        if inbox is None or (inbox.transcribe is None and inbox.enhance is None):
            return self
        return dataclasses.replace(self, transcribe=inbox.transcribe or self.transcribe,
                                   enhance=inbox.enhance or self.enhance)

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
MAX_DURATION = 366 * 86400.0  # longer waits overflow timers and clocks; no setting needs them
MAX_INT = 2**31 - 1


def parse_duration(value: object) -> float:
    """Seconds from 5, 2.5, "5s", "2m", "1h", "250ms"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5, \"5s\", \"2m\" or \"1h\"")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(f"expected a duration such as 5, \"5s\", \"2m\" or \"1h\", not {value!r}")
    if math.isnan(seconds):
        raise ValueError("expected a number of seconds, not nan")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION:
        raise ValueError("must be at most 366 days (\"366d\")")
    return seconds


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
                raise ConfigError(self.source, self.key(key),
                                  unknown("key", key, sorted(known - set(fixed))))
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
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("expected a finite number, not nan or inf")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            raise ValueError(f"must be at most {MAX_INT}")
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


def _anchored(converters: Mapping[str, Converter], base: Path) -> dict[str, Converter]:
    """The converters with relative paths read against `base` (the config file's folder)."""
    def convert(value: object) -> object:
        path = _path(value)
        assert isinstance(path, Path)
        return path if path.is_absolute() else base / path

    return {key: convert if conv is _path else conv for key, conv in converters.items()}


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
    if value and int(value.rsplit(":", 1)[1]) > 65535:
        raise ValueError("the port must be at most 65535")
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
    "max_duration_seconds": _positive_duration,
    "stall_seconds": _positive_duration, "shutdown_grace": parse_duration,
    "on_duplicate": _choice("skip", "reprocess"), "umask": _umask,
    "report_retention": _positive_duration,
}
_FOLDERS: dict[str, Converter] = {k: _STR for k in ("processing", "done", "outputs", "failed")}


def _notify_events(value: object) -> object:
    if not isinstance(value, list) or not all(v in NOTIFY_EVENTS for v in value):
        raise ValueError(f"expected a list drawn from {list(NOTIFY_EVENTS)}")
    return tuple(value)


_INBOX: dict[str, Converter] = {
    "name": _STR, "path": _path, "pipeline": _pipeline, "formats": _formats,
    "priority": _typed(int), "schedule": _schedule, "polling": _choice("auto", "always", "never"),
    "notify": _notify_events,
}
_API = {"requests_per_minute": _NONNEG_INT, "max_concurrent": _INT_MIN1,
        "timeout": _positive_duration, "api_key_env": _STR, "api_key_file": _path}
_TRANSCRIBE: dict[str, Converter] = {
    **_API, "backend": _choice("local", "openai"), "model": _STR, "language": _STR,
    "task": _choice("transcribe", "translate"),
    "chunk_seconds": _positive_duration, "beam_size": _INT_MIN1, "vad_filter": _BOOL,
    "long_audio_seconds": parse_duration, "batch_size": _typed(int, minimum=1, maximum=64),
    "word_timestamps": _BOOL, "max_line_width": _typed(int, minimum=10),
    "max_line_count": _INT_MIN1, "subtitles": _choice("outputs", "beside", "library"),
    "library": _path,
    "device": _choice("auto", "cpu", "cuda"), "compute_type": _STR, "processes": _NONNEG_INT,
    "threads": _NONNEG_INT, "idle_unload_seconds": _positive_duration, "base_url": _STR,
}
_ENHANCE: dict[str, Converter] = {
    **_API, "base_url": _STR, "model": _STR, "window_words": _typed(int, minimum=50),
    "overlap_words": _NONNEG_INT, "max_change_ratio": _typed(float, minimum=0, maximum=1),
}
_DOWNLOAD: dict[str, Converter] = {
    "max_filesize_mb": _INT_MIN1, "max_duration_seconds": _positive_duration, "archive": _path,
    "allow_private": _BOOL,
}
_RESOURCES = ("cpu", "gpu", "net")


def _path_map(value: object) -> object:
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and k.startswith("/") and v.startswith("/")
            for k, v in value.items()):
        raise ValueError('expected a table of absolute paths, e.g. { "/srv/media" = "/mnt/media" }')
    return tuple((k.rstrip("/") or "/", v.rstrip("/") or "/") for k, v in value.items())


def _queues(value: object) -> object:
    if not isinstance(value, list) or not value or not all(v in _RESOURCES for v in value):
        raise ValueError(f"expected a non-empty list drawn from {list(_RESOURCES)}")
    return tuple(value)


def _concurrency(value: object) -> object:
    if not isinstance(value, Mapping) or not all(
            k in _RESOURCES and isinstance(v, int) and not isinstance(v, bool) and v >= 1
            for k, v in value.items()):
        raise ValueError(f"expected a table of steps at once per resource, drawn from "
                         f"{list(_RESOURCES)}, each 1 or more, e.g. {{ gpu = 1, net = 8 }}")
    return tuple(sorted(value.items()))


def _queue_name(value: object) -> object:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise ValueError("use letters, digits, '_' and '-'")
    return value


_CLUSTER: dict[str, Converter] = {
    "broker": _STR, "queue": _queue_name, "path_map": _path_map,
    "lease": _positive_duration, "work_dir": _path, "queues": _queues,
    "concurrency": _concurrency,
}


def _notify_urls(value: object) -> object:
    # The URL itself is never quoted back: it may hold a token.
    if not isinstance(value, list) or not all(isinstance(v, str) and "://" in v for v in value):
        raise ValueError('expected a list of Apprise URLs such as ["ntfy://traxd-alerts"]')
    return tuple(value)


def _argv(value: object) -> object:
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise ValueError('expected an argv list such as ["/usr/local/bin/on-event", "{event}"]')
    return tuple(value)


_NOTIFY: dict[str, Converter] = {
    "urls": _notify_urls, "events": _notify_events, "command": _argv,
    "group_seconds": _positive_duration, "retries": _typed(int, minimum=0, maximum=10),
    "timeout": _positive_duration,
}
_WEB: dict[str, Converter] = {
    "page": _BOOL, "control": _BOOL, "token_env": _STR,
    "refresh_seconds": _typed(float, minimum=0.5, maximum=3600),
}
_TOP = {"daemon", "folders", "inbox", "transcribe", "enhance", "download", "cluster", "notify",
        "web"}


def unknown(what: str, name: str, known: Sequence[str]) -> str:
    """`unknown key; did you mean 'workers'?`, or the list of known names when none is close."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"unknown {what}; did you mean {close[0]!r}?"
    return f"unknown {what}; known: {', '.join(known)}"


def parse_settings(raw: Mapping[str, Any], *, source: Path | None = None) -> Settings:
    """Validate a parsed TOML document; the first problem raises ConfigError."""
    where = str(source or "<config>")
    for key in raw:
        if key not in _TOP:
            raise ConfigError(where, key, unknown("section", key, sorted(_TOP)))

    base = source.expanduser().resolve().parent if source is not None else Path.cwd()

    def section(name: str) -> _Section:
        return _Section(where, name, raw.get(name, {}))

    folders = section("folders").build(FolderNames, _FOLDERS)
    names = {folders.processing, folders.done, folders.outputs, folders.failed}
    if len(names) != 4 or not all(n and "/" not in n and n not in (".", "..") for n in names):
        raise ConfigError(where, "folders", "the four folder names must differ and be plain names")
    daemon = section("daemon").build(DaemonSettings, _anchored(_DAEMON, base))
    inboxes = _inboxes(where, raw.get("inbox", []), folders, base, raw)
    _check_places(where, daemon.state_dir, inboxes, folders)
    transcribe = section("transcribe").build(TranscribeSettings, _anchored(_TRANSCRIBE, base))
    _shelved(where, "transcribe", _spoken(where, "transcribe", transcribe))
    _check_libraries(where, transcribe, inboxes, folders)
    return Settings(
        daemon=daemon,
        folders=folders,
        inboxes=inboxes,
        transcribe=transcribe,
        enhance=section("enhance").build(EnhanceSettings, _anchored(_ENHANCE, base)),
        download=section("download").build(DownloadSettings, _anchored(_DOWNLOAD, base)),
        cluster=section("cluster").build(ClusterSettings, _anchored(_CLUSTER, base)),
        notify=section("notify").build(NotifySettings, _NOTIFY),
        web=section("web").build(WebSettings, _WEB),
        source=source,
    )


def _inboxes(where: str, tables: object, folders: FolderNames, base: Path,
             raw: Mapping[str, Any]) -> tuple[InboxSettings, ...]:
    if not isinstance(tables, list):
        raise ConfigError(where, "inbox", "expected [[inbox]] tables")
    inboxes: list[InboxSettings] = []
    for index, table in enumerate(tables):
        prefix = f"inbox[{index}]"
        sec = _Section(where, prefix, table)
        for required in ("name", "path"):
            if required not in sec.table:
                raise ConfigError(where, f"{prefix}.{required}", "missing")
        inbox = sec.build(InboxSettings, _anchored(_INBOX, base),
                          **_inbox_sections(where, prefix, sec, raw, base))
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", inbox.name):
            raise ConfigError(where, f"{prefix}.name", "use letters, digits, '.', '_' and '-'")
        if any(other.name == inbox.name for other in inboxes):
            raise ConfigError(where, f"{prefix}.name", f"duplicate inbox name {inbox.name!r}")
        if inbox.path.name in vars(folders).values():
            raise ConfigError(where, f"{prefix}.path", "an inbox cannot be named like a sibling")
        _check_no_overlap(where, prefix, inbox, inboxes)
        _check_mux(where, prefix, inbox)
        inboxes.append(inbox)
    return tuple(inboxes)


_OVERRIDABLE: dict[str, tuple[type[Any], dict[str, Converter]]] = {
    "transcribe": (TranscribeSettings, _TRANSCRIBE), "enhance": (EnhanceSettings, _ENHANCE),
}


def _inbox_sections(where: str, prefix: str, sec: _Section, raw: Mapping[str, Any],
                    base: Path) -> dict[str, Any]:
    """An inbox's [inbox.transcribe] and [inbox.enhance] (taken out of its table), each
    merged over the global section of that name."""
    built: dict[str, Any] = {}
    for name, (cls, converters) in _OVERRIDABLE.items():
        if name not in sec.table:
            continue
        own = _Section(where, f"{prefix}.{name}", sec.table.pop(name))
        given = own.build(cls, _anchored(converters, base))
        common = _Section(where, name, raw.get(name, {})).build(cls, _anchored(converters, base))
        built[name] = dataclasses.replace(common, **{k: getattr(given, k) for k in own.table})
    # `subtitles = "beside"` and `library = "..."` in [[inbox]]: keys of its [inbox.transcribe]
    placing = _Section(where, prefix, {k: sec.table.pop(k) for k in _INBOX_SUBTITLE_KEYS
                                       if k in sec.table})
    if placing.table:
        given = placing.build(TranscribeSettings, _anchored(_TRANSCRIBE, base))
        common = built.get("transcribe") or _Section(where, "transcribe", raw.get(
            "transcribe", {})).build(TranscribeSettings, _anchored(_TRANSCRIBE, base))
        built["transcribe"] = dataclasses.replace(
            common, **{k: getattr(given, k) for k in placing.table})
    if "transcribe" in built:
        _spoken(where, f"{prefix}.transcribe", built["transcribe"])
        _shelved(where, prefix, built["transcribe"])
    return built


_INBOX_SUBTITLE_KEYS = ("subtitles", "library")


def _shelved(where: str, prefix: str, settings: TranscribeSettings) -> TranscribeSettings:
    """`subtitles = "library"` needs the library folder to put them in."""
    if settings.subtitles == "library" and settings.library is None:
        raise ConfigError(where, f"{prefix}.subtitles", 'subtitles = "library" puts them '
                          "under the folder a media server reads: name it with library = "
                          '"/srv/media/films" beside this key (or subtitles = "beside" for '
                          "next to the original in done/)")
    return settings


def _spoken(where: str, prefix: str, settings: TranscribeSettings) -> TranscribeSettings:
    """A language other than English with an English-only local model (tiny.en, base.en)
    would be transcribed as English, and such a model cannot translate: both refused."""
    # The openai backend's default model (the unchanged "tiny.en") is whisper-1.
    english_only = Path(settings.model).name.endswith(".en") and not (
        settings.backend == "openai" and settings.model == "tiny.en")
    if settings.backend == "local" and english_only and settings.language not in (None, "en"):
        raise ConfigError(where, f"{prefix}.language", f"model {settings.model!r} knows only "
                          f"English; for {settings.language!r} name a multilingual model "
                          "(e.g. model = \"small\")")
    if settings.task == "translate" and english_only:
        raise ConfigError(where, f"{prefix}.task", f"model {settings.model!r} knows only "
                          "English and cannot translate into it: name a multilingual model "
                          "(e.g. model = \"small\"), or remove task = \"translate\"")
    return settings


def _check_mux(where: str, prefix: str, inbox: InboxSettings) -> None:
    """`mux` adds the srt that transcribe wrote before it."""
    if "mux" not in inbox.pipeline:
        return
    before = inbox.pipeline[:inbox.pipeline.index("mux")]
    if "transcribe" not in before:
        raise ConfigError(where, f"{prefix}.pipeline", "mux adds the subtitles of the "
                          "transcribe step into the video: put transcribe before mux")
    if "srt" not in inbox.formats:
        raise ConfigError(where, f"{prefix}.formats", "mux adds the srt into the video: "
                          "add \"srt\" to the formats")


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


def _check_libraries(where: str, common: TranscribeSettings,
                     inboxes: tuple[InboxSettings, ...], folders: FolderNames) -> None:
    """A library folder inside an inbox (or its processing/ folder) would have traxd take
    its own subtitles as new work."""
    for index, inbox in enumerate(inboxes):
        own = inbox.transcribe or common
        if own.subtitles != "library" or own.library is None:
            continue
        library = own.library.resolve()
        for other in inboxes:
            family = _family(other, folders)
            for role in ("inbox", "processing"):
                if library.is_relative_to(family[role]):
                    key = f"inbox[{index}].library" if inbox.transcribe else "transcribe.library"
                    raise ConfigError(where, key, f"{library} is inside the {role} folder of "
                                      f"inbox {other.name!r}, where traxd would take the "
                                      "subtitles as new files: name the media server's "
                                      "library folder")


def with_overrides(settings: Settings, **daemon: Any) -> Settings:
    """A copy with some daemon settings replaced (command-line flags win over the file)."""
    changes = {k: v for k, v in daemon.items() if v is not None}
    return dataclasses.replace(settings, daemon=dataclasses.replace(settings.daemon, **changes))
