"""Cron expressions: ``minute hour day-of-month month day-of-week``, or with a leading seconds
field (6 fields). Each field: ``*``, ``N``, ``A-B``, ``*/S``, ``A-B/S`` and comma lists of those.
Day of week 0-6 is Sunday-Saturday (7 is Sunday too). As in cron, when both day fields are
restricted a time matches either of them. Times are UTC.

    >>> from datetime import datetime, UTC
    >>> Cron("0 3 * * *").next_after(datetime(2026, 11, 25, 12, 0, tzinfo=UTC))
    datetime.datetime(2026, 11, 26, 3, 0, tzinfo=datetime.timezone.utc)
"""

from __future__ import annotations

import datetime as dt

_FIELDS = [("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31),
           ("month", 1, 12), ("weekday", 0, 7)]


class CronError(ValueError):
    """A cron expression that cannot be read (the message says which field and why)."""


def _field(text: str, name: str, lo: int, hi: int) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        rng, _, step_s = part.partition("/")
        try:
            step = int(step_s) if step_s else 1
            if rng == "*":
                a, b = lo, hi
            elif "-" in rng:
                a, b = (int(x) for x in rng.split("-", 1))
            else:
                a = b = int(rng)
                if step_s:
                    b = hi
        except ValueError:
            raise CronError(f"{name} field {text!r}: expected *, N, A-B, */S or lists") from None
        if step < 1 or not (lo <= a <= hi and lo <= b <= hi) or a > b:
            raise CronError(f"{name} field {text!r}: values must lie in {lo}-{hi}")
        out.update(range(a, b + 1, step))
    return out


class Cron:
    """A parsed cron expression; `next_after` gives the next matching time (UTC)."""

    def __init__(self, expr: str):
        parts = expr.split()
        if len(parts) not in (5, 6):
            raise CronError(f"cron {expr!r}: expected 5 fields (min hour dom month dow) or 6 "
                            f"(with seconds first), got {len(parts)}")
        if len(parts) == 5:
            parts = ["0", *parts]
        self.expr = expr
        sets = [_field(p, n, lo, hi) for p, (n, lo, hi) in zip(parts, _FIELDS, strict=True)]
        self.second, self.minute, self.hour, self.day, self.month, wd = sets
        self.weekday = {d % 7 for d in wd}
        self.any_day = parts[3] == "*"
        self.any_weekday = parts[5] == "*"

    def _day_ok(self, t: dt.datetime) -> bool:
        dom = t.day in self.day
        dow = (t.isoweekday() % 7) in self.weekday
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow

    def matches(self, t: dt.datetime) -> bool:
        return (t.month in self.month and self._day_ok(t) and t.hour in self.hour
                and t.minute in self.minute and t.second in self.second)

    def next_after(self, t: dt.datetime) -> dt.datetime:
        """The first matching time strictly after ``t`` (searched within 5 years)."""
        t = t.astimezone(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=1)
        end = t + dt.timedelta(days=366 * 5)
        while t < end:
            if t.month not in self.month:
                t = (t.replace(day=1, hour=0, minute=0, second=0) + dt.timedelta(days=32)).replace(day=1)
                continue
            if not self._day_ok(t):
                t = t.replace(hour=0, minute=0, second=0) + dt.timedelta(days=1)
                continue
            if t.hour not in self.hour:
                t = t.replace(minute=0, second=0) + dt.timedelta(hours=1)
                continue
            if t.minute not in self.minute:
                t = t.replace(second=0) + dt.timedelta(minutes=1)
                continue
            if t.second not in self.second:
                t += dt.timedelta(seconds=1)
                continue
            return t
        raise CronError(f"cron {self.expr!r} never matches")
