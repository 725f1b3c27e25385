"""structlog set-up: JSON under a service manager, console on a terminal; secrets redacted."""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog.typing import FilteringBoundLogger

_SECRET_KEYS = re.compile(r"(api[_-]?key|token|secret|password|authorization)", re.IGNORECASE)
_SECRET_VALUES = re.compile(r"\b(sk-[A-Za-z0-9_\-]{8,}|Bearer\s+[A-Za-z0-9._\-]{8,})")
REDACTED = "[redacted]"
# Environment variables that look like credentials: a child never inherits them, and their
# values are redacted wherever traxd writes text.
CREDENTIAL_NAMES = re.compile(
    r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE|_PAT$|DSN$", re.IGNORECASE)
SHORTEST_SECRET = 8  # shorter values (SESSION_ID=3) are not worth hiding and would mangle text
Event = MutableMapping[str, Any]
Processor = Callable[[Any, str, Event], Any]


def redact_text(text: str) -> str:
    """Hide anything shaped like an API key or bearer token."""
    if "sk-" not in text and "Bearer" not in text:  # every log line passes here: be quick
        return text
    return _SECRET_VALUES.sub(REDACTED, text)


class Redactor:
    """Hides known secret values, whatever their shape, and key- or token-shaped text."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self.values = tuple(sorted({v for v in values if len(v) >= SHORTEST_SECRET},
                                   key=len, reverse=True))

    @classmethod
    def of_environment(cls, names: Iterable[str] = (),
                       environ: Mapping[str, str] | None = None,
                       files: Iterable[Path] = ()) -> Redactor:
        """The values of the named variables (the configured api_key_env), of every
        variable whose name looks like a credential, and of the key files (api_key_file)."""
        env = os.environ if environ is None else environ
        wanted = set(names)
        values = [v for k, v in env.items() if k in wanted or CREDENTIAL_NAMES.search(k)]
        for path in files:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                values.append(path.read_text(encoding="utf-8").strip())
        return cls(values)

    def text(self, text: str) -> str:
        for value in self.values:
            if value in text:
                text = text.replace(value, REDACTED)
        return redact_text(text)

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]
                 ) -> MutableMapping[str, Any]:
        """The structlog processor."""
        for key, value in event.items():
            if _names_a_secret(key):
                event[key] = REDACTED
            elif isinstance(value, str):
                event[key] = self.text(value)
        return event


@functools.cache
def _names_a_secret(key: str) -> bool:
    return _SECRET_KEYS.search(key) is not None


def wants_json(log_format: str, stream: TextIO) -> bool:
    if log_format != "auto":
        return log_format == "json"
    under_manager = "INVOCATION_ID" in os.environ or "XPC_SERVICE_NAME" in os.environ
    return under_manager or not stream.isatty()


class LogWriter:
    """Log events rendered and written out by a thread of their own, so that rendering and a
    slow disk or pipe never hold up the event loop: the caller only stamps the event and
    queues it. Events queued together go out together; everything queued is written before
    the process exits normally. It is structlog's logger: every level method queues."""

    def __init__(self, stream: TextIO, render: Sequence[Processor] = ()) -> None:
        self._stream = stream
        self._render = tuple(render)
        self._lines: queue.SimpleQueue[Event | str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def msg(self, event: Event | str) -> None:
        self._lines.put(event)

    debug = info = warning = warn = error = critical = exception = fatal = msg

    def write(self, text: str) -> None:
        self._lines.put(text)

    def flush(self) -> None:
        return None  # the writer thread flushes each group it writes

    def _run(self) -> None:
        done = False
        while not done:
            group = [self._lines.get()]
            with contextlib.suppress(queue.Empty):
                while group[-1] is not None and len(group) < 1000:
                    group.append(self._lines.get_nowait())
            done = group[-1] is None
            text = "".join(self._line(item) for item in group if item is not None)
            with contextlib.suppress(OSError, ValueError):  # a closed or broken stream
                self._stream.write(text)
                self._stream.flush()

    def _line(self, item: Event | str) -> str:
        if isinstance(item, str):
            return item
        rendered: Any = item
        try:
            for processor in self._render:
                rendered = processor(None, "", rendered)
        except Exception as exc:  # a line that cannot be rendered still says what it was
            rendered = f"log_render_failed event={item.get('event')!r} error={exc!r}"
        return f"{rendered}\n"

    def close(self) -> None:
        if self._thread.is_alive():
            self._lines.put(None)
            self._thread.join(timeout=5)


def _stamp(_: Any, __: str, event: Event) -> Event:
    """The time the event happened, taken on the caller's thread, rendered later."""
    event["timestamp"] = time.time()
    return event


def _iso_time(_: Any, __: str, event: Event) -> Event:
    when = event.get("timestamp")
    if isinstance(when, float):
        event["timestamp"] = datetime.fromtimestamp(when, UTC).isoformat().replace("+00:00", "Z")
    return event


def _hand_over(_: Any, __: str, event: Event) -> tuple[tuple[Event], dict[str, Any]]:
    """structlog's last processor: the event itself goes to the writer, unrendered."""
    return (event,), {}


def configure(log_format: str = "auto", level: str = "info", stream: TextIO | None = None,
              redactor: Redactor | None = None) -> None:
    out = stream or sys.stderr
    renderer: Any = (structlog.processors.JSONRenderer() if wants_json(log_format, out)
                     else structlog.dev.ConsoleRenderer(colors=out.isatty()))
    # What must be taken where the event happens (its time, the exception being handled)
    # is taken there; redaction and rendering happen in the writer's thread.
    writer = LogWriter(out, render=[_iso_time, redactor or Redactor.of_environment(), renderer])
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _stamp,
            structlog.processors.format_exc_info,
            _hand_over,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> FilteringBoundLogger:
    logger: FilteringBoundLogger = structlog.get_logger("traxd")
    return logger.bind(**context) if context else logger
