"""The heap keeper: what survives is frozen as the backlog grows, and thawed now and then."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from traxd.heap import HeapKeeper


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _thawed() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_survivors_are_frozen_as_the_backlog_grows_and_thawed_each_hour() -> None:
    # Given a keeper that settled at start with no jobs
    clock = Clock()
    keeper = HeapKeeper(clock, growth=100, thaw_every=3600)
    keeper.settle(0)
    frozen = gc.get_freeze_count()
    # When objects are made while fewer than `growth` jobs came, nothing more is frozen
    kept = [[n] for n in range(1000)]  # lists: objects the collector tracks
    keeper.look(99)
    assert gc.get_freeze_count() == frozen
    # When the backlog has grown by `growth`, they are frozen: collections skip them
    keeper.look(100)
    assert gc.get_freeze_count() >= frozen + len(kept)
    # And after an hour everything is thawed, collected once and frozen again
    clock.now = 3600.0
    gc.unfreeze()
    keeper.look(100)
    assert gc.get_freeze_count() >= len(kept)


def test_a_draining_backlog_counts_its_next_growth_from_where_it_is() -> None:
    clock = Clock()
    keeper = HeapKeeper(clock, growth=100, thaw_every=3600)
    keeper.settle(1000)
    keeper.look(10)  # drained
    frozen = gc.get_freeze_count()
    kept = [[n] for n in range(500)]
    keeper.look(110)  # grown by 100 from the low point
    assert gc.get_freeze_count() >= frozen + len(kept)
