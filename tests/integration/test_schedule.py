"""BackupSchedules and garbage collection on the real stack (operator sweeps every few seconds)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from kubernetes import client

from nightjar.devstack.stack import Stack, State
from nightjar.domain import schedule as sch
from nightjar.domain.retention import format_time
from tests.integration.helpers import (
    G,
    V,
    backup_body,
    backup_gone,
    get_backup,
    make_storage,
    take_backup,
    wait_terminal,
)
from tests.support import wait_for


def open_window_schedule(namespace: str, **spec: Any) -> tuple[dict[str, Any], sch.Slot]:
    """A schedule whose window is open now and whose slot has just passed."""
    now = dt.datetime.now(dt.UTC)
    name = next(
        n
        for n in (f"nightly-{i}" for i in range(200))
        if sch.offset(namespace, n, dt.timedelta(hours=1)) < dt.timedelta(minutes=50)
    )
    off = sch.offset(namespace, name, dt.timedelta(hours=1))
    start = (now - off - dt.timedelta(seconds=90)).replace(second=0, microsecond=0)
    body = {
        "apiVersion": f"{G}/{V}",
        "kind": "BackupSchedule",
        "metadata": {"name": name},
        "spec": {
            "storageRef": {"name": "s3"},
            "source": {"database": {"secretRef": {"name": "db"}}},
            "window": {"start": start.strftime("%H:%M"), "duration": "1h"},
            "contents": "DatabaseOnly",
            **spec,
        },
    }
    plan = sch.Plan.from_spec(namespace, name, body["spec"])
    slot = plan.previous_slot(now)
    assert slot is not None
    assert slot.time <= now < slot.window_end
    return body, slot


def scheduled(custom: client.CustomObjectsApi, ns: str, schedule: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = custom.list_namespaced_custom_object(
        G, V, ns, "backups", label_selector=f"nightjar.dev/schedule={schedule}"
    )["items"]
    return items


def test_open_window_produces_exactly_one_backup_with_its_tier_and_expiry_even_across_a_restart(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
) -> None:
    make_storage(custom, core, env, namespace)
    body, slot = open_window_schedule(namespace, comment="nightly")
    name = body["metadata"]["name"]
    custom.create_namespaced_custom_object(G, V, namespace, "backupschedules", body)
    (backup,) = wait_for("the night's backup", lambda: scheduled(custom, namespace, name), 30)
    assert backup["metadata"]["name"] == slot.name == f"{name}-{slot.time:%Y%m%d}"
    assert backup["spec"]["type"] == slot.tier == sch.tier(slot.time.date())
    assert backup["metadata"]["labels"]["nightjar.dev/tier"] == slot.tier
    assert backup["metadata"]["annotations"]["nightjar.dev/expires-at"] == format_time(slot.expires)
    assert not backup["metadata"].get("ownerReferences")  # deleting the schedule keeps it
    st = wait_terminal(custom, namespace, slot.name)["status"]
    assert st["phase"] == "Completed", st.get("message")
    assert st["expiresOn"] == format_time(slot.expires)

    # Kill the operator and start it again inside the same window: still exactly one.
    stack = Stack(Path(env["NIGHTJAR_STATE_DIR"]))
    state = State.load(stack.dir)
    assert state is not None
    os.kill(next(p for p in state.procs if p.name == "operator").pid, signal.SIGKILL)
    stack.restart_operator()
    time.sleep(10)  # several scheduler ticks
    assert [b["metadata"]["name"] for b in scheduled(custom, namespace, name)] == [slot.name]

    def status() -> dict[str, Any] | None:
        s = custom.get_namespaced_custom_object(G, V, namespace, "backupschedules", name).get("status") or {}
        return s if s.get("lastSuccessfulBackup") == slot.name else None

    s = wait_for("schedule status", status, 30)
    assert s["lastBackup"] == slot.name
    assert s["lastBackupStatus"] == "Completed"
    nxt = sch.Plan.from_spec(namespace, name, body["spec"]).next_slot(dt.datetime.now(dt.UTC))
    assert s["nextBackupTime"] == format_time(nxt.time)
    assert s["nextTier"] == nxt.tier
    assert s["backups"][slot.tier.lower()] == 1

    custom.delete_namespaced_custom_object(G, V, namespace, "backupschedules", name)
    wait_for(
        "schedule gone",
        lambda: not custom.list_namespaced_custom_object(G, V, namespace, "backupschedules")["items"],
        30,
    )
    assert get_backup(custom, namespace, slot.name)["status"]["phase"] == "Completed"


def test_a_slot_is_skipped_when_the_app_has_no_ready_replica(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    api_client: client.ApiClient,
    env: dict[str, str],
    namespace: str,
    app_db: str,
) -> None:
    make_storage(custom, core, env, namespace)
    client.AppsV1Api(api_client).create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "shop"},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": {"app": "shop"}},
                "template": {
                    "metadata": {"labels": {"app": "shop"}},
                    "spec": {
                        "containers": [{"name": "app", "image": "busybox", "command": ["sleep", "3600"]}]
                    },
                },
            },
        },
    )
    body, slot = open_window_schedule(namespace)
    body["spec"]["source"]["app"] = {"kind": "Deployment", "name": "shop"}
    name = body["metadata"]["name"]
    custom.create_namespaced_custom_object(G, V, namespace, "backupschedules", body)

    def skipped() -> dict[str, Any] | None:
        s = custom.get_namespaced_custom_object(G, V, namespace, "backupschedules", name).get("status") or {}
        return s.get("lastSkipped")

    entry = wait_for("the slot to be skipped", skipped, 30)
    assert entry == {
        "time": format_time(slot.time),
        "reason": "the app is not running (Deployment shop has no ready replica)",
    }
    time.sleep(6)
    assert scheduled(custom, namespace, name) == []
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    assert "Skipped" in {e.reason for e in events}


def _expire(custom: client.CustomObjectsApi, ns: str, name: str, keep: bool = False) -> None:
    ann = {"nightjar.dev/expires-at": "2020-01-01T00:00:00Z"}
    if keep:
        ann["nightjar.dev/keep"] = "true"
    custom.patch_namespaced_custom_object(G, V, ns, "backups", name, {"metadata": {"annotations": ann}})


def test_gc_deletes_expired_backups_and_their_objects_keeps_pinned_ones_and_shared_content(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    s3: Any,
) -> None:
    make_storage(custom, core, env, namespace)
    bucket = env["NIGHTJAR_S3_BUCKET_PLAIN"]
    for name in ("old", "new", "pinned"):
        body = backup_body(name)
        if name == "pinned":
            body["spec"]["contents"] = "DatabaseOnly"  # shares no file content (dump chunks it may)
        take_backup(custom, namespace, body)
    manifests = {
        n: json.loads(
            s3.get_object(
                Bucket=bucket, Key=get_backup(custom, namespace, n)["status"]["storage"]["manifestKey"]
            )["Body"].read()
        )
        for n in ("old", "new", "pinned")
    }
    old_keys = {o["key"] for o in manifests["old"]["objects"]}
    new_keys = {o["key"] for o in manifests["new"]["objects"]}
    pinned_keys = {o["key"] for o in manifests["pinned"]["objects"]}
    shared = old_keys & new_keys
    assert shared  # "new" reused the packs "old" uploaded

    _expire(custom, namespace, "old")
    _expire(custom, namespace, "pinned", keep=True)
    wait_for("GC to delete the expired backup", lambda: backup_gone(custom, namespace, "old"), 60)
    listed = {
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"tests/{namespace}/").get("Contents", [])
    }
    assert not (old_keys - shared - pinned_keys) & listed  # its own objects are gone...
    assert shared <= listed  # ...but content "new" still uses stays
    assert new_keys <= listed
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=old").items
    assert "Expired" in {e.reason for e in events}

    _expire(custom, namespace, "new")
    wait_for("GC to delete the second backup", lambda: backup_gone(custom, namespace, "new"), 60)
    listed = {
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"tests/{namespace}/").get("Contents", [])
    }
    # the last referrer took the shared content with it; what the kept Backup uses stays (the
    # dump's chunks after its first 64 KiB are the same in all three: its packs may be old's)
    assert not ((old_keys | new_keys) - pinned_keys) & listed
    assert pinned_keys <= listed
    time.sleep(6)
    assert get_backup(custom, namespace, "pinned")["status"]["phase"] == "Completed"
