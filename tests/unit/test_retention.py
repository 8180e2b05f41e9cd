"""Calendar-exact expiry, as Mendix keeps backups."""

from __future__ import annotations

import datetime as dt

import pytest

from nightjar.domain.retention import default_expiry, expires_at, format_time, parse_period, parse_time

UTC = dt.UTC


def t(*a: int) -> dt.datetime:
    return dt.datetime(*a, tzinfo=UTC)


def test_weekly_backup_of_3_december_0318_expires_3_march_0318() -> None:
    assert expires_at(t(2026, 12, 3, 3, 18), "3mo") == t(2027, 3, 3, 3, 18)


def test_month_ends_clamp() -> None:
    assert expires_at(t(2026, 11, 30, 1, 0), "3mo") == t(2027, 2, 28, 1, 0)
    assert expires_at(t(2027, 11, 30, 1, 0), "3mo") == t(2028, 2, 29, 1, 0)  # leap year
    assert expires_at(t(2028, 2, 29, 0, 0), "1y") == t(2029, 2, 28, 0, 0)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("Nightly", t(2026, 12, 8, 2)),
        ("Weekly", t(2027, 2, 24, 2)),
        ("Monthly", t(2027, 11, 24, 2)),
        ("OnDemand", t(2027, 2, 24, 2)),
        ("Uploaded", t(2027, 2, 24, 2)),
    ],
)
def test_default_retention_per_type(kind: str, expected: dt.datetime) -> None:
    assert default_expiry(t(2026, 11, 24, 2), kind) == expected


def test_offsets_are_converted_to_utc_and_microseconds_dropped() -> None:
    created = dt.datetime(2026, 12, 3, 4, 18, 0, 999, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert format_time(expires_at(created, "3mo")) == "2027-03-03T03:18:00Z"


@pytest.mark.parametrize("bad", ["", "3", "3 months", "0d", "-1w", "2x"])
def test_invalid_periods_are_refused_with_the_accepted_forms(bad: str) -> None:
    with pytest.raises(ValueError, match=r"d, w, mo or y|must be positive"):
        parse_period(bad)


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        expires_at(dt.datetime(2026, 1, 1), "2w")
    with pytest.raises(ValueError, match="no time zone"):
        parse_time("2027-03-03T03:18:00")
    assert parse_time("2027-03-03T04:18:00+01:00") == t(2027, 3, 3, 3, 18)
