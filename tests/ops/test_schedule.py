"""Schedule windows with fixed datetimes: whole hours, minutes, midnight, days of the week."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from traxd.schedule import Window

BERLIN = ZoneInfo("Europe/Berlin")


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    """A moment in March 2024 (the 4th is a Monday), Berlin time."""
    return datetime(2024, 3, day, hour, minute, second, tzinfo=BERLIN)


def test_always_is_open_at_every_moment() -> None:
    window = Window.parse("always")
    moment = at(4, 3, 17)
    assert window.always
    assert window.is_open(moment)
    assert window.next_open(moment) == moment


@pytest.mark.parametrize(("hour", "minute", "is_open"), [
    (0, 59, False), (1, 0, True), (1, 30, True), (5, 59, True), (6, 0, False), (23, 0, False),
])
def test_a_fixed_minute_marks_whole_hours(hour: int, minute: int, is_open: bool) -> None:
    # "0 1-5 * * *" is 01:00-05:59, not six single minutes
    assert Window.parse("0 1-5 * * *").is_open(at(4, hour, minute, 30)) is is_open


def test_a_minute_list_also_marks_whole_hours() -> None:
    window = Window.parse("0,30 9 * * *")
    assert window.is_open(at(4, 9, 17))
    assert not window.is_open(at(4, 10, 0))


@pytest.mark.parametrize(("minute", "is_open"), [(0, True), (29, True), (30, False), (59, False)])
def test_a_minute_range_is_open_minute_by_minute(minute: int, is_open: bool) -> None:
    assert Window.parse("0-29 * * * *").is_open(at(4, 12, minute)) is is_open


def test_a_star_minute_window_is_open_in_each_matching_minute() -> None:
    window = Window.parse("* 9-17 * * *")
    assert window.is_open(at(4, 9, 0))
    assert window.is_open(at(4, 17, 59, 59))
    assert not window.is_open(at(4, 18, 0))
    assert not window.is_open(at(4, 8, 59, 59))


def test_next_open_is_now_inside_and_the_next_start_outside() -> None:
    window = Window.parse("0 1-5 * * *")
    inside = at(4, 2, 15, 10)
    assert window.next_open(inside) == inside
    assert window.next_open(at(4, 0, 59, 59)) == at(4, 1, 0)
    # after the window it is tomorrow's start
    assert window.next_open(at(4, 6, 0)) == at(5, 1, 0)


def test_a_window_across_midnight() -> None:
    window = Window.parse("0 22-23,0-5 * * *")
    assert window.is_open(at(4, 23, 59))
    assert window.is_open(at(5, 0, 0))
    assert window.is_open(at(5, 5, 59))
    assert not window.is_open(at(5, 6, 0))
    assert not window.is_open(at(5, 21, 59))
    assert window.next_open(at(5, 12, 0)) == at(5, 22, 0)


def test_day_of_week_uses_crontab_numbers() -> None:
    # 1-5 is Monday to Friday in crontab (APScheduler alone would read Tuesday to Saturday)
    weekdays = Window.parse("0 9 * * 1-5")
    monday, friday, saturday, sunday = at(4, 9), at(8, 9), at(9, 9), at(10, 9)
    assert weekdays.is_open(monday)
    assert weekdays.is_open(friday)
    assert not weekdays.is_open(saturday)
    assert not weekdays.is_open(sunday)
    assert weekdays.next_open(at(8, 10)) == at(11, 9)  # Friday after hours: next Monday


@pytest.mark.parametrize("sunday", ["0", "7", "sun", "SUN", "6-7", "sat-sun", "0,6"])
def test_sunday_is_zero_or_seven_or_named(sunday: str) -> None:
    window = Window.parse(f"* * * * {sunday}")
    assert window.is_open(at(10, 12))  # Sunday
    assert not window.is_open(at(11, 12))  # Monday


def test_weekend_nights_across_midnight_count_by_each_hours_own_day() -> None:
    window = Window.parse("0 22-23,0-5 * * sat,sun")
    assert window.is_open(at(9, 23))  # Saturday 23:00
    assert window.is_open(at(10, 3))  # Sunday 03:00
    assert not window.is_open(at(11, 3))  # Monday 03:00
    assert not window.is_open(at(8, 23))  # Friday 23:00


def test_step_in_day_of_week() -> None:
    window = Window.parse("* * * * */2")  # crontab: Sunday, Tuesday, Thursday, Saturday
    open_days = [day for day in range(4, 11) if window.is_open(at(day, 12))]
    assert open_days == [5, 7, 9, 10]


def test_a_window_that_never_opens_has_no_next_open() -> None:
    window = Window.parse("0 0 30 2 *")
    assert not window.is_open(at(4, 0))
    assert window.next_open(at(4, 0)) is None


def test_times_are_read_in_the_zone_of_now() -> None:
    window = Window.parse("0 1-5 * * *")
    utc_night = datetime(2024, 3, 4, 1, 30, tzinfo=UTC)
    assert window.is_open(utc_night)
    assert not window.is_open(utc_night.astimezone(timezone(timedelta(hours=-5))))


def test_naive_now_is_local_time() -> None:
    window = Window.parse("0 1-5 * * *")
    assert window.is_open(datetime(2024, 3, 4, 2, 0))
    assert not window.is_open(datetime(2024, 3, 4, 7, 0))


def test_daylight_saving_change_keeps_wall_clock_hours() -> None:
    # 31 March 2024: Berlin clocks jump from 02:00 to 03:00
    window = Window.parse("0 3 * * *")
    assert window.next_open(datetime(2024, 3, 31, 1, 30, tzinfo=BERLIN)) == datetime(
        2024, 3, 31, 3, 0, tzinfo=BERLIN)


@pytest.mark.parametrize("bad", ["", "0 1-5 * *", "61 * * * *", "* 25 * * *", "* * * * 8",
                                 "* * * * mon-", "* * * * fri-mon", "* * * * funday", "nightly"])
def test_bad_expressions_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        Window.parse(bad)
