"""Retention and expiry: calendar-exact, as Mendix Cloud keeps backups.

A weekly backup taken at 03:18 on 3 December expires at 03:18 on 3 March; month ends clamp
(30 November + 3 months = 28 or 29 February). Pure functions of their arguments.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Final

from dateutil.relativedelta import relativedelta

#: Backup types and their default retention (Mendix: nightly 2 weeks, weekly 3 months,
#: monthly 1 year, on demand 3 months). Uploaded archives are kept like on-demand ones.
DEFAULT_RETENTION: Final[dict[str, str]] = {
    "Nightly": "2w",
    "Weekly": "3mo",
    "Monthly": "1y",
    "OnDemand": "3mo",
    "Uploaded": "3mo",
}

_PERIOD = re.compile(r"^\s*(\d+)\s*(d|w|mo|y)\s*$")


def parse_period(text: str) -> relativedelta:
    """``"14d"``, ``"2w"``, ``"3mo"``, ``"1y"`` → a calendar period."""
    m = _PERIOD.match(text)
    if not m:
        raise ValueError(
            f"invalid retention period {text!r}: use a number and d, w, mo or y (e.g. 2w, 3mo, 1y)"
        )
    n, unit = int(m.group(1)), m.group(2)
    if n <= 0:
        raise ValueError(f"invalid retention period {text!r}: must be positive")
    return {
        "d": relativedelta(days=n),
        "w": relativedelta(weeks=n),
        "mo": relativedelta(months=n),
        "y": relativedelta(years=n),
    }[unit]


def expires_at(created: dt.datetime, period: str) -> dt.datetime:
    """The instant a backup created at ``created`` expires, calendar-exact, in UTC."""
    if created.tzinfo is None:
        raise ValueError("created must be timezone-aware")
    return (created.astimezone(dt.UTC) + parse_period(period)).replace(microsecond=0)


def default_expiry(
    created: dt.datetime, backup_type: str, overrides: Mapping[str, str] | None = None
) -> dt.datetime:
    """Expiry of a Backup without one of its own: ``overrides`` (the operator's configured
    defaults, by type) first, then the Mendix defaults."""
    return expires_at(created, (overrides or {}).get(backup_type) or DEFAULT_RETENTION[backup_type])


def format_time(t: dt.datetime) -> str:
    """RFC 3339 in UTC with a Z, second precision: the form of annotations and status."""
    return t.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> dt.datetime:
    """Parse RFC 3339 (``Z`` or an offset); the result is in UTC."""
    t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if t.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone; use RFC 3339 such as 2027-03-03T03:18:00Z")
    return t.astimezone(dt.UTC)
