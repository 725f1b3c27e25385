"""Journal: rows per job, the order of ready work, recovery, damage and locking."""

from __future__ import annotations

from pathlib import Path

import pytest

from traxd.errors import AlreadyRunning, JournalError
from traxd.journal import JobState, Journal, StateLock


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    return Journal.open(tmp_path / "j.sqlite3")


def test_a_file_in_the_inbox_has_one_job(journal: Journal) -> None:
    first = journal.add_seen("in", "a.mp3", 10, 1, 5, now=1.0)
    again = journal.add_seen("in", "a.mp3", 10, 1, 5, now=2.0)
    assert first.id == again.id
    assert first.state is JobState.SEEN


def test_once_claimed_the_name_is_free_for_a_new_file(journal: Journal) -> None:
    first = journal.add_seen("in", "a.mp3", 10, 1, 5, now=1.0)
    journal.update(first.id, 2.0, state=JobState.RUNNING, claimed_path="/p/a.mp3")
    second = journal.add_seen("in", "a.mp3", 11, 2, 5, now=3.0)
    assert second.id != first.id


def test_ready_orders_by_priority_then_largest_first(journal: Journal) -> None:
    ids = {}
    for name, size, priority in [("small", 1, 5), ("big", 100, 5), ("urgent", 2, 1),
                                 ("mid", 50, 5)]:
        job = journal.add_seen("in", name, size, 0, priority, now=1.0)
        journal.update(job.id, 1.0, state=JobState.QUEUED)
        ids[job.id] = name
    later = journal.add_seen("in", "later", 1000, 0, 5, now=1.0)
    journal.update(later.id, 1.0, state=JobState.QUEUED, not_before=50.0)
    assert [ids[j.id] for j in journal.ready(10.0, ["in"])] == ["urgent", "big", "mid", "small"]
    assert journal.ready(10.0, ["other"]) == []


def test_running_jobs_go_back_to_queued_at_start(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "j.sqlite3")
    job = journal.add_seen("in", "a.mp3", 10, 1, 5, now=1.0)
    journal.update(job.id, 2.0, state=JobState.RUNNING, step=2)
    journal.close()
    reopened = Journal.open(tmp_path / "j.sqlite3")
    assert [j.id for j in reopened.requeue_interrupted(3.0)] == [job.id]
    again = reopened.get(job.id)
    assert again.state is JobState.QUEUED
    assert again.step == 2


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
