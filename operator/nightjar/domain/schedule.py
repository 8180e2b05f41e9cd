"""Schedule maths: nightly slots in a window, tiers, expiry. Pure functions of their inputs and
an explicit ``now`` — no clock of their own — so they are tested with fixed times.

* A schedule's slot is the window start plus a stable offset inside the window, derived from
  ``namespace/name``: 1,000 schedules with the same window spread out instead of starting at
  the same second, and a schedule always takes its backup at the same time of night.
* The tier follows the slot's UTC date: first Sunday of the month → Monthly, any other Sunday →
  Weekly, otherwise Nightly. A schedule created after the month's first Sunday simply has no
  slot on it, so no Monthly that month (Mendix does the same).
* A slot is *due* while its window is open; once the window has closed without a backup it is
  *missed*, never taken late, so a restarted operator never takes a burst of stale backups.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from croniter import croniter

from nightjar.domain.retention import expires_at

MAX_WINDOW = dt.timedelta(hours=12)
#: A cron slot may still start this long after its time (its "window").
CRON_WINDOW = dt.timedelta(hours=1)
TIER_RETENTION_KEY = {"Nightly": "nightly", "Weekly": "weekly", "Monthly": "monthly"}
DEFAULT_RETENTION = {"nightly": "2w", "weekly": "3mo", "monthly": "1y", "onDemand": "3mo"}

_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?$")


def parse_duration(text: str) -> dt.timedelta:
    m = _DURATION.match(text or "")
    if not text or not m:
        raise ValueError(f"invalid window duration {text!r}: use e.g. 1h, 90m or 2h30m")
    d = dt.timedelta(hours=int(m.group(1) or 0), minutes=int(m.group(2) or 0))
    if d <= dt.timedelta(0) or d > MAX_WINDOW:
        raise ValueError(f"invalid window duration {text!r}: must be more than 0 and at most 12h")
    return d


def parse_start(text: str) -> dt.time:
    m = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)", text or "")
    if not m:
        raise ValueError(f"invalid window start {text!r}: use HH:MM in UTC")
    return dt.time(int(m.group(1)), int(m.group(2)), tzinfo=dt.UTC)


def tier(day: dt.date) -> str:
    """Monthly on the first Sunday of the month, Weekly on other Sundays, else Nightly."""
    if day.weekday() != 6:
        return "Nightly"
    return "Monthly" if day.day <= 7 else "Weekly"


def offset(namespace: str, name: str, window: dt.timedelta) -> dt.timedelta:
    """Stable offset in whole seconds inside ``window``, spread by a hash of namespace/name."""
    h = int.from_bytes(hashlib.sha256(f"{namespace}/{name}".encode()).digest()[:8], "big")
    return dt.timedelta(seconds=h % max(1, int(window.total_seconds())))


@dataclass(frozen=True)
class Slot:
    """One planned backup of a schedule."""

    time: dt.datetime
    window_end: dt.datetime
    tier: str
    expires: dt.datetime
    name: str

    def as_dict(self) -> dict[str, Any]:
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        return {
            "time": self.time.strftime(fmt),
            "tier": self.tier,
            "expiresAt": self.expires.strftime(fmt),
            "name": self.name,
        }


@dataclass(frozen=True)
class Plan:
    """A BackupSchedule's spec, parsed: everything slot maths needs."""

    namespace: str
    name: str
    retention: dict[str, str]
    start: dt.time | None = None
    duration: dt.timedelta = dt.timedelta(hours=1)
    cron: str = ""

    @classmethod
    def from_spec(cls, namespace: str, name: str, spec: dict[str, Any]) -> Plan:
        retention = {**DEFAULT_RETENTION, **(spec.get("retention") or {})}
        if spec.get("schedule"):
            if not croniter.is_valid(spec["schedule"]) or len(spec["schedule"].split()) != 5:
                raise ValueError(
                    f"invalid cron schedule {spec['schedule']!r}: use five fields, e.g. '30 2 * * *'"
                )
            return cls(namespace, name, retention, cron=spec["schedule"])
        window = spec.get("window") or {}
        return cls(
            namespace,
            name,
            retention,
            start=parse_start(window.get("start", "")),
            duration=parse_duration(window.get("duration") or "1h"),
        )

    @property
    def offset(self) -> dt.timedelta:
        return dt.timedelta(0) if self.cron else offset(self.namespace, self.name, self.duration)

    @property
    def window_text(self) -> str:
        if self.cron:
            return self.cron
        assert self.start is not None  # noqa: S101 - from_spec sets one of cron or start
        hours, rem = divmod(int(self.duration.total_seconds()), 3600)
        dur = (f"{hours}h" if hours else "") + (f"{rem // 60}m" if rem // 60 else "")
        return f"{self.start.strftime('%H:%M')}+{dur}"

    def _slot(self, t: dt.datetime) -> Slot:
        tr = tier(t.date())
        span = CRON_WINDOW if self.cron else self.duration - self.offset
        suffix = t.strftime("%Y%m%d%H%M") if self.cron else t.strftime("%Y%m%d")
        exp = expires_at(t, self.retention[TIER_RETENTION_KEY[tr]])
        return Slot(time=t, window_end=t + span, tier=tr, expires=exp, name=backup_name(self.name, suffix))

    def slots(self, start: dt.datetime) -> Iterator[Slot]:
        """Slots at or after ``start``, in order (infinite)."""
        start = start.astimezone(dt.UTC)
        if self.cron:
            it = croniter(self.cron, start - dt.timedelta(seconds=1))
            while True:
                yield self._slot(it.get_next(dt.datetime).astimezone(dt.UTC))
        assert self.start is not None  # noqa: S101
        day = start.date() - dt.timedelta(days=1)
        while True:
            t = dt.datetime.combine(day, self.start) + self.offset
            if t >= start:
                yield self._slot(t)
            day += dt.timedelta(days=1)

    def previous_slot(self, now: dt.datetime) -> Slot | None:
        """The latest slot at or before ``now`` (None for a cron that never fired in a year)."""
        now = now.astimezone(dt.UTC)
        if self.cron:
            t = croniter(self.cron, now + dt.timedelta(seconds=1)).get_prev(dt.datetime).astimezone(dt.UTC)
            return self._slot(t) if now - t < dt.timedelta(days=366) else None
        for s in self.slots(now - dt.timedelta(days=2)):
            nxt = next(self.slots(s.time + dt.timedelta(seconds=1)))
            if nxt.time > now:
                return s if s.time <= now else None
        return None  # pragma: no cover - slots() is infinite

    def next_slot(self, now: dt.datetime) -> Slot:
        return next(self.slots(now + dt.timedelta(seconds=1)))


def backup_name(schedule: str, suffix: str) -> str:
    """``<schedule>-<yyyymmdd>``; a name too long for Kubernetes keeps a hash of the schedule."""
    name = f"{schedule}-{suffix}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(schedule.encode()).hexdigest()[:8]
    return f"{schedule[: 253 - len(suffix) - 10]}-{digest}-{suffix}"


@dataclass(frozen=True)
class Decision:
    """What the scheduler should do about a schedule at ``now``."""

    action: str  # "create", "wait", "missed", "none"
    slot: Slot | None
    next: Slot


def decide(plan: Plan, now: dt.datetime, created: dt.datetime, existing: set[str]) -> Decision:
    """Pure core of the scheduler.

    ``existing`` holds the names of this schedule's Backups. The latest slot is due while its
    window is open ("create"), or "missed" once it closed without a Backup; a slot that already
    has its Backup, or whose window had closed before the schedule existed, needs nothing. A
    schedule created inside an open window takes that night's backup right away.
    """
    nxt = plan.next_slot(now)
    slot = plan.previous_slot(now)
    if slot is None or slot.window_end <= created.astimezone(dt.UTC) or slot.name in existing:
        return Decision("none", slot, nxt)
    if now < slot.window_end:
        return Decision("create", slot, nxt)
    return Decision("missed", slot, nxt)


def verify_applies(verify: dict[str, Any] | None, tier: str, slot_time: dt.datetime | None) -> bool:
    """Whether a schedule's ``spec.verify`` asks for a restore drill of its backup of ``tier``
    taken for the slot at ``slot_time``: its tier is in ``tiers``, or the slot's day number
    (days since 1970-01-01, UTC) is a multiple of ``everyNth`` (every N days for a nightly
    schedule; stable whatever was deleted since)."""
    if not verify:
        return False
    if tier in (verify.get("tiers") or []):
        return True
    nth = int(verify.get("everyNth") or 0)
    if nth >= 1 and slot_time is not None:
        return (slot_time.astimezone(dt.UTC).date() - dt.date(1970, 1, 1)).days % nth == 0
    return False
