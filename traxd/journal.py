"""The job journal: a state machine whose live rows are kept in memory, written behind.

Every change of a job is a named transition with a guard (the states it may start from);
one that does not hold raises `TransitionError` instead of overwriting. Transitions update
memory at once, on the caller's thread (the event loop), and queue their SQL for the one
writer thread (`Store`), which commits in groups. A caller about to move a file first
awaits `durable()`: the journal records a move before the move happens.

Only live jobs (seen, queued, running, waiting) are held in memory; finished ones are rows
on disk, counted by state, and read back only by the operations that need them (history
reads run in a thread).
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import json
import operator
import os
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TextIO

from traxd.errors import AlreadyRunning, TraxdError
from traxd.readyset import Entry, ReadySet
from traxd.store import (
    DONE_FILES,
    DONE_WITH_HASH,
    FAILED_ROWS,
    FAILED_UNMOVED,
    FINISHED_COUNTS,
    FINISHED_JOB,
    LAST_DONE,
    LAST_ID,
    LIVE_ROWS,
    Store,
)

RECENT_WINDOW = 3600.0  # seconds of finish times kept for the rate in `traxd status`


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
S = JobState


@dataclass(frozen=True)
class Transition:
    name: str
    sources: frozenset[JobState]
    target: JobState | None  # None: the state stays (or, for `finish`, is the job's outcome)


def _t(name: str, sources: Iterable[JobState], target: JobState | None) -> Transition:
    return Transition(name, frozenset(sources), target)


# The life of a job, defined once.
QUEUE = _t("queue", [S.SEEN], S.QUEUED)  # settled and hashed
UNSETTLE = _t("unsettle", [S.QUEUED], S.SEEN)  # changed since it settled: watched again
START = _t("start", [S.QUEUED], S.RUNNING)  # claimed into processing/
STEP_DONE = _t("step_done", [S.RUNNING], None)
PLAN_OUTPUTS = _t("plan_outputs", [S.RUNNING, S.QUEUED], None)  # queued: a duplicate's copies
DESTINE = _t("destine", ACTIVE, None)  # where the original goes, before it moves
FINISH = _t("finish", ACTIVE, None)  # the move is done: the outcome becomes the state
RETRY = _t("retry", [S.RUNNING, S.QUEUED], S.QUEUED)  # back-off, then again
HOLD = _t("hold", [S.RUNNING], S.WAITING)  # its backend is paused
RELEASE = _t("release", [S.WAITING], S.QUEUED)  # the backend was resumed
INTERRUPT = _t("interrupt", [S.RUNNING], S.QUEUED)  # shutdown or crash: resumes later
FORGET = _t("forget", [S.SEEN], None)  # vanished before it settled: no trace kept


class TransitionError(TraxdError):
    """A transition that does not hold for the job's current state."""


@dataclass(frozen=True, slots=True)
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

    @property
    def key(self) -> tuple[str, str]:
        return (self.inbox, self.rel_path)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        values = dict(row)
        values["state"] = JobState(values["state"])
        for key in PATH_COLUMNS:
            if isinstance(values[key], bytes):
                values[key] = os.fsdecode(values[key])
        for key in ("outputs", "error"):
            values[key] = json.loads(values[key]) if values[key] else None
        return cls(**values)


Key = tuple[str, str]
# Names are bytes on POSIX: a name that is not UTF-8 (held in a str with surrogate escapes)
# is stored as a BLOB of its bytes, and read back the same way.
PATH_COLUMNS = ("rel_path", "claimed_path", "final_path")


class Journal:
    """The live jobs in memory, the truth on disk. Not thread-safe: use it from one thread
    (the event loop); the history reads (`done_with_hash`, `failed`) may run in a thread."""

    def __init__(self, store: Store, rows: Iterable[sqlite3.Row], finished: Counter[Key],
                 last_id: int, clock: Callable[[], float]) -> None:
        self.store = store
        self.path = store.path
        self.clock = clock
        self._live: dict[int, Job] = {}
        self._unclaimed: dict[Key, int] = {}
        self._claiming: dict[Key, int] = {}
        self._versions: dict[int, int] = {}  # queued job -> its current ready-set entry
        self._version_seq = itertools.count(1)
        self.counts: Counter[Key] = Counter(finished)  # (inbox, state value) -> jobs
        self.recent: deque[tuple[float, str]] = deque()  # (finished, inbox) of done jobs
        self.ready = ReadySet(self._is_current)
        self._next_id = last_id + 1
        self.made = 0  # Job objects made by transitions so far (for traxd.heap)
        for row in rows:
            self._remember(Job.from_row(row), enqueue=True)

    @classmethod
    def open(cls, path: Path, clock: Callable[[], float] = time.time) -> Journal:
        store = Store.open(path)
        rows = store.read(LIVE_ROWS)
        finished: Counter[Key] = Counter(
            {(inbox, state): n for inbox, state, n in store.read(FINISHED_COUNTS)})
        last = store.read(LAST_ID)[0][0] or 0
        return cls(store, rows, finished, last, clock)

    def close(self) -> None:
        self.store.close()

    async def durable(self) -> None:
        await self.store.durable()

    def sync(self) -> None:
        self.store.sync()

    # --- live jobs (memory) -----------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        return self._live[job_id]

    def __contains__(self, job_id: int) -> bool:
        return job_id in self._live

    def unclaimed(self, inbox: str, rel_path: str) -> Job | None:
        """The live job of a file still in the inbox (not yet claimed), if any."""
        job_id = self._unclaimed.get((inbox, rel_path))
        return self._live[job_id] if job_id is not None else None

    def claiming(self, inbox: str, rel_path: str) -> Job | None:
        """The live job that chose a processing/ path for this inbox file and has not
        finished; its rename may not have happened yet (the claim, repeated, completes it)."""
        job_id = self._claiming.get((inbox, rel_path))
        return self._live[job_id] if job_id is not None else None

    def live_count(self) -> int:
        """Live jobs (not finished)."""
        return len(self._live)

    def live(self, *states: JobState, inbox: str | None = None) -> list[Job]:
        """Live jobs in these states (all live states when none are given), oldest first."""
        wanted = set(states or ACTIVE)
        return [j for j in self._live.values()
                if j.state in wanted and (inbox is None or j.inbox == inbox)]

    def count(self, inbox: str, *states: JobState) -> int:
        return sum(self.counts[(inbox, s.value)] for s in states)

    def next_ready(self, inboxes: Collection[str]) -> Job | None:
        """Take the next released job of these inboxes; it stays queued until it starts."""
        entry = self.ready.pop(inboxes)
        if entry is None:
            return None
        job = self._live[entry.job_id]
        self.take(job)  # other entries of it are stale now
        return job

    def take(self, job: Job) -> None:
        """Someone other than the pool handles this queued job: the pool will not pick it."""
        self._versions.pop(job.id, None)

    def _is_current(self, entry: Entry) -> bool:
        job = self._live.get(entry.job_id)
        return (job is not None and job.state is S.QUEUED
                and self._versions.get(entry.job_id) == entry.version)

    # --- history (blocking reads: call them in a thread) ------------------------------------

    def done_with_hash(self, inbox: str, sha256: str) -> int | None:
        rows = self.store.read(DONE_WITH_HASH, (inbox, sha256))
        return int(rows[0][0]) if rows else None

    def failed(self) -> list[Job]:
        return [Job.from_row(r) for r in self.store.read(FAILED_ROWS)]

    def failed_unmoved(self, inbox: str, rel_path: str, size: int, mtime_ns: int) -> bool:
        """Whether this very file (same size and mtime) failed without being claimed (it
        could not be moved out of its folder): it is left alone until it changes."""
        return bool(self.store.read(FAILED_UNMOVED, (inbox, rel_path, size, mtime_ns)))

    def finished_job(self, job_id: int) -> Job | None:
        rows = self.store.read(FINISHED_JOB, (job_id,))
        return Job.from_row(rows[0]) if rows else None

    def last_done_times(self) -> dict[str, float]:
        """When each inbox last had a file done (for the metrics after a restart)."""
        return {inbox: float(when) for inbox, when in self.store.read(LAST_DONE)
                if when is not None}

    def done_files(self) -> set[tuple[str, int, int]]:
        """(rel_path, size, mtime_ns) of every file done (`traxd batch` resumes by it)."""
        return {(r[0], r[1], r[2]) for r in self.store.read(DONE_FILES)}

    # --- transitions ------------------------------------------------------------------------

    def add_seen(self, inbox: str, rel_path: str, size: int, mtime_ns: int,
                 priority: int) -> Job:
        """The live unclaimed job for this path, created in state seen when there is none."""
        if (job := self.unclaimed(inbox, rel_path)) is not None:
            return job
        now = self.clock()
        job = Job(self._next_id, inbox, rel_path, S.SEEN, size, mtime_ns, None, priority, 0, 0,
                  None, None, None, None, 0.0, None, None, None, now, now, None, None)
        self._next_id += 1
        self.made += 1
        self.store.write(
            "INSERT INTO jobs (id, inbox, rel_path, state, size, mtime_ns, priority, created,"
            " updated) VALUES (?, ?, ?, 'seen', ?, ?, ?, ?, ?)",
            (job.id, inbox, _column_value(rel_path), size, mtime_ns, priority, now, now))
        self._remember(job, enqueue=False)
        return job

    def forget(self, job: Job) -> None:
        """A seen file vanished before it settled: no trace is kept."""
        self._check(self._live.get(job.id), FORGET)
        self.store.write("DELETE FROM jobs WHERE id = ?", (job.id,))
        self._drop(self._live[job.id])

    def remove_failed(self, job: Job) -> None:
        """A failed file is taken back into its inbox (`traxd retry`): its row goes."""
        self.store.write("DELETE FROM jobs WHERE id = ? AND state = 'failed'", (job.id,))
        self.counts[(job.inbox, S.FAILED.value)] -= 1

    def queue(self, job: Job, sha256: str | None, size: int, mtime_ns: int) -> Job:
        return self._apply(QUEUE, job, sha256=sha256, size=size, mtime_ns=mtime_ns)

    def unsettle(self, job: Job) -> Job:
        return self._apply(UNSETTLE, job)

    def start(self, job: Job, claimed_path: str, batch_id: str | None = None) -> Job:
        return self._apply(START, job, claimed_path=claimed_path, batch_id=batch_id,
                           started=job.started or self.clock())

    def step_done(self, job: Job, steps: int) -> Job:
        return self._apply(STEP_DONE, job, step=steps, attempts=0)

    def plan_outputs(self, job: Job, outputs: dict[str, str]) -> Job:
        return self._apply(PLAN_OUTPUTS, job, outputs=outputs)

    def destine(self, job: Job, outcome: JobState, final_path: str,
                error: dict[str, Any] | None) -> Job:
        if not outcome.terminal:
            raise TransitionError(f"job {job.id}: {outcome.value} is not an outcome")
        return self._apply(DESTINE, job, outcome=outcome.value, final_path=final_path,
                           error=error)

    def finish(self, job: Job) -> Job:
        current = self._check(self._live.get(job.id), FINISH)
        if current.outcome is None or current.final_path is None:
            raise TransitionError(f"job {job.id}: finish before its destination was written")
        outcome = JobState(current.outcome)
        done = self._apply(Transition("finish", FINISH.sources, outcome), job,
                           finished=self.clock())
        if outcome is S.DONE:
            self.recent.append((self.clock(), job.inbox))
        return done

    def retry(self, job: Job, not_before: float, error: dict[str, Any] | None = None,
              lower_priority: bool = True) -> Job:
        current = self._live.get(job.id, job)
        return self._apply(RETRY, job, attempts=current.attempts + 1, not_before=not_before,
                           priority=current.priority + (1 if lower_priority else 0),
                           error=error if error is not None else current.error)

    def hold(self, job: Job, backend: str, error: dict[str, Any]) -> Job:
        return self._apply(HOLD, job, waiting_on=backend, error=error)

    def release(self, job: Job) -> Job:
        return self._apply(RELEASE, job, waiting_on=None)

    def interrupt(self, job: Job) -> Job:
        return self._apply(INTERRUPT, job)

    def interrupt_all(self) -> list[Job]:
        """At start-up: jobs left running by a crash or a stop go back to queued."""
        return [self.interrupt(job) for job in self.live(S.RUNNING)]

    def release_all(self, inbox: str | None = None) -> list[Job]:
        return [self.release(job) for job in self.live(S.WAITING, inbox=inbox)]

    # --- the machinery ----------------------------------------------------------------------

    def _check(self, job: Job | None, transition: Transition) -> Job:
        if job is None:
            raise TransitionError(f"{transition.name}: the job is not live")
        if job.state not in transition.sources:
            raise TransitionError(f"job {job.id}: cannot {transition.name} from "
                                  f"{job.state.value}")
        return job

    def _apply(self, transition: Transition, job: Job, **changes: Any) -> Job:
        current = self._check(self._live.get(job.id), transition)
        state = transition.target or current.state
        columns = {"state": state, "updated": self.clock(), **changes}
        new = _evolve(current, columns)
        self.made += 1
        self.store.write(_update_sql(tuple(columns)),
                         (*map(_column_value, columns.values()), job.id))
        requeued = transition.target is S.QUEUED
        self._drop(current, keep_entry=state is current.state and not requeued)
        if state.terminal:
            self.counts[(new.inbox, state.value)] += 1
            self._trim_recent()
        else:
            self._remember(new, enqueue=requeued)
        return new

    def _remember(self, job: Job, *, enqueue: bool) -> None:
        self._live[job.id] = job
        self.counts[(job.inbox, job.state.value)] += 1
        if job.claimed_path is None:
            self._unclaimed[job.key] = job.id
        elif job.final_path is None:
            self._claiming[job.key] = job.id
        if enqueue and job.state is S.QUEUED:
            version = self._versions[job.id] = next(self._version_seq)
            self.ready.add(Entry(job.priority, -job.size, job.id, version, job.inbox,
                                 job.not_before))

    def _drop(self, job: Job, *, keep_entry: bool = False) -> None:
        del self._live[job.id]
        self.counts[(job.inbox, job.state.value)] -= 1
        if self._unclaimed.get(job.key) == job.id:
            del self._unclaimed[job.key]
        if self._claiming.get(job.key) == job.id:
            del self._claiming[job.key]
        if not keep_entry:
            self._versions.pop(job.id, None)

    def _trim_recent(self) -> None:
        horizon = self.clock() - RECENT_WINDOW
        while self.recent and self.recent[0][0] < horizon:
            self.recent.popleft()


_FIELDS = Job.__slots__
_values_of = operator.attrgetter(*_FIELDS)


def _evolve(job: Job, changes: dict[str, Any]) -> Job:
    """`dataclasses.replace`, at half its cost (it runs on every transition)."""
    values = dict(zip(_FIELDS, _values_of(job), strict=True))
    values.update(changes)
    return Job(**values)


@functools.cache
def _update_sql(columns: tuple[str, ...]) -> str:
    return f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?"  # noqa: S608


def _column_value(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)  # ASCII: surrogate escapes survive
    if isinstance(value, str) and not value.isascii():
        return _storable(value)
    return value


def _storable(text: str) -> str | bytes:
    try:
        text.encode()
    except UnicodeEncodeError:
        return os.fsencode(text)
    return text


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
