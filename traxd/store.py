"""The journal's SQLite file: schema, checks, one writer thread with group commit, reads.

Writes are queued by the journal in the order its transitions happen and committed by one
thread, many to a transaction. A caller that is about to move a file awaits `durable()`;
everyone else goes on. Reads of history (hashes of done files, failed jobs) run on a
connection of their own, in whatever thread calls them, never on the event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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
HOT_QUERIES = (LIVE_ROWS, FINISHED_COUNTS, DONE_WITH_HASH, FAILED_ROWS, DONE_FILES, LAST_ID)

T = TypeVar("T")
Statement = tuple[str, Sequence[Any]]


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
        self._readers = threading.local()
        self._log = get_logger(component="journal")
        self._thread = threading.Thread(target=self._write_loop, name="journal-writer",
                                        daemon=True)

    @classmethod
    def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = _connect(path)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            _check(conn, path)
            conn.executescript(SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
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
                while not self._pending and not self._closing:
                    self._cond.wait()
                batch, self._pending = self._pending, []
                last = self._submitted
            error = self._commit(batch) if batch else None
            with self._cond:
                self._committed = last
                due = [w for w in self._waiters if w.target <= last]
                self._waiters = [w for w in self._waiters if w.target > last]
                finished = self._closing and not self._pending
            for waiter in due:
                waiter.resolve(error)
            if finished:
                return

    def _commit(self, batch: list[Statement]) -> BaseException | None:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            for sql, params in batch:
                self._conn.execute(sql, params)
            self._conn.execute("COMMIT")
        except Exception as exc:  # the writer must outlive any one bad group
            self._log.exception("journal_write_failed", statements=len(batch))
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            self.problem = str(exc)
            return JournalError(f"cannot write the journal {self.path}: {exc}")
        self.problem = None
        return None

    # --- reading ----------------------------------------------------------------------------

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Rows of a query, on this thread's own connection. Blocking: not on the loop."""
        return self._reader().execute(sql, params).fetchall()

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._readers, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            self._readers.conn = conn
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
