"""Metrics and Events of the reconcilers, driven against an in-memory Kubernetes: each transition
is counted exactly once, where the status that records it is written, and each one is told once.

The metrics live in prometheus_client's process-wide registry, so every test uses namespaces of
its own and reads values with ``REGISTRY.get_sample_value``.
"""

from __future__ import annotations

import copy
import datetime as dt
import socket
import urllib.request
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from nightjar import metrics
from nightjar.config import OperatorConfig
from nightjar.constants import ANNOTATION_EXPIRES_AT, LABEL_SCHEDULE
from nightjar.domain import schedule as sch
from nightjar.reconcile import status
from nightjar.reconcile.backup import BackupReconciler
from nightjar.reconcile.gc import gc_sweep
from nightjar.reconcile.restore import RestoreReconciler
from nightjar.reconcile.schedule import Scheduler, TickReport
from nightjar.reconcile.storage import reconcile_storage
from tests.fakes import NOW, FakeClock, FakeKube

UTC = dt.UTC
G = metrics.REGISTRY.get_sample_value


def value(name: str, **labels: str) -> float:
    return G(name, labels) or 0.0


def fmt(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def ns() -> str:
    return f"m-{uuid.uuid4().hex[:8]}"


def a_backup(namespace: str, name: str = "b1", btype: str = "OnDemand", **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "nightjar.dev/v1alpha1",
        "kind": "Backup",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "creationTimestamp": fmt(NOW - dt.timedelta(hours=1)),
            "annotations": {ANNOTATION_EXPIRES_AT: fmt(NOW + dt.timedelta(days=90))},
        },
        "spec": {
            "type": btype,
            "storageRef": {"name": "s3"},
            "source": {"database": {"secretRef": {"name": "db"}}},
        },
        "status": status,
    }


def a_job(
    name: str = "nightjar-backup-b1", *, active: int = 0, failed: int = 0, cond: str = ""
) -> dict[str, Any]:
    conds = [{"type": cond, "status": "True"}] if cond else []
    return {
        "metadata": {"name": name, "namespace": "x"},
        "status": {"active": active, "failed": failed, "conditions": conds},
    }


@pytest.fixture
def fixed_now() -> dt.datetime:
    return NOW


def backups(kube: FakeKube) -> BackupReconciler:
    return BackupReconciler(kube, OperatorConfig(), clock=FakeClock())


def restores(kube: FakeKube) -> RestoreReconciler:
    return RestoreReconciler(kube, OperatorConfig(), clock=FakeClock())


def test_the_same_completed_backup_seen_twice_is_counted_once(fixed_now: dt.datetime) -> None:
    n = ns()
    kube = FakeKube()
    stale = kube.add("backups", a_backup(n, phase="Running", attempts=1, sourceId="src-a"))
    rec = backups(kube)
    rec.taken.verify_manifest = lambda *a: None  # type: ignore[method-assign]  # no bucket here
    kube.results = [
        {
            "manifestKey": "k/manifest.json",
            "manifestSha256": "0" * 64,
            "snapshotId": "snap-1",
            "createdOn": fmt(NOW - dt.timedelta(seconds=600)),
            "sizeUncompressedBytes": 5_000_000,
            "files": {"count": 2, "bytes": 10},
        }
    ]
    done = a_job(cond="Complete")

    rec.sync_from_job(stale, done)
    rec.sync_from_job(stale, done)  # the Job's next event, with the body as it was before
    rec.reconcile(kube.get("backups", n, "b1") or {})  # a restarted operator re-reading it

    assert kube.objects[("backups", n, "b1")]["status"]["phase"] == "Completed"
    assert value("nightjar_backups_total", namespace=n, type="OnDemand", phase="Completed") == 1
    assert value("nightjar_backup_bytes_total", namespace=n) == 5_000_000
    assert value("nightjar_backup_duration_seconds_count", namespace=n, type="OnDemand") == 1
    assert value("nightjar_backup_duration_seconds_sum", namespace=n, type="OnDemand") == 600
    assert value("nightjar_backup_duration_seconds_bucket", namespace=n, type="OnDemand", le="600.0") == 1
    assert value("nightjar_backup_duration_seconds_bucket", namespace=n, type="OnDemand", le="300.0") == 0
    assert value("nightjar_backup_size_bytes", namespace=n, source="src-a") == 5_000_000
    assert value("nightjar_last_successful_backup_timestamp_seconds", namespace=n, source="src-a") == (
        NOW.timestamp()
    )
    assert kube.reasons("b1") == ["Completed"]
    assert "snap-1" in kube.events[0][3]


def test_every_backup_transition_is_counted_and_told_once_with_its_retries(fixed_now: dt.datetime) -> None:
    n = ns()
    kube = FakeKube()
    body = kube.add("backups", a_backup(n, btype="Nightly"))
    rec = backups(kube)
    kube.jobs[(n, "nightjar-backup-b1")] = a_job(active=1)
    rec.reconcile(body)  # Queued, then the Job runs: Running
    rec.reconcile(body)  # the same (stale) body again: nothing new
    running = kube.get("backups", n, "b1") or {}
    kube.results = [{"error": 'password authentication failed for user "shop"'}]
    rec.sync_from_job(running, a_job(active=1, failed=1))  # attempt 2
    rec.sync_from_job(running, a_job(active=1, failed=1))
    retried = kube.get("backups", n, "b1") or {}
    rec.sync_from_job(retried, a_job(failed=3, cond="Failed"))
    rec.sync_from_job(retried, a_job(failed=3, cond="Failed"))

    for phase, count in (("Queued", 1), ("Running", 1), ("Failed", 1), ("Completed", 0)):
        assert value("nightjar_backups_total", namespace=n, type="Nightly", phase=phase) == count, phase
    assert value("nightjar_backup_duration_seconds_count", namespace=n, type="Nightly") == 0
    assert kube.reasons("b1") == ["Queued", "Running", "Retrying", "Failed"]
    retry = kube.events[2]
    assert retry[1] == "Warning" and "attempt 2 of 3 running" in retry[3] and "password" in retry[3]
    assert kube.objects[("backups", n, "b1")]["status"]["attempts"] == 3
    assert kube.objects[("backups", n, "b1")]["metadata"]["labels"] == {"nightjar.dev/finished": "true"}


def test_a_stale_body_never_moves_a_backup_back_to_queued(fixed_now: dt.datetime) -> None:
    n = ns()
    kube = FakeKube()
    stale = kube.add("backups", a_backup(n, phase="Running", attempts=2, sourceId="s"))
    stale["status"] = {}
    rec = backups(kube)
    assert (
        rec.state.apply(stale, status.update(phase="Queued", attempts=0), ("Normal", "Queued", "q")) is False
    )
    assert kube.objects[("backups", n, "b1")]["status"]["attempts"] == 2
    assert kube.events == []
    assert value("nightjar_backups_total", namespace=n, type="OnDemand", phase="Queued") == 0


def test_an_uploaded_backup_counts_from_its_creation(fixed_now: dt.datetime) -> None:
    n = ns()
    kube = FakeKube()
    b = kube.add("backups", a_backup(n, btype="Uploaded", phase="Queued", sourceId="uploaded"))
    rec = backups(kube)
    done = {
        "phase": "Completed",
        "createdOn": "2020-01-01T00:00:00Z",  # when the original snapshot was taken: not our work
        "completedOn": fmt(NOW),
        "sizeUncompressedBytes": 42,
        "sourceId": "uploaded",
    }
    assert rec.state.apply(b, status.update(**done), ("Normal", "Completed", "uploaded snapshot s, 0.00 MB"))
    assert value("nightjar_backups_total", namespace=n, type="Uploaded", phase="Completed") == 1
    assert value("nightjar_backup_duration_seconds_sum", namespace=n, type="Uploaded") == 3600
    assert value("nightjar_backup_size_bytes", namespace=n, source="uploaded") == 42


def a_restore(namespace: str, **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "nightjar.dev/v1alpha1",
        "kind": "Restore",
        "metadata": {"name": "r1", "namespace": namespace, "uid": "uid-r1"},
        "spec": {
            "backupRef": {"name": "b1"},
            "contents": "DatabaseOnly",
            "target": {"database": {"secretRef": {"name": "db"}}},
        },
        "status": status,
    }


def test_restore_transitions_are_counted_once_with_their_duration(fixed_now: dt.datetime) -> None:
    n = ns()
    kube = FakeKube()
    body = kube.add("restores", a_restore(n))
    rec = restores(kube)
    started = fmt(NOW - dt.timedelta(seconds=90))
    job = {"metadata": {"name": "nightjar-restore-r1", "namespace": n}}
    rec._set(
        body, status.update(phase="Queued"), ("Normal", "Queued", "restore of Backup x/b1 into y queued")
    )
    rec.sync_from_job(body, {**job, "status": {"active": 1, "startTime": started}})
    rec.sync_from_job(body, {**job, "status": {"active": 1, "startTime": started}})
    kube.results = [{"snapshotId": "snap-1"}]
    done = {**job, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    stale = kube.get("restores", n, "r1") or {}
    rec.sync_from_job(copy.deepcopy(stale), done)
    rec.sync_from_job(copy.deepcopy(stale), done)
    rec.reconcile(kube.get("restores", n, "r1") or {})  # a restarted operator: terminal, nothing to do

    for phase in ("Queued", "Running", "Completed"):
        assert value("nightjar_restores_total", namespace=n, contents="DatabaseOnly", phase=phase) == 1
    assert value("nightjar_restore_duration_seconds_count", namespace=n, contents="DatabaseOnly") == 1
    assert value("nightjar_restore_duration_seconds_sum", namespace=n, contents="DatabaseOnly") == 90
    assert kube.reasons("r1") == ["Queued", "Running", "Completed"]


def a_schedule(namespace: str, **spec: Any) -> dict[str, Any]:
    return {
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
            "source": {"database": {"secretRef": {"name": "db"}}, "app": {"name": "shop"}},
            "window": {"start": "03:00", "duration": "1h"},
            **spec,
        },
    }


def test_a_missed_slot_is_counted_and_told_once() -> None:
    n = ns()
    kube = FakeKube()
    s = kube.add("backupschedules", a_schedule(n))
    now = dt.datetime(2026, 11, 24, 5, 0, tzinfo=UTC)  # the 03:00-04:00 window closed
    stale = copy.deepcopy(s)
    reports = [TickReport() for _ in range(3)]
    Scheduler(kube).reconcile(s, [], now, reports[0], busy=set())
    Scheduler(kube).reconcile(stale, [], now, reports[1], busy=set())  # lost: 409
    fresh = kube.get("backupschedules", n, "nightly") or {}
    Scheduler(kube).reconcile(fresh, [], now, reports[2], busy=set())

    assert value("nightjar_schedule_slots_missed_total", namespace=n, schedule="nightly") == 1
    assert kube.reasons("nightly") == ["Missed"]
    assert [len(r.missed) for r in reports] == [1, 0, 0]
    assert fresh["status"]["lastMissed"]["time"].startswith("2026-11-24T03:")


def test_a_skipped_slot_is_counted_once_with_a_reason_code() -> None:
    n = ns()
    kube = FakeKube()
    kube.workload = SimpleNamespace(status=SimpleNamespace(ready_replicas=0))
    s = kube.add("backupschedules", a_schedule(n))
    slot = sch.Plan.from_spec(n, "nightly", s["spec"]).previous_slot(
        dt.datetime(2026, 11, 24, 3, 59, 59, tzinfo=UTC)
    )
    assert slot is not None
    now = slot.time + dt.timedelta(seconds=1)
    Scheduler(kube).reconcile(s, [], now, TickReport(), busy=set())
    fresh = kube.get("backupschedules", n, "nightly") or {}
    Scheduler(kube).reconcile(fresh, [], now, TickReport(), busy=set())

    assert (
        value(
            "nightjar_schedule_slots_skipped_total", namespace=n, schedule="nightly", reason="AppNotRunning"
        )
        == 1
    )
    assert kube.reasons("nightly") == ["Skipped"]
    assert "no ready replica" in kube.events[0][3]


def test_an_invalid_schedule_is_told_once_and_again_when_fixed() -> None:
    n = ns()
    kube = FakeKube()
    now = dt.datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    s = a_schedule(n, schedule="not a cron")
    s["metadata"]["creationTimestamp"] = fmt(now)  # no slot of its own passed yet
    s = kube.add("backupschedules", s)
    Scheduler(kube).reconcile(s, [], now, TickReport(), busy=None)
    s = kube.get("backupschedules", n, "nightly") or {}
    Scheduler(kube).reconcile(s, [], now, TickReport(), busy=None)
    del kube.objects[("backupschedules", n, "nightly")]["spec"]["schedule"]
    s = kube.get("backupschedules", n, "nightly") or {}
    Scheduler(kube).reconcile(s, [], now, TickReport(), busy=None)
    assert kube.reasons("nightly") == ["InvalidSpec", "Scheduled"]


def test_gc_counts_deletions_and_deferrals_and_tells_the_schedule(fixed_now: dt.datetime) -> None:
    n = ns()
    kube = FakeKube()
    kube.add("backupschedules", a_schedule(n))
    expired = a_backup(n, "nightly-20261101", btype="Nightly", phase="Completed")
    expired["metadata"]["annotations"][ANNOTATION_EXPIRES_AT] = fmt(NOW - dt.timedelta(days=1))
    expired["metadata"]["labels"] = {LABEL_SCHEDULE: "nightly"}
    kube.add("backups", expired)  # its BackupStorage is gone: nothing stored to reach, it can go
    other = ns()
    stuck = a_backup(other, "b2", phase="Failed")
    stuck["metadata"]["annotations"][ANNOTATION_EXPIRES_AT] = fmt(NOW - dt.timedelta(days=1))
    kube.add("backups", stuck)
    kube.add(  # storage whose credentials are missing: unreachable, the deletion waits
        "backupstorages",
        {
            "metadata": {"name": "s3", "namespace": other},
            "spec": {"endpoint": "http://x", "bucket": "b", "credentials": {"secretName": "c"}},
        },
    )

    report = gc_sweep(kube, NOW)
    gc_sweep(kube, NOW)

    assert report.deleted == [f"{n}/nightly-20261101"] and report.deferred == [f"{other}/b2"]
    assert value("nightjar_gc_deletions_total", namespace=n) == 1
    assert value("nightjar_gc_deferred_total", namespace=other) == 2  # once per sweep it waited
    assert kube.reasons("nightly-20261101") == ["Expired"]
    assert kube.reasons("nightly") == ["BackupExpired"]
    # One Event per schedule per sweep, naming its expired Backups.
    assert kube.events[-1][3] == "1 backup expired and deleted with their stored objects: nightly-20261101"


def test_the_last_completed_gauges_only_move_forward_and_survive_a_restart() -> None:
    n = ns()
    newer = a_backup(n, "new", phase="Completed", sourceId="src", completedOn="2026-11-24T10:00:00Z")
    newer["status"]["sizeUncompressedBytes"] = 200
    older = a_backup(n, "old", phase="Completed", sourceId="src", completedOn="2026-11-23T10:00:00Z")
    older["status"]["sizeUncompressedBytes"] = 100
    metrics.completed_backup_seen(newer)
    metrics.completed_backup_seen(older)
    metrics.completed_backup_seen(a_backup(n, "run", phase="Running", sourceId="src"))
    ts = dt.datetime(2026, 11, 24, 10, tzinfo=UTC).timestamp()
    assert value("nightjar_last_successful_backup_timestamp_seconds", namespace=n, source="src") == ts
    assert value("nightjar_backup_size_bytes", namespace=n, source="src") == 200
    # Seeing Completed Backups never counts them: only transitions do.
    assert value("nightjar_backups_total", namespace=n, type="OnDemand", phase="Completed") == 0


def test_the_scheduler_tick_feeds_the_last_completed_gauges() -> None:
    n = ns()
    kube = FakeKube()
    kube.add("backups", a_backup(n, phase="Completed", sourceId="src", completedOn="2026-11-24T10:00:00Z"))
    Scheduler(kube).tick(NOW)
    assert value("nightjar_last_successful_backup_timestamp_seconds", namespace=n, source="src") == (
        dt.datetime(2026, 11, 24, 10, tzinfo=UTC).timestamp()
    )


def test_a_metric_update_never_raises_into_a_reconciler() -> None:
    metrics.backup_transition({}, None, "Queued", {})
    metrics.restore_transition({"metadata": {}}, None, "Completed", {})
    metrics.completed_backup_seen({"status": {"phase": "Completed"}})
    n = ns()
    odd = a_backup(n, phase="Completed", sourceId="s", completedOn="not a time")
    metrics.backup_transition(odd, "Running", "Completed", {"sizeUncompressedBytes": "many"})
    assert value("nightjar_backups_total", namespace=n, type="OnDemand", phase="Completed") == 1


def test_start_server_serves_the_metrics_over_http() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics.start_server(port, "127.0.0.1")
    metrics.gc_deleted("served-ns")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "# HELP nightjar_backups_total Backup phase transitions" in text
    assert "# TYPE nightjar_backup_duration_seconds histogram" in text
    assert 'nightjar_gc_deletions_total{namespace="served-ns"} 1.0' in text


def test_a_storage_tells_each_change_of_phase_once() -> None:
    n = ns()
    kube = FakeKube()
    body = kube.add(
        "backupstorages",
        {
            "kind": "BackupStorage",
            "metadata": {"name": "s3", "namespace": n, "generation": 1},
            "spec": {"endpoint": "http://x", "bucket": "b", "credentials": {"secretName": "creds"}},
        },
    )
    reconcile_storage(kube, body, NOW)
    reconcile_storage(kube, kube.get("backupstorages", n, "s3") or {}, NOW)
    assert [(r, m) for _, _, r, m in kube.events] == [
        ("Unavailable", f'credentials: Secret "creds" not found in namespace {n}')
    ]
    del kube.objects[("backupstorages", n, "s3")]
    gone = {**body, "status": {"phase": "Ready"}}
    reconcile_storage(kube, gone, NOW)  # deleted meanwhile: no error, no Event
    assert len(kube.events) == 1


# --- the gauges the chart's alerts read --------------------------------------------------------


def test_a_storage_check_sets_its_availability_and_a_deleted_storage_loses_it() -> None:
    n = ns()
    kube = FakeKube()
    body = kube.add(
        "backupstorages",
        {
            "kind": "BackupStorage",
            "metadata": {"name": "s3", "namespace": n, "generation": 1},
            "spec": {"endpoint": "http://x", "bucket": "b", "credentials": {"secretName": "creds"}},
        },
    )
    reconcile_storage(kube, body, NOW)
    assert G("nightjar_backupstorage_available", {"namespace": n, "storage": "s3"}) == 0
    metrics.storage_checked(n, "s3", True)
    assert G("nightjar_backupstorage_available", {"namespace": n, "storage": "s3"}) == 1
    metrics.storages_seen([])
    assert G("nightjar_backupstorage_available", {"namespace": n, "storage": "s3"}) is None


def test_the_tick_exports_each_schedule_and_its_last_success_and_forgets_deleted_ones() -> None:
    n = ns()
    kube = FakeKube()
    kube.add("backupschedules", a_schedule(n, suspend=True))
    done = a_backup(
        n, "nightly-20261124", phase="Completed", sourceId="src", completedOn="2026-11-24T03:10:00Z"
    )
    done["metadata"]["labels"] = {LABEL_SCHEDULE: "nightly"}
    kube.add("backups", done)
    Scheduler(kube).tick(NOW)
    labels = {"namespace": n, "schedule": "nightly"}
    assert G("nightjar_schedule_suspended", labels) == 1
    assert (
        G("nightjar_schedule_created_timestamp_seconds", labels)
        == dt.datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    )
    assert G("nightjar_schedule_last_successful_backup_timestamp_seconds", labels) == (
        dt.datetime(2026, 11, 24, 3, 10, tzinfo=UTC).timestamp()
    )
    # The slot counters exist at 0 before a first skip or miss, so Prometheus sees it as an increase.
    assert G("nightjar_schedule_slots_missed_total", labels) == 0
    assert G("nightjar_schedule_slots_skipped_total", {**labels, "reason": "AppNotRunning"}) == 0
    del kube.objects[("backupschedules", n, "nightly")]
    Scheduler(kube).tick(NOW)
    assert G("nightjar_schedule_suspended", labels) is None
    assert G("nightjar_schedule_created_timestamp_seconds", labels) is None


def test_a_backups_failed_series_exists_at_zero_from_its_first_transition(fixed_now: dt.datetime) -> None:
    n = ns()
    metrics.backup_transition(a_backup(n), None, "Queued", {})
    assert G("nightjar_backups_total", {"namespace": n, "type": "OnDemand", "phase": "Failed"}) == 0


def test_the_oldest_unreplicated_backup_is_exported_per_namespace_and_goes_when_none_waits() -> None:
    n = ns()
    metrics.unreplicated({n: 2}, {n: 1000.0})
    assert G("nightjar_replication_oldest_pending_timestamp_seconds", {"namespace": n}) == 1000.0
    metrics.unreplicated({}, {})
    assert G("nightjar_replication_oldest_pending_timestamp_seconds", {"namespace": n}) is None
    assert G("nightjar_backups_unreplicated", {"namespace": n}) == 0


def test_the_leader_gauge() -> None:
    metrics.leader(False)
    assert G("nightjar_leader") == 0
    metrics.leader(True)
    assert G("nightjar_leader") == 1
