"""The ETA: in media seconds when durations are known, in files otherwise, on a set clock."""

from __future__ import annotations

import pytest

from traxd.eta import Eta, Throughput, estimate


def parts(eta: Eta | None) -> tuple[object, ...] | None:
    """An estimate as a tuple, to compare with pytest.approx seconds."""
    return None if eta is None else (eta.seconds, eta.basis)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_with_durations_known_the_media_seconds_left_decide() -> None:
    # Given 10 minutes of media done in 60 s (ten times real time)
    done = [300.0, 300.0]
    # Then a two-hour file left takes 12 minutes, three one-minute memos 18 s
    assert estimate([7200.0], 0, done, 60.0) == Eta(720.0, "media")
    assert estimate([60.0, 60.0, 60.0], 0, done, 60.0) == Eta(18.0, "media")


def test_a_file_of_unknown_duration_counts_as_the_mean_of_those_done() -> None:
    # Given files of 100 s and 300 s done in 40 s
    eta = estimate([50.0], 2, [100.0, 300.0], 40.0)
    # Then the two unknown ones count 200 s each: 450 s of media at 10 media seconds a second
    assert parts(eta) == (pytest.approx(45.0), "media")
    # And with no duration known, it is the estimate counting files
    assert estimate([], 3, [100.0, 300.0], 40.0) == Eta(60.0, "media")
    assert estimate([], 3, [None, None], 40.0) == Eta(60.0, "files")


def test_files_without_a_duration_make_it_count_files() -> None:
    # One file done without a duration (a command pipeline): the files' rate, 2 per 30 s
    assert estimate([7200.0], 1, [120.0, None], 30.0) == Eta(30.0, "files")
    assert estimate([1.0], 0, [0.0], 30.0) == Eta(30.0, "files")  # no media measured


def test_nothing_left_or_nothing_done_has_no_eta() -> None:
    assert estimate([], 0, [100.0], 10.0) is None
    assert estimate([100.0], 0, [], 10.0) is None
    assert estimate([100.0], 0, [100.0], 0.0) is None


def test_throughput_measures_over_its_window_on_its_clock() -> None:
    # Given a daemon's throughput (from the first finish in the window, at least 60 s)
    clock = Clock()
    throughput = Throughput(clock, window=3600.0, min_span=60.0)
    assert throughput.eta([600.0]) is None  # nothing done yet
    throughput.finished(600.0)
    clock.now += 10
    # Then a lone finish is measured over the minimum span: 600 s in 60 s
    assert throughput.eta([600.0]) == Eta(60.0, "media")
    clock.now += 110
    throughput.finished(600.0)
    # 1200 media seconds in 120 s: 10x; 3000 s left take 300 s
    assert throughput.eta([3000.0]) == Eta(300.0, "media")
    # And finishes older than the window no longer count: the rate is measured from the
    # first finish left in it, 600 s of media in the 3481 s since
    clock.now += 3600 - 119
    assert parts(throughput.eta([3000.0])) == (pytest.approx(3000.0 * 3481 / 600.0), "media")
    clock.now += 120
    assert throughput.eta([3000.0]) is None


def test_a_batch_measures_from_its_start() -> None:
    # Given a batch started at 1000 whose first file (90 s) was done at 1030
    clock = Clock(1000.0)
    throughput = Throughput(clock, min_span=1.0, started=1000.0)
    clock.now = 1030.0
    throughput.finished(90.0)
    # Then the rate is 3 media seconds a second since the start; left: 60 s and one file
    # of unknown duration (90 s, as the mean), 150 s of media in 50 s
    assert parts(throughput.eta([60.0], 1)) == (pytest.approx(50.0), "media")
