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


def test_survivors_are_frozen_as_jobs_are_made_and_thawed_each_hour() -> None:
    # Given a keeper that settled at start with no jobs
    clock = Clock()
    keeper = HeapKeeper(clock, growth=100, thaw_every=3600)
    keeper.settle(0)
    # When objects are made while fewer than `growth` job objects were made, they are not frozen
    kept = [[n] for n in range(10)]  # lists: objects the collector tracks
    keeper.look(live=99, made=99)
    assert tracked(kept[0])
    # When `growth` were made with as many live, they are frozen: collections skip them
    keeper.look(live=100, made=100)
    assert not tracked(kept[0])
    # And after an hour everything is thawed, collected once and frozen again
    clock.now = 3600.0
    gc.unfreeze()
    assert tracked(kept[0])
    keeper.look(live=100, made=100)
    assert not tracked(kept[0])


def test_jobs_replaced_by_transitions_are_frozen_though_the_live_count_stays() -> None:
    # Given a backlog of 1,000 live jobs, frozen at start
    keeper = HeapKeeper(Clock(), growth=100, thaw_every=3600)
    keeper.settle(1000)
    # When its jobs move on (each transition a new object) while the live count stays
    kept = [[n] for n in range(10)]
    keeper.look(live=1000, made=1099)
    assert tracked(kept[0])
    # Then once `growth` new ones were made, they are frozen
    keeper.look(live=1000, made=1100)
    assert not tracked(kept[0])


def test_a_small_backlog_is_never_frozen() -> None:
    keeper = HeapKeeper(Clock(), growth=100, thaw_every=3600)
    keeper.settle(0)
    kept = [[n] for n in range(10)]
    keeper.look(live=99, made=10_000)  # many made, few live: collections are short anyway
    assert tracked(kept[0])
