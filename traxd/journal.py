"""The SQLite (WAL) job journal: one row per job, the truth about every file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TextIO, TypeVar

from traxd.errors import AlreadyRunning, JournalError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    inbox TEXT NOT NULL,
    rel_path TEXT NOT NULL,
    state TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    mtime_ns INTEGER NOT NULL DEFAULT 0,
    sha256 TEXT,
    priority INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    claimed_path TEXT,
    final_path TEXT,
    outcome TEXT,
    outputs TEXT,
    not_before REAL NOT NULL DEFAULT 0,
    waiting_on TEXT,
    error TEXT,
    batch_id TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL
);
-- A file waiting in an inbox has at most one job; once claimed, its inbox name is free again.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_unclaimed_path ON jobs(inbox, rel_path)
    WHERE claimed_path IS NULL AND state IN ('seen', 'queued', 'running', 'waiting');
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, priority, size);
CREATE INDEX IF NOT EXISTS jobs_by_hash ON jobs(inbox, sha256) WHERE state = 'done';
"""


class JobState(str, Enum):
    SEEN = "seen"
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    DONE = "done"
    FAILED = "failed"
    DUPLICATE = "duplicate"

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.DUPLICATE)


ACTIVE = (JobState.SEEN, JobState.QUEUED, JobState.RUNNING, JobState.WAITING)


@dataclass(frozen=True)
class Job:
    id: int
    inbox: str
    rel_path: str
    state: JobState
    size: int
    mtime_ns: int
    sha256: str | None
    priority: int
    attempts: int
    step: int  # steps completed
    claimed_path: str | None
    final_path: str | None  # where the original goes; set before it moves
    outcome: str | None  # the terminal state that final_path leads to
    outputs: dict[str, str] | None  # publish plan: artifact name -> destination path
    not_before: float
    waiting_on: str | None
    error: dict[str, Any] | None
    batch_id: str | None
    created: float
    updated: float
    started: float | None
    finished: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        values = dict(row)
        values["state"] = JobState(values["state"])
        for key in ("outputs", "error"):
            values[key] = json.loads(values[key]) if values[key] else None
        return cls(**values)


P = ParamSpec("P")
R = TypeVar("R")


def _locked(method: Callable[Concatenate[Journal, P], R]) -> Callable[Concatenate[Journal, P], R]:
    """Serialise use of the one connection by the loop and worker threads."""

    def wrapper(self: Journal, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class Journal:
    """All reads and writes of job rows; each write is its own durable transaction.

    Safe to call from the loop and from worker threads (one lock around the connection).
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._lock = threading.RLock()
        self.path = path

    @classmethod
    def open(cls, path: Path) -> Journal:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=5.0,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            _check(conn, path)
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise JournalError(
                f"cannot use the journal {path}: {exc}. Nothing was changed; move the file "
                "aside to start with an empty journal (files in the inboxes are found again)."
            ) from exc
        return cls(conn, path)

    @_locked
    def close(self) -> None:
        self._conn.close()

    # --- queries ----------------------------------------------------------------------------

    @_locked
    def get(self, job_id: int) -> Job:
        row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return Job.from_row(row)

    @_locked
    def active(self, inbox: str, rel_path: str) -> Job | None:
        """The unfinished job of a file still in the inbox (not yet claimed), if any."""
        row = self._conn.execute(
            "SELECT * FROM jobs WHERE inbox = ? AND rel_path = ? AND claimed_path IS NULL"
            " AND state IN (?, ?, ?, ?)", (inbox, rel_path, *ACTIVE)).fetchone()
        return Job.from_row(row) if row else None

    @_locked
    def claiming(self, inbox: str, rel_path: str) -> Job | None:
        """The unfinished job that chose a processing/ path for this inbox file, if any.

        Its rename may not have happened (a crash between the journal write and the move,
        or a move that failed and waits for its retry); the claim, repeated, completes it.
        """
        row = self._conn.execute(
            "SELECT * FROM jobs WHERE inbox = ? AND rel_path = ? AND claimed_path IS NOT NULL"
            " AND final_path IS NULL AND state IN (?, ?, ?, ?) ORDER BY id DESC LIMIT 1",
            (inbox, rel_path, *ACTIVE)).fetchone()
        return Job.from_row(row) if row else None

    @_locked
    def in_states(self, *states: JobState, inbox: str | None = None) -> list[Job]:
        marks = ", ".join("?" * len(states))
        sql = f"SELECT * FROM jobs WHERE state IN ({marks})"  # noqa: S608 - only placeholders
        args: list[Any] = list(states)
        if inbox is not None:
            sql, args = sql + " AND inbox = ?", [*args, inbox]
        return [Job.from_row(r) for r in self._conn.execute(sql + " ORDER BY id", args)]

    @_locked
    def ready(self, now: float, inboxes: Sequence[str]) -> list[Job]:
        """Queued jobs due now in these inboxes: priority first, then the largest first."""
        if not inboxes:
            return []
        marks = ", ".join("?" * len(inboxes))
        rows = self._conn.execute(
            f"SELECT * FROM jobs WHERE state = 'queued' AND not_before <= ? "  # noqa: S608
            f"AND inbox IN ({marks}) ORDER BY priority, size DESC, id", (now, *inboxes))
        return [Job.from_row(r) for r in rows]

    @_locked
    def done_with_hash(self, inbox: str, sha256: str) -> Job | None:
        row = self._conn.execute(
            "SELECT * FROM jobs WHERE inbox = ? AND sha256 = ? AND state = 'done' LIMIT 1",
            (inbox, sha256)).fetchone()
        return Job.from_row(row) if row else None

    @_locked
    def counts(self, *states: JobState) -> dict[str, dict[str, int]]:
        """{inbox: {state: count}}, over the given states (all when none are given)."""
        result: dict[str, dict[str, int]] = {}
        where = f"WHERE state IN ({', '.join('?' * len(states))})" if states else ""
        for inbox, state, n in self._conn.execute(
                f"SELECT inbox, state, COUNT(*) FROM jobs {where} "  # noqa: S608
                "GROUP BY inbox, state", states):
            result.setdefault(inbox, {})[state] = n
        return result

    @_locked
    def finished_since(self, since: float) -> list[Job]:
        rows = self._conn.execute(
            "SELECT * FROM jobs WHERE finished >= ? AND state = 'done'", (since,))
        return [Job.from_row(r) for r in rows]

    # --- transitions ------------------------------------------------------------------------

    @_locked
    def add_seen(self, inbox: str, rel_path: str, size: int, mtime_ns: int, priority: int,
                 now: float) -> Job:
        """The active job for this path, created in state seen when there is none."""
        if (job := self.active(inbox, rel_path)) is not None:
            return job
        cur = self._conn.execute(
            "INSERT INTO jobs (inbox, rel_path, state, size, mtime_ns, priority, created, updated)"
            " VALUES (?, ?, 'seen', ?, ?, ?, ?, ?)",
            (inbox, rel_path, size, mtime_ns, priority, now, now))
        assert cur.lastrowid is not None
        return self.get(cur.lastrowid)

    @_locked
    def update(self, /, job_id: int, now: float, **fields: Any) -> Job:
        """Set columns of one job; dicts are stored as JSON, enums by value."""
        fields["updated"] = now
        columns = ", ".join(f"{name} = ?" for name in fields)
        values = [_column_value(v) for v in fields.values()]
        self._conn.execute(f"UPDATE jobs SET {columns} WHERE id = ?",  # noqa: S608
                           (*values, job_id))
        return self.get(job_id)

    @_locked
    def delete(self, job_id: int) -> None:
        self._conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    @_locked
    def requeue_interrupted(self, now: float) -> list[Job]:
        """At start-up: jobs left running by a crash or shutdown go back to queued."""
        with self.transaction():
            jobs = self.in_states(JobState.RUNNING)
            self._conn.execute(
                "UPDATE jobs SET state = 'queued', updated = ? WHERE state = 'running'", (now,))
        return jobs

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @_locked
    def writable(self) -> bool:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            return False
        return True


def _column_value(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def _check(conn: sqlite3.Connection, path: Path) -> None:
    result = conn.execute("PRAGMA quick_check").fetchone()
    if result is None or result[0] != "ok":
        raise JournalError(f"the journal {path} is damaged ({result[0] if result else '?'}); "
                           "nothing was changed; move it aside to start afresh")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise JournalError(f"the journal {path} was written by a newer traxd (schema {version})")


class StateLock:
    """An exclusive lock on the state directory: one daemon per journal."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "traxd.lock"
        self._handle: TextIO | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            raise AlreadyRunning(f"another traxd uses {self.path.parent}") from exc
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
