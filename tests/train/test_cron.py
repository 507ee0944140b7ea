"""Cron expressions of the retraining schedule."""

from __future__ import annotations

import datetime as dt

import pytest

from train.cron import Cron, CronError

T = dt.datetime(2026, 11, 25, 12, 34, 56, tzinfo=dt.UTC)  # a Wednesday


@pytest.mark.parametrize("expr,expect", [
    ("* * * * *", dt.datetime(2026, 11, 25, 12, 35, 0, tzinfo=dt.UTC)),
    ("0 3 * * *", dt.datetime(2026, 11, 26, 3, 0, tzinfo=dt.UTC)),
    ("*/15 * * * *", dt.datetime(2026, 11, 25, 12, 45, tzinfo=dt.UTC)),
    ("0 0 1 * *", dt.datetime(2026, 12, 1, tzinfo=dt.UTC)),
    ("30 9 * * 1-5", dt.datetime(2026, 11, 26, 9, 30, tzinfo=dt.UTC)),
    ("0 0 * * 0", dt.datetime(2026, 11, 29, tzinfo=dt.UTC)),      # Sunday
    ("0 0 * * 7", dt.datetime(2026, 11, 29, tzinfo=dt.UTC)),      # 7 is Sunday too
    ("0 0 29 2 *", dt.datetime(2028, 2, 29, tzinfo=dt.UTC)),      # next leap day
    ("0 0 13 * 5", dt.datetime(2026, 11, 27, tzinfo=dt.UTC)),     # either day field matches
    ("*/5 * * * * *", dt.datetime(2026, 11, 25, 12, 35, 0, tzinfo=dt.UTC)),  # seconds field
    ("58 34 12 * * *", dt.datetime(2026, 11, 25, 12, 34, 58, tzinfo=dt.UTC)),
    ("0 10,20 * * *", dt.datetime(2026, 11, 25, 20, 0, tzinfo=dt.UTC)),
])
def test_next_after(expr, expect):
    c = Cron(expr)
    assert c.next_after(T) == expect and c.matches(expect)


@pytest.mark.parametrize("expr,msg", [
    ("* * *", "expected 5 fields"), ("61 * * * *", "minute field '61'"),
    ("* 25 * * *", "hour field"), ("*/0 * * * *", "minute field"), ("a * * * *", "expected *"),
    ("0 0 31 2 *", "never matches"),
])
def test_bad_expressions(expr, msg):
    with pytest.raises(CronError, match=msg):
        Cron(expr).next_after(T)
