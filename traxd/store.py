"""The journal's SQLite file: schema, checks, one writer thread with group commit, reads.

Writes are queued by the journal in the order its transitions happen and committed by one
thread, many to a transaction. A caller that is about to move a file awaits `durable()`;
everyone else goes on. Reads of history (hashes of done files, failed jobs) run on a
connection of their own, in whatever thread calls them, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from traxd import metrics
from traxd.errors import JournalError
from traxd.logs import get_logger

SCHEMA_VERSION = 2

SCHEMA = """
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
CREATE INDEX IF NOT EXISTS jobs_by_state_inbox ON jobs(state, inbox);
CREATE INDEX IF NOT EXISTS jobs_by_hash ON jobs(inbox, sha256) WHERE state = 'done';
"""

# The queries the daemon runs while it works, written with literal states so that SQLite
# can use the partial and state indexes (a bound parameter cannot match a partial index).
LIVE_ROWS = ("SELECT * FROM jobs WHERE state IN ('seen', 'queued', 'running', 'waiting')"
             " ORDER BY id")
FINISHED_COUNTS = ("SELECT inbox, state, COUNT(*) FROM jobs"
                   " WHERE state IN ('done', 'failed', 'duplicate') GROUP BY state, inbox")
DONE_WITH_HASH = "SELECT id FROM jobs WHERE inbox = ? AND sha256 = ? AND state = 'done' LIMIT 1"
FAILED_ROWS = "SELECT * FROM jobs WHERE state = 'failed' ORDER BY id"
DONE_FILES = "SELECT rel_path, size, mtime_ns FROM jobs WHERE state = 'done'"
LAST_ID = "SELECT MAX(id) FROM jobs"
FAILED_UNMOVED = ("SELECT 1 FROM jobs WHERE state = 'failed' AND inbox = ? AND rel_path = ?"
                  " AND size = ? AND mtime_ns = ? AND claimed_path IS NULL LIMIT 1")
FINISHED_JOB = ("SELECT * FROM jobs WHERE id = ? AND state IN ('done', 'failed', 'duplicate')")
LAST_DONE = "SELECT inbox, MAX(finished) FROM jobs WHERE state = 'done' GROUP BY inbox"
HOT_QUERIES = (LIVE_ROWS, FINISHED_COUNTS, DONE_WITH_HASH, FAILED_ROWS, DONE_FILES, LAST_ID,
               FAILED_UNMOVED, LAST_DONE, FINISHED_JOB)

T = TypeVar("T")
Statement = tuple[str, Sequence[Any]]

# SQLite's answers that say the place is the trouble, not the statement: a group that gets one
# is kept and committed when the place recovers (space freed, lock gone), never dropped.
PLACE_ERRORS = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY,
                          sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_CANTOPEN})
RETRY_FIRST, RETRY_MAX = 0.05, 2.0  # seconds between tries while the place is in trouble
FILE_CHECK = 5.0  # seconds: an idle writer looks this often whether its file is still there


@dataclass
class _Waiter:
    target: int  # the write sequence number that must be committed
    resolve: Callable[[BaseException | None], None]


class Store:
    """One SQLite file, one writer thread, group commit."""

    def __init__(self, path: Path, writer: sqlite3.Connection) -> None:
        self.path = path
        self._conn = writer
        self._cond = threading.Condition()
        self._pending: list[Statement] = []
        self._waiters: list[_Waiter] = []
        self._submitted = 0
        self._committed = 0
        self._closing = False
        self.problem: str | None = None  # why the last commit failed; None when it worked
        self.disk_full = False  # writes wait for space; no new work should start
        self._readers = threading.local()
        self._generation = 0  # the writer's file; a reader on an older one connects again
        self._identity = _identity(path)
        self._log = get_logger(component="journal")
        self._thread = threading.Thread(target=self._write_loop, name="journal-writer",
                                        daemon=True)

    @classmethod
    def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = _open_writer(path)
            _check(conn, path)
            conn.executescript(SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            if _primary_code(exc) in PLACE_ERRORS:
                raise JournalError(
                    f"cannot write the journal {path}: {exc}. The journal is not damaged: "
                    f"{_place_advice(exc)}, then start traxd again.") from exc
            raise JournalError(
                f"cannot use the journal {path}: {exc}. Nothing was changed; move the file "
                "aside to start with an empty journal (files in the inboxes are found again)."
            ) from exc
        store = cls(path, conn)
        store._thread.start()
        return store

    # --- writing ----------------------------------------------------------------------------

    def write(self, sql: str, params: Sequence[Any]) -> None:
        """Queue one statement; it commits with the next group."""
        with self._cond:
            self._pending.append((sql, params))
            self._submitted += 1
            self._cond.notify()

    async def durable(self) -> None:
        """Return once everything written so far is committed (fsynced)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def resolve(error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, future, error)

        if self._register(resolve):
            await future

    def sync(self) -> None:
        """Block until everything written so far is committed (start-up, tests, threads)."""
        done = threading.Event()
        failure: list[BaseException] = []

        def resolve(error: BaseException | None) -> None:
            failure.extend([error] if error else [])
            done.set()

        if self._register(resolve):
            done.wait()
        if failure:
            raise failure[0]

    def _register(self, resolve: Callable[[BaseException | None], None]) -> bool:
        with self._cond:
            if self._committed >= self._submitted:
                return False
            self._waiters.append(_Waiter(self._submitted, resolve))
            self._cond.notify()
            return True

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                if not self._pending and not self._closing:
                    self._cond.wait(FILE_CHECK)
                batch, self._pending = self._pending, []
                last = self._submitted
            try:
                self._keep_file()
            except (OSError, sqlite3.Error):  # tried again at the next look
                self._log.exception("journal_file_not_restored", path=str(self.path))
            error = self._commit_held(batch) if batch else None
            with self._cond:
                self._committed = last
                due = [w for w in self._waiters if w.target <= last]
                self._waiters = [w for w in self._waiters if w.target > last]
                finished = self._closing and not self._pending
            for waiter in due:
                waiter.resolve(error)
            if finished:
                return

    def _commit_held(self, batch: list[Statement]) -> BaseException | None:
        """Commit the group; while the place is in trouble (disk full, I/O error, locked),
        try again and again, waiting longer each time, until it works or the store closes."""
        pause = RETRY_FIRST
        while True:
            try:
                self._transaction(batch)
            except sqlite3.Error as exc:
                if _primary_code(exc) not in PLACE_ERRORS:
                    return self._commit_each(batch)
                self._held(exc)
                with self._cond:
                    if self._closing:
                        return JournalError(f"cannot write the journal {self.path}: {exc}")
                    self._cond.wait(pause)
                pause = min(pause * 2, RETRY_MAX)
                continue
            self._recovered()
            return None

    def _commit_each(self, batch: list[Statement]) -> BaseException | None:
        """A group with a statement SQLite refuses: each statement alone, so that only the
        refused one is lost (a bug: logged with its traceback)."""
        first: BaseException | None = None
        for sql, params in batch:
            try:
                self._transaction([(sql, params)])
            except sqlite3.Error as exc:
                self._log.exception("journal_write_failed", statement=sql.split("(")[0])
                self.problem = str(exc)
                first = first or JournalError(f"cannot write the journal {self.path}: {exc}")
        return first

    def _transaction(self, batch: list[Statement]) -> None:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            for sql, params in batch:
                self._conn.execute(sql, params)
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def _held(self, exc: sqlite3.Error) -> None:
        if self.problem is None:
            self._log.error("journal_write_held", error=str(exc), fix=_place_advice(exc))
        self.problem = str(exc)
        self.disk_full = _primary_code(exc) == sqlite3.SQLITE_FULL
        metrics.THROTTLED.labels(reason="disk_full").set(int(self.disk_full))

    def _recovered(self) -> None:
        if self.problem is not None:
            self._log.warning("journal_writable_again")
        self.problem = None
        if self.disk_full:
            self.disk_full = False
            metrics.THROTTLED.labels(reason="disk_full").set(0)

    def _keep_file(self) -> None:
        """The journal file deleted or replaced under the running daemon is written again
        from this connection (which still holds every row); anything else found at its
        path is moved aside first."""
        try:
            if _identity(self.path) == self._identity:
                return
        except FileNotFoundError:
            pass
        self._log.error("journal_file_lost", path=str(self.path),
                        fix="traxd writes it again from what it holds; do not remove it "
                        "while traxd runs (stop traxd first)")
        restored = self.path.with_name(self.path.name + ".restoring")
        restored.unlink(missing_ok=True)
        with contextlib.closing(sqlite3.connect(restored)) as copy:
            self._conn.backup(copy)
        if self.path.exists():
            os.replace(self.path, self.path.with_name(f"{self.path.name}.found-{time.time():.0f}"))
        self._conn.close()
        os.replace(restored, self.path)
        self._conn = _open_writer(self.path)
        self._identity, self._generation = _identity(self.path), self._generation + 1
        self._log.warning("journal_file_restored", path=str(self.path))

    # --- reading ----------------------------------------------------------------------------

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Rows of a query, on this thread's own connection. Blocking: not on the loop."""
        return self._reader().execute(sql, params).fetchall()

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._readers, "conn", None)
        if conn is not None and self._readers.generation != self._generation:
            conn.close()
            conn = None
        if conn is None:
            conn = _connect(self.path)
            self._readers.conn, self._readers.generation = conn, self._generation
        return conn

    def explain(self, sql: str) -> list[str]:
        """EXPLAIN QUERY PLAN details of a query (for the index tests)."""
        params = ["x"] * sql.count("?")
        return [row[3] for row in self.read("EXPLAIN QUERY PLAN " + sql, params)]

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        self._conn.close()
        reader = getattr(self._readers, "conn", None)
        if reader is not None:
            reader.close()
            self._readers.conn = None


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _primary_code(exc: sqlite3.Error) -> int:
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF


def _place_advice(exc: sqlite3.Error) -> str:
    if _primary_code(exc) == sqlite3.SQLITE_FULL:
        return "the disk holding it is full; free some space"
    return "check that its folder is writable and its disk healthy"


def _open_writer(path: Path) -> sqlite3.Connection:
    conn = _connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def _identity(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_dev, info.st_ino


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=5.0, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


def _check(conn: sqlite3.Connection, path: Path) -> None:
    result = conn.execute("PRAGMA quick_check").fetchone()
    if result is None or result[0] != "ok":
        raise JournalError(f"the journal {path} is damaged ({result[0] if result else '?'}); "
                           "nothing was changed; move it aside to start afresh")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise JournalError(f"the journal {path} was written by a newer traxd (schema {version})")
