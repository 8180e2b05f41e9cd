"""The chart's alerts and dashboard read metrics the operator really exports: after a backup, a
failure, a replication, a restore, restore drills (one passed, one refused) and garbage collection
(a deletion and a deferral) on the real stack, the dev operator's /metrics has every metric name
the rules and the dashboard use, with the labels they use, for this test's namespace. A renamed
metric or label breaks this, not the pager.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import urllib.request
from collections import defaultdict
from typing import Any

from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from tests.chartmetrics import all_uses
from tests.integration.helpers import G, V, backup_body, get_backup, make_storage, take_backup, wait_terminal
from tests.integration.test_replication import storage, storage_status
from tests.integration.test_verification import verification, wait_ended
from tests.support import wait_for


def metrics_text(env: dict[str, str]) -> str:
    with urllib.request.urlopen(env["NIGHTJAR_METRICS_URL"], timeout=10) as r:  # noqa: S310 - the stack's URL
        text: str = r.read().decode()
    return text


def scrape(env: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """Sample name -> the label sets of its samples, from the dev operator's /metrics."""
    out: dict[str, list[dict[str, str]]] = defaultdict(list)
    for family in text_string_to_metric_families(metrics_text(env)):
        for s in family.samples:
            out[s.name].append(dict(s.labels))
    return out


def missing(env: dict[str, str], ns: str) -> list[str]:
    """What the rules and the dashboard use that /metrics lacks (for namespace ``ns``)."""
    got = scrape(env)
    out = []
    for name, labels in sorted(all_uses().items()):
        series = [s for s in got.get(name, []) if "namespace" not in labels or s.get("namespace") == ns]
        if not any(labels <= set(s) for s in series):
            have = sorted({k for s in got.get(name, []) for k in s})
            out.append(f"{name}{{{','.join(sorted(labels))}}} (exported with: {have or 'nothing'})")
    return out


def expire(custom: client.CustomObjectsApi, ns: str, name: str) -> None:
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    custom.patch_namespaced_custom_object(
        G, V, ns, "backups", name, {"metadata": {"annotations": {"nightjar.dev/expires-at": past}}}
    )


def value(env: dict[str, str], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        float(s.value)
        for f in text_string_to_metric_families(metrics_text(env))
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_every_metric_the_rules_and_the_dashboard_use_is_exported_with_its_labels(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    scratch: str,
) -> None:
    ns = namespace
    # Storages: "dr" a real replica, "dead" one nobody answers at (replica of "s3", so its copies
    # stay pending, and a primary of its own, so GC must defer), "plain" a primary without replicas.
    storage(custom, core, env, ns, "dr", "replica", "EU", locked=False)
    wait_for("dr Ready", lambda: storage_status(custom, ns, "dr").get("phase") == "Ready", 30)
    core.create_namespaced_secret(
        ns,
        {
            "metadata": {"name": "dead-creds"},
            "stringData": {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
        },
    )
    custom.create_namespaced_custom_object(
        G,
        V,
        ns,
        "backupstorages",
        {
            "apiVersion": f"{G}/{V}",
            "kind": "BackupStorage",
            "metadata": {"name": "dead"},
            "spec": {
                "endpoint": "http://127.0.0.1:9",  # discard port: connection refused
                "bucket": "nowhere",
                "region": "us-east-1",
                "credentials": {"secretName": "dead-creds"},
                "objectLock": {"mode": "None"},
                "jurisdiction": "EU",
            },
        },
    )
    wait_for("dead Unavailable", lambda: storage_status(custom, ns, "dead").get("phase") == "Unavailable", 60)
    storage(custom, core, env, ns, "s3", "primary", "EU", replicas=["dr", "dead"], locked=False)
    wait_for("s3 Ready", lambda: storage_status(custom, ns, "s3").get("phase") == "Ready", 60)
    make_storage(custom, core, env, ns, name="plain")

    # A schedule (suspended: it takes nothing itself) and a Backup of it that completes.
    custom.create_namespaced_custom_object(
        G,
        V,
        ns,
        "backupschedules",
        {
            "apiVersion": f"{G}/{V}",
            "kind": "BackupSchedule",
            "metadata": {"name": "nightly"},
            "spec": {
                "storageRef": {"name": "s3"},
                "source": {"database": {"secretRef": {"name": "db"}}},
                "window": {"start": "02:00", "duration": "1h"},
                "suspend": True,
            },
        },
    )
    body = backup_body("nightly-manual", files=False, storage="s3")
    body["metadata"]["labels"] = {"nightjar.dev/schedule": "nightly"}
    take_backup(custom, ns, body)
    # Replicated into dr, pending for dead.
    wait_for(
        "nightly-manual replicated to dr",
        lambda: any(
            loc["storage"] == "dr" and loc["state"] == "Replicated"
            for loc in (get_backup(custom, ns, "nightly-manual").get("status") or {}).get("locations") or []
        ),
        180,
    )

    # A failure (its database Secret does not exist), into the dead storage; then expired: GC
    # must defer it, the storage being unreachable.
    bad = backup_body("lost", files=False, storage="dead")
    bad["spec"]["source"]["database"]["secretRef"]["name"] = "nope"
    custom.create_namespaced_custom_object(G, V, ns, "backups", bad)
    assert wait_terminal(custom, ns, "lost", timeout=180)["status"]["phase"] == "Failed"
    expire(custom, ns, "lost")

    # A Backup that GC deletes.
    take_backup(custom, ns, backup_body("old", files=False, storage="plain"))
    expire(custom, ns, "old")

    # A restore of the scheduled Backup.
    custom.create_namespaced_custom_object(
        G,
        V,
        ns,
        "restores",
        {
            "apiVersion": f"{G}/{V}",
            "kind": "Restore",
            "metadata": {"name": "r"},
            "spec": {
                "backupRef": {"name": "nightly-manual"},
                "contents": "DatabaseOnly",
                "target": {"database": {"secretRef": {"name": "db"}}},
            },
        },
    )

    def restored() -> dict[str, Any] | None:
        st = custom.get_namespaced_custom_object(G, V, ns, "restores", "r").get("status") or {}
        return st if st.get("phase") in ("Completed", "Failed") else None

    assert wait_for("restore r to finish", restored, 180)["phase"] == "Completed"

    # Restore drills: one of the scheduled Backup that passes, one of a missing Backup (refused).
    for name, backup in (("drill", "nightly-manual"), ("ghost", "nope")):
        custom.create_namespaced_custom_object(G, V, ns, "verifications", verification(name, backup))
    assert wait_ended(custom, ns, "drill")["status"]["phase"] == "Passed"
    assert wait_ended(custom, ns, "ghost", 60)["status"]["phase"] == "Failed"

    wait_for("GC deleted old", lambda: value(env, "nightjar_gc_deletions_total", namespace=ns) >= 1, 60)
    wait_for("GC deferred lost", lambda: value(env, "nightjar_gc_deferred_total", namespace=ns) >= 1, 60)
    # Everything the alerts and the dashboard read, for this namespace, with its labels.
    with contextlib.suppress(AssertionError):  # the assertion below names what is missing
        wait_for("every metric of the rules and the dashboard", lambda: not missing(env, ns), 60)
    assert missing(env, ns) == []

    # And the values mean what the alerts assume.
    assert value(env, "nightjar_backupstorage_available", namespace=ns, storage="dead") == 0
    assert value(env, "nightjar_backupstorage_available", namespace=ns, storage="s3") == 1
    assert value(env, "nightjar_backups_total", namespace=ns, phase="Failed") == 1
    assert value(env, "nightjar_backups_unreplicated", namespace=ns) >= 1
    assert value(env, "nightjar_schedule_suspended", namespace=ns, schedule="nightly") == 1
    completed = get_backup(custom, ns, "nightly-manual")["status"]["completedOn"]
    when = dt.datetime.strptime(completed, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()
    assert value(env, "nightjar_schedule_last_successful_backup_timestamp_seconds", namespace=ns) == when
    assert value(env, "nightjar_replication_oldest_pending_timestamp_seconds", namespace=ns) == when
    assert value(env, "nightjar_replications_total", namespace=ns, replica="dr", result="Replicated") == 1
    assert value(env, "nightjar_verifications_total", namespace=ns, result="Passed") == 1
    assert value(env, "nightjar_verifications_total", namespace=ns, result="Failed") == 1
    assert value(env, "nightjar_verification_restore_seconds_count", namespace=ns) == 1
    source = get_backup(custom, ns, "nightly-manual")["status"]["sourceId"]
    drilled = get_backup(custom, ns, "nightly-manual")["status"]["verification"]["time"]
    at = dt.datetime.strptime(drilled, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()
    last = value(env, "nightjar_backup_last_verified_timestamp_seconds", namespace=ns, source=source)
    assert at <= last < at + 1  # the drill's end; status.verification.time is whole seconds
    assert value(env, "nightjar_leader") == 1
