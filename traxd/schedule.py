"""Schedule windows: when an inbox may start new jobs ("always" or a five-field cron).

Semantics (pure functions of the `now` they are given):

* ``"always"`` is open at every moment.
* A cron expression ``minute hour day-of-month month day-of-week`` marks time, not
  instants:

  - when the minute field is a fixed value or a list (``0``, ``30``, ``0,30``), the
    expression marks **whole hours**: the window is open for every full hour matched by
    the other four fields, whatever the minute field says. ``"0 1-5 * * *"`` is open
    from 01:00 to 05:59 (until 06:00) every day; ``"0 22-23,0-5 * * *"`` is open every
    night from 22:00 to 05:59. Each hour is judged by its own date, so with ``1-5`` as
    day of week, 22:00-23:59 *and* 00:00-05:59 count on Monday … Friday only.
  - otherwise (``*``, a range such as ``0-29``, or a step such as ``*/10``) the window
    is open during **every minute** the expression matches: ``"* 9-17 * * *"`` is open
    09:00-17:59, ``"0-29 * * * *"`` during the first half of every hour.

* Day of week uses crontab numbering (0 or 7 = Sunday, 1 = Monday … 6 = Saturday) or
  names (``sun``, ``mon-fri``). When both day-of-month and day-of-week are restricted,
  both must match (APScheduler's rule, not Vixie cron's "either").
* Times are wall-clock times in the time zone of `now`; a naive `now` is read as local
  time. The daemon passes local time, so "0 1-5 * * *" means 01:00 local.

`is_open(now)` says whether the minute holding `now` is inside the window.
`next_open(now)` is the first moment at or after `now` when the window is open: `now`
itself when it is open, the start of the next open minute or hour otherwise, and None
when the expression can never match (such as "0 0 30 2 *").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo

from apscheduler.triggers.cron import CronTrigger

ALWAYS = "always"
_WHOLE_HOURS = re.compile(r"\d+(,\d+)*")
_WEEKDAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_DOW_ITEM = re.compile(r"(?P<range>\*|\w+(-\w+)?)(/(?P<step>\d+))?")

Fields = tuple[str, str, str, str, str]


@dataclass(frozen=True)
class Window:
    """A parsed schedule; `fields` are APScheduler cron fields, None for "always"."""

    expression: str = ALWAYS
    fields: Fields | None = None

    @classmethod
    def parse(cls, text: str) -> Window:
        """"always" or a five-field cron expression; ValueError says what is wrong."""
        spec = " ".join(text.split())
        if spec == ALWAYS:
            return cls()
        parts = spec.split(" ")
        if len(parts) != 5:
            raise ValueError(f"expected \"always\" or five cron fields, not {text!r}")
        minute, hour, day, month, weekday = parts
        weekday = _aps_weekdays(weekday)
        _trigger((minute, hour, day, month, weekday), UTC)  # raises on bad fields
        effective = "*" if _WHOLE_HOURS.fullmatch(minute) else minute
        return cls(spec, (effective, hour, day, month, weekday))

    @property
    def always(self) -> bool:
        return self.fields is None

    def is_open(self, now: datetime) -> bool:
        if self.fields is None:
            return True
        start = _minute_of(now)
        fire: datetime | None = _trigger(self.fields, _zone(start)).get_next_fire_time(
            None, start)
        return fire == start

    def next_open(self, now: datetime) -> datetime | None:
        if self.fields is None:
            return now
        start = _minute_of(now)
        fire: datetime | None = _trigger(self.fields, _zone(start)).get_next_fire_time(
            None, start)
        if fire == start:
            return now
        return fire

    def __str__(self) -> str:
        return self.expression


def _trigger(fields: Fields, zone: tzinfo) -> CronTrigger:
    minute, hour, day, month, weekday = fields
    return CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=weekday,
                       timezone=zone)


def _minute_of(now: datetime) -> datetime:
    aware = now if now.tzinfo is not None else now.astimezone()
    return aware.replace(second=0, microsecond=0)


def _zone(moment: datetime) -> tzinfo:
    return moment.tzinfo or UTC


# --- day of week: crontab numbering (0 = Sunday) into APScheduler's (0 = Monday) ----------


def _aps_weekdays(field: str) -> str:
    """The crontab day-of-week field as an APScheduler list ("*" stays "*")."""
    if field in ("*", "?"):
        return "*"
    days: set[int] = set()
    for item in field.lower().split(","):
        days |= _cron_days(item)
    if days == set(range(7)):
        return "*"
    return ",".join(str((day - 1) % 7) for day in sorted(days, key=lambda d: (d - 1) % 7))


def _cron_days(item: str) -> set[int]:
    """Crontab day numbers (0 = Sunday … 6) of one list item: 5, 1-5, mon-fri, */2, 1-5/2."""
    match = _DOW_ITEM.fullmatch(item)
    if match is None:
        raise ValueError(f"bad day-of-week item {item!r}")
    span, step = match.group("range"), int(match.group("step") or 1)
    if step < 1:
        raise ValueError(f"bad step in day-of-week item {item!r}")
    if span == "*":
        first, last = 0, 6
    else:
        first_text, _, last_text = span.partition("-")
        first = _cron_day(first_text)
        last = _cron_day(last_text) if last_text else (6 if match.group("step") else first)
        if last == 0 and last_text and first > 0:
            last = 7  # "5-7" or "fri-sun": up to Sunday at the end of the week
    if last < first:
        raise ValueError(f"day-of-week range {item!r} runs backwards")
    return {day % 7 for day in range(first, last + 1, step)}


def _cron_day(text: str) -> int:
    if text.isdigit() and 0 <= int(text) <= 7:
        return int(text)
    if text[:3] in _WEEKDAY_NAMES and len(text) == 3:
        return _WEEKDAY_NAMES.index(text)
    raise ValueError(f"bad day of week {text!r} (use 0-7 or sun … sat)")
