"""Schedules that verify (issue 16): which backups get a restore drill, and the drills the tick creates.

``verify_applies`` (tiers, or every Nth slot by the slot's day number), ``drills.candidate`` (only
scheduled, Completed, recent backups without a drill recorded), ``drills.start_drills`` (the
``<backup>-verify`` Verification, never twice), and the Scheduler tick end to end: the backups a
schedule will drill are taken with ``source.rowCounts``, and a Completed one gets its drill.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest

from nightjar.constants import (
    ANNOTATION_EXPIRES_AT,
    LABEL_BACKUP,
    LABEL_MANAGED_BY,
    LABEL_SCHEDULE,
    LABEL_TIER,
)
from nightjar.domain import schedule as sch
from nightjar.domain.retention import format_time
from nightjar.domain.schedule import verify_applies
from nightjar.reconcile import drills
from nightjar.reconcile.schedule import Scheduler
from tests.fakes import NOW, FakeKube

UTC = dt.UTC
SCRATCH = {"database": {"secretRef": {"name": "scratch"}}}


def ns() -> str:
    return f"d-{uuid.uuid4().hex[:8]}"


def day_number(d: dt.date) -> int:
    return (d - dt.date(1970, 1, 1)).days


# --- verify_applies -------------------------------------------------------------------------------


def test_no_verify_applies_to_nothing() -> None:
    empty: tuple[dict[str, Any] | None, ...] = (None, {})
    for verify in empty:
        for tier in ("Nightly", "Weekly", "Monthly"):
            assert not verify_applies(verify, tier, NOW)


def test_tiers_apply_to_their_tiers_only() -> None:
    verify = {"tiers": ["Weekly", "Monthly"]}
    assert verify_applies(verify, "Weekly", NOW)
    assert verify_applies(verify, "Monthly", None)  # a tier needs no slot time
    assert not verify_applies(verify, "Nightly", NOW)
    assert not verify_applies(verify, "", NOW)


def test_every_nth_counts_the_slots_utc_day_since_the_epoch() -> None:
    thursday = dt.datetime(2026, 11, 26, 3, 10, tzinfo=UTC)
    assert day_number(thursday.date()) % 7 == 0  # 1970-01-01 was a Thursday
    verify = {"everyNth": 7}
    assert verify_applies(verify, "Nightly", thursday)
    for days in range(1, 7):
        assert not verify_applies(verify, "Nightly", thursday + dt.timedelta(days=days))
    assert verify_applies(verify, "Weekly", thursday + dt.timedelta(days=7))
    # The UTC day decides, whatever the slot time's zone.
    plus2 = dt.timezone(dt.timedelta(hours=2))
    assert not verify_applies(verify, "Nightly", dt.datetime(2026, 11, 26, 1, 0, tzinfo=plus2))  # 25th UTC
    assert verify_applies(verify, "Nightly", dt.datetime(2026, 11, 27, 1, 0, tzinfo=plus2))  # 26th UTC


def test_every_nth_of_one_is_every_slot_and_needs_a_slot_time() -> None:
    assert all(verify_applies({"everyNth": 1}, "Nightly", NOW + dt.timedelta(days=d)) for d in range(10))
    assert not verify_applies({"everyNth": 1}, "Nightly", None)
    assert not verify_applies({"everyNth": 0}, "Nightly", NOW)


def test_tiers_and_every_nth_together_apply_to_either() -> None:
    verify = {"tiers": ["Monthly"], "everyNth": 7}
    thursday = dt.datetime(2026, 11, 26, 3, 10, tzinfo=UTC)
    assert verify_applies(verify, "Nightly", thursday)
    assert verify_applies(verify, "Monthly", thursday + dt.timedelta(days=1))
    assert not verify_applies(verify, "Nightly", thursday + dt.timedelta(days=1))


# --- candidate ----------------------------------------------------------------------------------


def a_backup(
    namespace: str,
    name: str = "nightly-20261122",
    tier: str = "Weekly",
    schedule: str | None = "nightly",
    completed: dt.datetime | None = NOW - dt.timedelta(hours=1),
    slot: str | None = "2026-11-22T03:12:00Z",
    **status: Any,
) -> dict[str, Any]:
    labels = {LABEL_TIER: tier, LABEL_MANAGED_BY: "nightjar"}
    if schedule is not None:
        labels[LABEL_SCHEDULE] = schedule
    annotations = {ANNOTATION_EXPIRES_AT: format_time(NOW + dt.timedelta(days=30))}
    if slot is not None:
        annotations[drills.ANNOTATION_SLOT] = slot
    st: dict[str, Any] = {"phase": "Completed", "sourceId": "src", **status}
    if completed is not None:
        st["completedOn"] = format_time(completed)
    return {
        "apiVersion": "nightjar.dev/v1alpha1",
        "kind": "Backup",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": {"storageRef": {"name": "s3"}, "type": tier, "source": {}},
        "status": st,
    }


def test_a_recent_completed_scheduled_backup_is_a_candidate() -> None:
    c = drills.candidate(a_backup("shop"), NOW)
    assert c == drills.Candidate(
        "shop", "nightly", "nightly-20261122", "Weekly", dt.datetime(2026, 11, 22, 3, 12, tzinfo=UTC)
    )


def test_a_candidate_without_a_readable_slot_has_none() -> None:
    assert (c := drills.candidate(a_backup("shop", slot=None), NOW)) is not None and c.slot is None
    assert (c := drills.candidate(a_backup("shop", slot="last sunday"), NOW)) is not None and c.slot is None


@pytest.mark.parametrize(
    "backup",
    [
        a_backup("shop", schedule=None),  # on demand: no schedule drills it
        a_backup("shop", phase="Running"),
        a_backup("shop", phase="Failed"),
        a_backup("shop", completed=None),  # no completion time
        a_backup("shop", completed=None, completedOn="yesterday"),
        a_backup("shop", completed=NOW - drills.RECENT - dt.timedelta(seconds=1)),  # old
        a_backup("shop", verification={"name": "x", "result": "Passed", "time": format_time(NOW)}),
    ],
    ids=["on-demand", "running", "failed", "no-completion", "bad-completion", "old", "drilled"],
)
def test_not_a_candidate(backup: dict[str, Any]) -> None:
    assert drills.candidate(backup, NOW) is None


def test_a_backup_being_deleted_is_not_a_candidate() -> None:
    b = a_backup("shop")
    b["metadata"]["deletionTimestamp"] = format_time(NOW)
    assert drills.candidate(b, NOW) is None


def test_a_backup_completed_exactly_recent_ago_is_still_one() -> None:
    assert drills.candidate(a_backup("shop", completed=NOW - drills.RECENT), NOW) is not None


# --- start_drills -------------------------------------------------------------------------------


def a_schedule(namespace: str, verify: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "nightjar.dev/v1alpha1",
        "kind": "BackupSchedule",
        "metadata": {
            "name": "nightly",
            "namespace": namespace,
            "uid": "uid-s",
            "generation": 1,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {
            "storageRef": {"name": "s3"},
            "source": {"database": {"secretRef": {"name": "db"}}},
            "window": {"start": "03:00", "duration": "1h"},
            **spec,
        },
    }
    if verify is not None:
        body["spec"]["verify"] = verify
    return body


def candidates(namespace: str) -> list[drills.Candidate]:
    out = [
        drills.candidate(a_backup(namespace, "nightly-20261122", "Weekly"), NOW),
        drills.candidate(
            a_backup(namespace, "nightly-20261123", "Nightly", slot="2026-11-23T03:12:00Z"), NOW
        ),
    ]
    assert all(c is not None for c in out)
    return [c for c in out if c is not None]


def test_start_drills_creates_the_backups_verification_on_the_schedules_scratch() -> None:
    n = ns()
    kube = FakeKube()
    s = kube.add("backupschedules", a_schedule(n, {"tiers": ["Weekly"], "scratch": SCRATCH}))
    created = drills.start_drills(kube, s, candidates(n))

    assert created == [f"{n}/nightly-20261122-verify"]
    v = kube.get("verifications", n, "nightly-20261122-verify")
    assert v is not None
    assert v["kind"] == "Verification" and v["apiVersion"] == "nightjar.dev/v1alpha1"
    assert v["spec"] == {"backupName": "nightly-20261122", "scratch": SCRATCH}
    assert v["metadata"]["labels"] == {
        LABEL_SCHEDULE: "nightly",
        LABEL_BACKUP: "nightly-20261122",
        LABEL_MANAGED_BY: "nightjar",
    }
    assert kube.get("verifications", n, "nightly-20261123-verify") is None  # Nightly: not verified
    assert kube.events == [
        ("nightly", "Normal", "DrillCreated", "restore drill nightly-20261122-verify of nightly-20261122")
    ]


def test_start_drills_never_creates_a_second_drill_of_a_backup() -> None:
    n = ns()
    kube = FakeKube()
    s = kube.add("backupschedules", a_schedule(n, {"tiers": ["Weekly"], "scratch": SCRATCH}))
    drills.start_drills(kube, s, candidates(n))
    assert drills.start_drills(kube, s, candidates(n)) == []
    assert len([k for k in kube.objects if k[0] == "verifications"]) == 1
    assert len(kube.events) == 1


def test_start_drills_by_every_nth_slot() -> None:
    n = ns()
    kube = FakeKube()
    s = kube.add("backupschedules", a_schedule(n, {"everyNth": 2, "scratch": SCRATCH}))
    cs = candidates(n)  # slots on the 22nd and the 23rd: one of them is an even day number
    even = next(c for c in cs if c.slot is not None and day_number(c.slot.date()) % 2 == 0)
    assert drills.start_drills(kube, s, cs) == [f"{n}/{even.name}-verify"]


def test_a_schedule_without_verify_starts_no_drill() -> None:
    n = ns()
    kube = FakeKube()
    s = kube.add("backupschedules", a_schedule(n))
    assert drills.start_drills(kube, s, candidates(n)) == []
    assert kube.calls["create_object"] == 0 and kube.events == []


def test_a_verify_without_scratch_gives_the_drill_none() -> None:
    n = ns()
    kube = FakeKube()
    s = kube.add("backupschedules", a_schedule(n, {"tiers": ["Weekly"]}))
    drills.start_drills(kube, s, candidates(n))
    v = kube.get("verifications", n, "nightly-20261122-verify")
    assert v is not None and v["spec"] == {"backupName": "nightly-20261122"}


def test_a_failed_create_is_skipped_and_the_others_still_made() -> None:
    n = ns()
    kube = FakeKube()
    s = kube.add("backupschedules", a_schedule(n, {"tiers": ["Weekly", "Nightly"], "scratch": SCRATCH}))
    kube.fail("create_object", 503)
    created = drills.start_drills(kube, s, candidates(n))
    assert created == [f"{n}/nightly-20261123-verify"]
    # The next call (the next tick) makes the one that failed.
    assert drills.start_drills(kube, s, candidates(n)) == [f"{n}/nightly-20261122-verify"]


# --- the Scheduler tick -------------------------------------------------------------------------


def slot_of(n: str, spec: dict[str, Any], day: dt.date) -> sch.Slot:
    plan = sch.Plan.from_spec(n, "nightly", spec)
    slot = plan.previous_slot(dt.datetime.combine(day, dt.time(3, 59, 59), tzinfo=UTC))
    assert slot is not None and slot.time.date() == day
    return slot


def complete(kube: FakeKube, n: str, name: str, at: dt.datetime) -> None:
    kube.patch_status("backups", n, name, {"phase": "Completed", "completedOn": format_time(at)})


def test_the_tick_takes_verified_tiers_with_row_counts_and_drills_them_once_completed() -> None:
    n = ns()
    kube = FakeKube()
    s = kube.add("backupschedules", a_schedule(n, {"tiers": ["Weekly"], "scratch": SCRATCH}))
    sunday = slot_of(n, s["spec"], dt.date(2026, 11, 22))
    monday = slot_of(n, s["spec"], dt.date(2026, 11, 23))
    assert (sunday.tier, monday.tier) == ("Weekly", "Nightly")

    # Sunday's slot: a Weekly backup, taken with exact row counts for its drill.
    report = Scheduler(kube).tick(sunday.time + dt.timedelta(seconds=1))
    assert report.created == [f"{n}/{sunday.name}"] and report.drills == []
    weekly = kube.get("backups", n, sunday.name)
    assert weekly is not None
    assert weekly["spec"]["source"] == {"database": {"secretRef": {"name": "db"}}, "rowCounts": True}
    assert weekly["metadata"]["labels"][LABEL_TIER] == "Weekly"
    assert weekly["metadata"]["annotations"][drills.ANNOTATION_SLOT] == format_time(sunday.time)
    # Not Completed yet: no drill.
    assert Scheduler(kube).tick(sunday.time + dt.timedelta(minutes=5)).drills == []
    complete(kube, n, sunday.name, sunday.time + dt.timedelta(minutes=10))

    # Monday's slot: a Nightly backup, taken without; the Completed Weekly gets its drill.
    report = Scheduler(kube).tick(monday.time + dt.timedelta(seconds=1))
    assert report.created == [f"{n}/{monday.name}"]
    assert report.drills == [f"{n}/{sunday.name}-verify"]
    nightly = kube.get("backups", n, monday.name)
    assert nightly is not None and "rowCounts" not in nightly["spec"]["source"]
    v = kube.get("verifications", n, f"{sunday.name}-verify")
    assert v is not None and v["spec"] == {"backupName": sunday.name, "scratch": SCRATCH}
    assert "DrillCreated" in kube.reasons("nightly")

    # The Nightly completes: no drill of it; the Weekly's is never made twice.
    complete(kube, n, monday.name, monday.time + dt.timedelta(minutes=10))
    report = Scheduler(kube).tick(monday.time + dt.timedelta(hours=2))
    assert report.drills == []
    assert kube.get("verifications", n, f"{monday.name}-verify") is None
    assert sorted(k[2] for k in kube.objects if k[0] == "verifications") == [f"{sunday.name}-verify"]
    assert kube.reasons("nightly").count("DrillCreated") == 1


def test_the_tick_of_a_schedule_without_verify_takes_no_row_counts_and_no_drill() -> None:
    n = ns()
    kube = FakeKube()
    s = kube.add("backupschedules", a_schedule(n))
    sunday = slot_of(n, s["spec"], dt.date(2026, 11, 22))
    Scheduler(kube).tick(sunday.time + dt.timedelta(seconds=1))
    b = kube.get("backups", n, sunday.name)
    assert b is not None and "rowCounts" not in b["spec"]["source"]
    complete(kube, n, sunday.name, sunday.time + dt.timedelta(minutes=10))
    assert Scheduler(kube).tick(sunday.time + dt.timedelta(hours=1)).drills == []
    assert not [k for k in kube.objects if k[0] == "verifications"]


def test_the_tick_drills_no_backup_completed_long_ago() -> None:
    """Turning verify on does not start a drill of every old backup at once."""
    n = ns()
    kube = FakeKube()
    kube.add("backupschedules", a_schedule(n, {"tiers": ["Weekly"], "scratch": SCRATCH}))
    kube.add("backups", a_backup(n, "nightly-20261101", "Weekly", completed=NOW - dt.timedelta(days=20)))
    kube.add("backups", a_backup(n, "nightly-20261122", "Weekly"))
    report = Scheduler(kube).tick(NOW)
    assert report.drills == [f"{n}/nightly-20261122-verify"]


def test_a_drilled_backup_feeds_the_last_verified_gauge_on_the_tick() -> None:
    """After a restart the tick rebuilds nightjar_backup_last_verified_timestamp_seconds."""
    from nightjar import metrics

    n = ns()
    kube = FakeKube()
    when = NOW - dt.timedelta(hours=2)
    kube.add(
        "backups",
        a_backup(n, verification={"name": "v", "result": "Passed", "time": format_time(when)}),
    )
    Scheduler(kube).tick(NOW)
    labels = {"namespace": n, "source": "src"}
    assert metrics.REGISTRY.get_sample_value("nightjar_backup_last_verified_timestamp_seconds", labels) == (
        when.timestamp()
    )
