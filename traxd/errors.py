"""Error classes and classification: every failure is retry, permanent or fatal."""

from __future__ import annotations

import errno
import random
from enum import Enum


class Category(str, Enum):
    RETRY = "retry"
    PERMANENT = "permanent"
    FATAL = "fatal"
    INTERNAL = "internal"  # a bug (in traxd or a plug-in): logged with its traceback, retried


class TraxdError(Exception):
    """Base of traxd's own errors; `category` says what the pool does with it."""

    category = Category.PERMANENT

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or type(self).__name__


class ConfigError(TraxdError):
    """The configuration cannot be loaded: names the file, the key and the reason."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        where = f"{file}: {key}" if key and key != "-" else file  # "-": the whole file
        super().__init__(f"{where}: {reason}", reason="config")
        self.file, self.key, self.why = file, key, reason


class Retry(TraxdError):
    """Try again later; `defer` (seconds) overrides the computed back-off (Retry-After)."""

    category = Category.RETRY

    def __init__(self, message: str, *, reason: str = "", defer: float | None = None) -> None:
        super().__init__(message, reason=reason)
        self.defer = defer


class Permanent(TraxdError):
    """Retrying cannot help: bad media, unsupported input, a rejected request."""

    category = Category.PERMANENT


class BackendFatal(TraxdError):
    """The backend itself is unusable (bad key, missing model): pause it, keep the files."""

    category = Category.FATAL

    def __init__(self, message: str, *, backend: str, reason: str = "") -> None:
        super().__init__(message, reason=reason or "backend")
        self.backend = backend


class InternalError(TraxdError):
    """An exception nobody classified (a programming error): retried with back-off."""

    category = Category.INTERNAL


class StepTimeout(Retry):
    """A step ran past its time limit or made no progress for `stall_seconds`."""


class ResourceExceeded(Retry):
    """A job went over its memory limit and was stopped."""


class JournalError(Exception):
    """The journal cannot be opened or is corrupt; nothing is touched."""


class AlreadyRunning(Exception):
    """Another traxd holds this state directory."""


class ControlUnavailable(Exception):
    """No daemon answers on the control socket (not running, or no permission)."""


class ControlRejected(Exception):
    """The daemon answered a control request with an error (unknown inbox, bad request)."""


def classify_http_status(status: int) -> Category:
    """Map an HTTP status of a provider's answer to a category."""
    if status in (401, 403):
        return Category.FATAL
    if status in (408, 409, 429) or status >= 500:
        return Category.RETRY
    return Category.PERMANENT


def classify_exception(exc: BaseException) -> Category:
    """Category of any exception: transient OS trouble is worth a retry, other OS errors
    are permanent, and an exception nothing classified is internal (a bug)."""
    if isinstance(exc, TraxdError):
        return exc.category
    if isinstance(exc, TimeoutError | ConnectionError):
        return Category.RETRY
    if isinstance(exc, OSError):
        return Category.RETRY if exc.errno in _TRANSIENT_ERRNOS else Category.PERMANENT
    return Category.INTERNAL


# By name: the numbers differ between Linux and macOS.
_TRANSIENT_ERRNOS = frozenset({
    errno.EINTR, errno.EAGAIN, errno.ENOMEM, errno.EBUSY, errno.ENFILE, errno.EMFILE,
    errno.ENOSPC, errno.ETIMEDOUT, errno.ECONNREFUSED, errno.EHOSTDOWN, errno.EHOSTUNREACH,
    errno.EDQUOT, errno.EROFS,  # a place that is full or read-only now may not be later
})


def compute_backoff(
    attempts: int,
    *,
    factor: float = 5.0,
    jitter: bool = True,
    max_backoff: float = 3600.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before attempt `attempts + 1`: exponential, capped, full jitter."""
    ceiling = min(max_backoff, factor * 2.0 ** max(attempts - 1, 0))
    if not jitter:
        return ceiling
    source: random.Random = rng or random.Random()
    return source.uniform(0, ceiling)
