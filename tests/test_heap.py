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


def tracked(thing: object) -> bool:
    """Whether a collection would walk it: frozen objects are left out of get_objects()."""
    return any(o is thing for o in gc.get_objects())


def test_survivors_are_frozen_as_the_backlog_grows_and_thawed_each_hour() -> None:
    # Given a keeper that settled at start with no jobs
    clock = Clock()
    keeper = HeapKeeper(clock, growth=100, thaw_every=3600)
    keeper.settle(0)
    # When objects are made while fewer than `growth` jobs came, they are not frozen
    kept = [[n] for n in range(10)]  # lists: objects the collector tracks
    keeper.look(99)
    assert tracked(kept[0])
    # When the backlog has grown by `growth`, they are frozen: collections skip them
    keeper.look(100)
    assert not tracked(kept[0])
    # And after an hour everything is thawed, collected once and frozen again
    clock.now = 3600.0
    gc.unfreeze()
    assert tracked(kept[0])
    keeper.look(100)
    assert not tracked(kept[0])


def test_a_draining_backlog_counts_its_next_growth_from_where_it_is() -> None:
    clock = Clock()
    keeper = HeapKeeper(clock, growth=100, thaw_every=3600)
    keeper.settle(1000)
    keeper.look(10)  # drained
    kept = [[n] for n in range(10)]
    keeper.look(109)
    assert tracked(kept[0])
    keeper.look(110)  # grown by 100 from the low point
    assert not tracked(kept[0])
