"""Journal: the state machine, the ready set's order, group commit, recovery, damage, locking."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from tests.helpers import wait_until
from traxd.errors import AlreadyRunning, JournalError
from traxd.journal import Job, JobState, Journal, StateLock, TransitionError
from traxd.store import HOT_QUERIES


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    return Journal.open(tmp_path / "j.sqlite3")


def queued(journal: Journal, name: str, size: int = 10, priority: int = 5) -> Job:
    job = journal.add_seen("in", name, size, 1, priority)
    return journal.queue(job, "ab" * 32, size, 1)


def rows(path: Path) -> dict[int, sqlite3.Row]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return {r["id"]: r for r in conn.execute("SELECT * FROM jobs")}
    finally:
        conn.close()


def test_a_file_in_the_inbox_has_one_job(journal: Journal) -> None:
    first = journal.add_seen("in", "a.mp3", 10, 1, 5)
    again = journal.add_seen("in", "a.mp3", 10, 1, 5)
    assert first.id == again.id
    assert first.state is JobState.SEEN


def test_once_claimed_the_name_is_free_for_a_new_file(journal: Journal) -> None:
    first = queued(journal, "a.mp3")
    journal.start(first, "/p/a.mp3")
    second = journal.add_seen("in", "a.mp3", 11, 2, 5)
    assert second.id != first.id
    assert journal.claiming("in", "a.mp3") == journal.get(first.id)
    assert journal.unclaimed("in", "a.mp3") == second


def test_a_transition_that_does_not_hold_is_refused(journal: Journal) -> None:
    # Given a job that was only seen
    job = journal.add_seen("in", "a.mp3", 10, 1, 5)
    # When it is started, held or finished without being queued and destined
    # Then each is refused and the job is left as it was
    with pytest.raises(TransitionError, match="cannot start from seen"):
        journal.start(job, "/p/a.mp3")
    with pytest.raises(TransitionError, match="cannot hold from seen"):
        journal.hold(job, "openai", {})
    with pytest.raises(TransitionError, match="before its destination"):
        journal.finish(job)
    assert journal.get(job.id).state is JobState.SEEN
    # And a finished job is no longer live: nothing can move it again
    running = journal.start(journal.queue(job, None, 10, 1), "/p/a.mp3")
    done = journal.finish(journal.destine(running, JobState.DONE, "/d/a.mp3", None))
    with pytest.raises(TransitionError, match="not live"):
        journal.retry(done, 0.0)


def test_ready_order_is_priority_then_largest_first(journal: Journal) -> None:
    names = {}
    for name, size, priority in [("small", 1, 5), ("big", 100, 5), ("urgent", 2, 1),
                                 ("mid", 50, 5)]:
        names[queued(journal, name, size, priority).id] = name
    # Nothing runs before the batch tick releases it
    assert journal.next_ready(["in"]) is None
    journal.ready.release(now=10.0)
    order = []
    while (job := journal.next_ready(["in"])) is not None:
        order.append(names[job.id])
    assert order == ["urgent", "big", "mid", "small"]
    assert journal.next_ready(["other"]) is None


def test_a_retried_job_waits_for_its_time_and_is_taken_once(journal: Journal) -> None:
    job = queued(journal, "a.mp3")
    journal.ready.release(now=1.0)
    running = journal.start(journal.next_ready(["in"]) or job, "/p/a.mp3")
    # When it is retried for time 50, then interrupted and queued again meanwhile
    journal.retry(running, not_before=50.0)
    journal.ready.release(now=10.0)
    assert journal.next_ready(["in"]) is None
    journal.ready.release(now=50.0)
    taken = journal.next_ready(["in"])
    # Then it is handed out once, with the lower priority of a retry
    assert taken is not None and taken.id == job.id and taken.priority == job.priority + 1
    assert journal.next_ready(["in"]) is None


def test_counts_follow_the_transitions_and_survive_a_restart(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j.sqlite3")
    a, b = queued(journal, "a.mp3"), queued(journal, "b.mp3")
    journal.finish(journal.destine(journal.start(a, "/p/a"), JobState.DONE, "/d/a", None))
    journal.finish(journal.destine(b, JobState.FAILED, "/f/b", {"message": "bad"}))
    assert journal.count("in", JobState.DONE) == journal.count("in", JobState.FAILED) == 1
    assert journal.count("in", JobState.QUEUED, JobState.RUNNING) == 0
    journal.close()
    again = Journal.open(tmp_path / "j.sqlite3")
    assert again.count("in", JobState.DONE) == again.count("in", JobState.FAILED) == 1
    assert [j.rel_path for j in again.failed()] == ["b.mp3"]


def test_running_jobs_go_back_to_queued_at_start(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j.sqlite3")
    job = journal.step_done(journal.start(queued(journal, "a.mp3"), "/p/a.mp3"), 2)
    journal.close()
    reopened = Journal.open(tmp_path / "j.sqlite3")
    assert [j.id for j in reopened.interrupt_all()] == [job.id]
    again = reopened.get(job.id)
    assert again.state is JobState.QUEUED
    assert again.step == 2
    assert again.claimed_path == "/p/a.mp3"


async def test_writes_are_committed_in_groups_and_awaited_before_moves(tmp_path: Path) -> None:
    # Given a journal whose writer is held up (a slow disk)
    journal = Journal.open(tmp_path / "j.sqlite3")
    gate = threading.Event()
    commit = journal.store._commit_held
    commits: list[int] = []

    def slow_commit(batch: list[tuple[str, object]]) -> BaseException | None:
        gate.wait(10)
        commits.append(len(batch))
        return commit(batch)  # type: ignore[arg-type]

    journal.store._commit_held = slow_commit  # type: ignore[assignment,method-assign]
    # When 500 transitions happen and a mover awaits durability
    for n in range(250):
        queued(journal, f"f{n}.mp3")
    waiting = asyncio.create_task(journal.durable())
    await asyncio.sleep(0)
    assert not waiting.done()
    gate.set()
    await asyncio.wait_for(waiting, 10)
    # Then they took a handful of commits, not one each, and all are on disk
    assert sum(commits) == 500 and len(commits) <= 3
    assert len(rows(tmp_path / "j.sqlite3")) == 250
    journal.close()


def test_a_refused_statement_costs_only_itself_not_its_group(tmp_path: Path) -> None:
    # Given a group of writes in which SQLite refuses one statement (a bug)
    store = Journal.open(tmp_path / "j.sqlite3").store
    store.write("INSERT INTO jobs (inbox, rel_path, state, created, updated)"
                " VALUES ('in', 'a.mp3', 'seen', 0, 0)", ())
    store.write("INSERT INTO no_such_table VALUES (1)", ())
    store.write("INSERT INTO jobs (inbox, rel_path, state, created, updated)"
                " VALUES ('in', 'b.mp3', 'seen', 0, 0)", ())
    # When it is committed
    with pytest.raises(JournalError, match="no_such_table"):
        store.sync()
    # Then the statements around it are on disk
    names = sorted(r["rel_path"] for r in rows(tmp_path / "j.sqlite3").values())
    assert names == ["a.mp3", "b.mp3"]
    store.close()


def test_a_group_that_meets_a_locked_journal_waits_and_is_committed_later(tmp_path: Path) -> None:
    # Given another connection that holds the journal's write lock
    journal = Journal.open(tmp_path / "j.sqlite3")
    holder = sqlite3.connect(tmp_path / "j.sqlite3", isolation_level=None, timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    journal.store._conn.execute("PRAGMA busy_timeout=0")
    # When transitions are written
    queued(journal, "a.mp3")
    synced = threading.Thread(target=journal.store.sync)
    synced.start()
    wait_until(lambda: journal.store.problem is not None, 10, message="held")
    assert synced.is_alive() and rows(tmp_path / "j.sqlite3") == {}
    # Then once the lock is gone they are committed, nothing lost
    holder.execute("ROLLBACK")
    synced.join(10)
    assert not synced.is_alive() and journal.store.problem is None
    assert [r["rel_path"] for r in rows(tmp_path / "j.sqlite3").values()] == ["a.mp3"]
    journal.close()


def test_hot_queries_use_an_index(journal: Journal) -> None:
    for sql in HOT_QUERIES:
        plan = " | ".join(journal.store.explain(sql))
        scans = [d for d in journal.store.explain(sql)
                 if d.startswith("SCAN") and "INDEX" not in d]
        assert not scans, f"{sql}: {plan}"


def test_a_damaged_journal_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    before = path.read_bytes()
    with pytest.raises(JournalError, match=r"move it aside|Nothing was changed"):
        Journal.open(path)
    assert path.read_bytes() == before


def test_one_daemon_per_state_dir(tmp_path: Path) -> None:
    first = StateLock(tmp_path)
    first.acquire()
    with pytest.raises(AlreadyRunning):
        StateLock(tmp_path).acquire()
    first.release()
    StateLock(tmp_path).acquire()
