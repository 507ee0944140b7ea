"""Cron expressions: ``minute hour day-of-month month day-of-week``, or with a leading seconds
field (6 fields). Each field: ``*``, ``N``, ``A-B``, ``*/S``, ``A-B/S`` and comma lists of those.
Day of week 0-6 is Sunday-Saturday (7 is Sunday too). As in cron, when both day fields are
restricted a time matches either of them. Times are UTC.

Parsing and matching are `croniter`'s (``day_or=True``, ``second_at_beginning=True``; a 5-field
expression runs at second 0), so its extensions (month and weekday names, ``L``, ``15W``,
``5#2``, wrapping ranges such as ``FRI-MON``) are read too. This module keeps the field count
to 5 or 6, reads an equal range ``A-A`` (or ``A-A/S``) as ``A`` (croniter would take the whole
field), and turns croniter's errors into a `CronError` that names the expression and field.

    >>> from datetime import datetime, UTC
    >>> Cron("0 3 * * *").next_after(datetime(2026, 11, 25, 12, 0, tzinfo=UTC))
    datetime.datetime(2026, 11, 26, 3, 0, tzinfo=datetime.timezone.utc)
"""

from __future__ import annotations

import datetime as dt
import re

# (name, lowest, highest) of the 6 fields, seconds first
_FIELDS = [("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31),
           ("month", 1, 12), ("weekday", 0, 7)]
_SYNTAX = "expected *, N, A-B, */S, A-B/S or comma lists of those"
_EQUAL_RANGE = re.compile(r"([^-/,]+)-\1(?:/\d+)?", re.IGNORECASE)


def _field(text: str) -> str:
    """``text`` with every equal range ``A-A`` / ``A-A/S`` of its comma list written ``A``."""
    return ",".join(m.group(1) if (m := _EQUAL_RANGE.fullmatch(item)) else item
                    for item in text.split(","))


class CronError(ValueError):
    """A cron expression that cannot be read (the message says which field and why)."""


def _expand(fields: list[str]):
    """croniter's expansion of the 6 fields (seconds first); its error is a ValueError."""
    from croniter import croniter

    return croniter.expand(" ".join(fields), second_at_beginning=True)


def _days(fields: list[str]) -> list[str]:
    """``fields`` with both day fields ``*`` where one restricted day field names every day.

    By the rule above such an expression runs every day, but croniter reads a full day field
    as ``*`` when the other one has a ``*`` in it (``*/3``) and then requires both.
    """
    expanded, nth = _expand(fields)
    dom, dow = expanded[2], expanded[4]  # croniter's order: min hour dom month dow second
    full_dom = fields[3] not in ("*", "?") and (dom == ["*"] or set(range(1, 32)) <= set(dom))
    full_dow = fields[5] not in ("*", "?") and not nth and (
        dow == ["*"] or set(range(7)) <= set(dow))
    if full_dom or full_dow:
        return [*fields[:3], "*", fields[4], "*"]
    return fields


def _invalid(expr: str, raw: list[str], fields: list[str], err: ValueError) -> CronError:
    """A `CronError` naming the first field that croniter rejects on its own.

    ``raw`` are the 6 fields as written, ``fields`` the same as given to croniter.
    """
    for i, (name, lo, hi) in enumerate(_FIELDS):
        probe = ["*"] * len(_FIELDS)
        probe[i] = fields[i]
        try:
            _expand(probe)
        except ValueError:
            return CronError(f"cron {expr!r}: {name} field {raw[i]!r}: {_SYNTAX}, with "
                             f"values in {lo}-{hi}")
    return CronError(f"cron {expr!r}: {err}")  # fields fine alone, not together


class Cron:
    """A parsed cron expression; `next_after` gives the next matching time (UTC)."""

    def __init__(self, expr: str):
        parts = expr.split()
        if len(parts) not in (5, 6):
            raise CronError(f"cron {expr!r}: expected 5 fields (min hour dom month dow) or 6 "
                            f"(with seconds first), got {len(parts)}")
        self.expr = expr
        raw = ["0", *parts] if len(parts) == 5 else parts  # a 5-field cron runs at second 0
        fields = [_field(p) for p in raw]
        try:
            fields = _days(fields)
        except ValueError as e:
            raise _invalid(expr, raw, fields, e) from e
        self._croniter_expr = " ".join(fields)

    def matches(self, t: dt.datetime) -> bool:
        """Whether ``t`` (to the second) is one of the expression's times."""
        from croniter import croniter

        return croniter.match(self._croniter_expr, t.replace(microsecond=0), day_or=True,
                              second_at_beginning=True, precision_in_seconds=1)

    def next_after(self, t: dt.datetime) -> dt.datetime:
        """The first matching time strictly after ``t``, in UTC."""
        from croniter import CroniterBadDateError, croniter

        it = croniter(self._croniter_expr, t.astimezone(dt.UTC), ret_type=dt.datetime,
                      day_or=True, second_at_beginning=True)
        try:
            return it.get_next()
        except CroniterBadDateError:
            raise CronError(f"cron {self.expr!r} never matches") from None
