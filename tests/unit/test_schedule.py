"""Schedule maths with fixed clocks: slots, tiers, expiry, offsets, due/missed decisions."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import statistics

import pytest

from nightjar.domain import schedule as sch

UTC = dt.UTC


def t(*a: int) -> dt.datetime:
    return dt.datetime(*a, tzinfo=UTC)


def plan(start: str = "03:00", duration: str = "1h", name: str = "shop", **spec: object) -> sch.Plan:
    return sch.Plan.from_spec("prod", name, {"window": {"start": start, "duration": duration}, **spec})


def test_tiers_follow_the_first_sunday_rule() -> None:
    assert sch.tier(dt.date(2026, 12, 6)) == "Monthly"  # first Sunday of December 2026
    assert sch.tier(dt.date(2026, 12, 13)) == "Weekly"
    assert sch.tier(dt.date(2026, 12, 7)) == "Nightly"
    assert sch.tier(dt.date(2026, 11, 1)) == "Monthly"  # the 1st itself
    assert sch.tier(dt.date(2026, 11, 8)) == "Weekly"  # 8th is never a first Sunday


def test_weekly_of_3_december_0318_expires_3_march_0318() -> None:
    p = plan("03:18", "1m")
    # 3 December 2028 is the first Sunday of its month (Monthly, one year); 10 December a Weekly.
    first = p._slot(t(2028, 12, 3, 3, 18))
    assert (first.tier, first.expires) == ("Monthly", t(2029, 12, 3, 3, 18))
    weekly = p._slot(t(2028, 12, 10, 3, 18))
    assert (weekly.tier, weekly.expires) == ("Weekly", t(2029, 3, 10, 3, 18))
    # The Mendix example: a weekly taken 03:18 on 3 December expires 03:18 on 3 March.
    from nightjar.domain.retention import expires_at

    assert expires_at(t(2028, 12, 3, 3, 18), p.retention["weekly"]) == t(2029, 3, 3, 3, 18)
    nxt = next(p.slots(t(2028, 12, 3)))
    assert t(2028, 12, 3, 3, 18) <= nxt.time < t(2028, 12, 3, 3, 19)


def test_weekly_expiry_is_calendar_exact_and_month_ends_clamp() -> None:
    p = plan(retention={"weekly": "3mo", "nightly": "3mo", "monthly": "1y"})
    s = p._slot(t(2026, 12, 13, 3, 18))  # a Weekly Sunday
    assert (s.tier, s.expires) == ("Weekly", t(2027, 3, 13, 3, 18))
    assert p._slot(t(2026, 11, 30, 3, 0)).expires == t(2027, 2, 28, 3, 0)
    leap = plan(retention={"nightly": "1y"})._slot(t(2028, 2, 29, 3, 0))
    assert leap.expires == t(2029, 2, 28, 3, 0)


def test_default_retentions_are_two_weeks_three_months_one_year() -> None:
    p = plan()
    assert p._slot(t(2026, 12, 7, 3)).expires == t(2026, 12, 21, 3)  # Nightly
    assert p._slot(t(2026, 12, 13, 3)).expires == t(2027, 3, 13, 3)  # Weekly
    assert p._slot(t(2026, 12, 6, 3)).expires == t(2027, 12, 6, 3)  # Monthly


def test_offsets_are_stable_inside_the_window_and_spread() -> None:
    w = dt.timedelta(hours=1)
    offs = [sch.offset("ns", f"app-{i}", w).total_seconds() for i in range(1000)]
    assert offs == [sch.offset("ns", f"app-{i}", w).total_seconds() for i in range(1000)]
    assert all(0 <= o < 3600 for o in offs)
    assert len(set(offs)) > 700  # spread, not bunched
    assert 1500 < statistics.mean(offs) < 2100
    assert max(offs) - min(offs) > 3400


def test_slots_are_window_start_plus_offset_once_a_night_named_by_date() -> None:
    p = plan("23:00", "3h")
    slots = list(zip(range(3), p.slots(t(2026, 11, 24)), strict=False))
    times = [s.time for _, s in slots]
    assert all(b - a == dt.timedelta(days=1) for a, b in itertools.pairwise(times))
    for _, s in slots:
        assert t(2026, 1, 1).replace(year=s.time.year) <= s.time
        start = dt.datetime.combine(
            s.time.date() if s.time.hour >= 23 else s.time.date() - dt.timedelta(days=1),
            dt.time(23, 0, tzinfo=UTC),
        )
        assert start <= s.time < start + dt.timedelta(hours=3)
        assert s.window_end == start + dt.timedelta(hours=3)
        assert s.name == f"shop-{s.time:%Y%m%d}"


def test_schedule_created_after_the_first_sunday_gets_no_monthly_that_month() -> None:
    p = plan("02:00", "1h")
    created = t(2026, 12, 6, 12, 0)  # after the first Sunday's window
    december = list(itertools.takewhile(lambda s: s.time < t(2027, 1, 1), p.slots(created)))
    assert [s.tier for s in december].count("Monthly") == 0
    assert [s.tier for s in december].count("Weekly") == 3
    assert next(s for s in p.slots(created) if s.tier == "Monthly").time.date() == dt.date(2027, 1, 3)


def test_decide_creates_inside_the_window_once_and_records_a_missed_slot_after_it() -> None:
    p = plan("02:00", "1h")
    off = p.offset
    slot_time = t(2026, 11, 24, 2) + off
    created = t(2026, 11, 1)
    inside = sch.decide(p, slot_time + dt.timedelta(seconds=1), created, set())
    assert inside.action == "create"
    assert inside.slot is not None
    assert inside.slot.name == "shop-20261124"
    assert sch.decide(p, slot_time + dt.timedelta(seconds=1), created, {"shop-20261124"}).action == "none"
    # Operator down across the whole window: recorded as missed, never taken late.
    after = sch.decide(p, t(2026, 11, 24, 3, 0, 1), created, set())
    assert after.action == "missed"
    # Before the slot: nothing yet, and the next one is tonight's.
    before = sch.decide(p, t(2026, 11, 24, 1, 59), created, set())
    assert before.action in ("none", "missed")
    assert before.next.time == slot_time


def test_a_schedule_created_inside_an_open_window_backs_up_tonight() -> None:
    p = plan("02:00", "1h")
    slot_time = t(2026, 11, 24, 2) + p.offset
    created = slot_time + dt.timedelta(seconds=5)
    assert sch.decide(p, created + dt.timedelta(seconds=1), created, set()).action == "create"
    # ...but not a slot whose window closed before it existed.
    assert sch.decide(p, t(2026, 11, 24, 4), t(2026, 11, 24, 3, 30), set()).action == "none"


def test_cron_schedules_name_by_minute_and_have_a_one_hour_window() -> None:
    p = sch.Plan.from_spec("ns", "db", {"schedule": "30 */6 * * *"})
    slots = [s for _, s in zip(range(3), p.slots(t(2026, 11, 24, 1)), strict=False)]
    assert [s.time for s in slots] == [
        t(2026, 11, 24, 6, 30),
        t(2026, 11, 24, 12, 30),
        t(2026, 11, 24, 18, 30),
    ]
    assert slots[0].name == "db-202611240630"
    assert slots[0].window_end == t(2026, 11, 24, 7, 30)
    assert sch.decide(p, t(2026, 11, 24, 7, 0), t(2026, 11, 1), set()).action == "create"
    assert sch.decide(p, t(2026, 11, 24, 8, 0), t(2026, 11, 1), set()).action == "missed"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"window": {"start": "25:00"}}, "HH:MM"),
        ({"window": {"start": "02:00", "duration": "13h"}}, "at most 12h"),
        ({"window": {"start": "02:00", "duration": "soon"}}, "1h, 90m"),
        ({"schedule": "every night"}, "five fields"),
    ],
)
def test_invalid_specs_say_what_to_write(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sch.Plan.from_spec("ns", "n", spec)


def test_slot_json_has_time_tier_expiry_and_name() -> None:
    s = plan()._slot(t(2026, 12, 6, 3, 10))
    assert json.loads(json.dumps(s.as_dict())) == {
        "time": "2026-12-06T03:10:00Z",
        "tier": "Monthly",
        "expiresAt": "2027-12-06T03:10:00Z",
        "name": "shop-20261206",
    }
