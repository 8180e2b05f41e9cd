"""Storage is the source of truth (issue 14): Backups come back from the bucket after their
namespace is deleted and re-created, and the bucket side is swept of what no Backup stands for.

The stack's operator syncs each BackupStorage when it is created and every 10 s, and deletes an
attempt's leftovers 30 s after their last write (production: 15 min, 24 h).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client.rest import ApiException

from nightjar.devstack.stack import Stack
from nightjar.domain.retention import format_time
from tests.integration.helpers import (
    TABLE_CHECKSUMS,
    G,
    V,
    backup_body,
    backup_gone,
    get_backup,
    make_storage,
    namespace_gone,
    psql,
    take_backup,
)
from tests.integration.test_restore import restore_body, wait_restore
from tests.support import wait_for


def _delete_and_recreate_namespace(core: client.CoreV1Api, ns: str, db_secret: Any) -> None:
    """`kubectl delete namespace`, then the namespace and its database Secret again."""
    core.delete_namespace(ns)
    wait_for(f"namespace {ns} to be gone", lambda: namespace_gone(core, ns), 30)
    core.create_namespace({"metadata": {"name": ns, "labels": {"nightjar.dev/test": "true"}}})
    wait_for(
        "the default ServiceAccount",
        lambda: any(sa.metadata.name == "default" for sa in core.list_namespaced_service_account(ns).items),
        30,
    )
    core.create_namespaced_secret(ns, {"metadata": {"name": "db"}, "data": db_secret.data})


def _keys(s3: Any, bucket: str, prefix: str) -> set[str]:
    out: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out |= {o["Key"] for o in page.get("Contents", [])}
    return out


def _completed(custom: client.CustomObjectsApi, ns: str, names: list[str]) -> dict[str, Any] | None:
    found = {}
    for name in names:
        try:
            b = get_backup(custom, ns, name)
        except ApiException:
            return None
        if (b.get("status") or {}).get("phase") != "Completed":
            return None
        found[name] = b
    return found


def test_backups_come_back_from_the_bucket_after_their_namespace_is_deleted(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    s3: Any,
) -> None:
    make_storage(custom, core, env, namespace)
    names = ["monday", "tuesday", "wednesday"]
    before = {}
    for name in names:
        before[name] = take_backup(
            custom, namespace, backup_body(name, files=False, comment=f"the {name} backup")
        )
    rows = psql(env, app_db, TABLE_CHECKSUMS)
    bucket, prefix = env["NIGHTJAR_S3_BUCKET_PLAIN"], f"tests/{namespace}/"
    stored = _keys(s3, bucket, prefix)
    db_secret = core.read_namespaced_secret("db", namespace)

    _delete_and_recreate_namespace(core, namespace, db_secret)
    assert _keys(s3, bucket, prefix) == stored
    started = time.monotonic()
    storage = make_storage(custom, core, env, namespace)
    back = wait_for(
        "the 3 Backups re-created and Completed", lambda: _completed(custom, namespace, names), 60
    )
    print(f"3 Backups re-created and verified {time.monotonic() - started:.1f}s after the BackupStorage")

    for name in names:
        st, old = back[name]["status"], before[name]
        assert back[name]["metadata"]["labels"]["nightjar.dev/synced"] == "true"
        assert st["snapshotId"] == old["snapshotId"]
        assert st["expiresOn"] == old["expiresOn"]
        assert st["storage"]["manifestKey"] == old["storage"]["manifestKey"]
        assert st["sizeUncompressedBytes"] == old["sizeUncompressedBytes"] > 0
        assert back[name]["spec"]["comment"] == f"the {name} backup"
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=monday").items
    assert any(e.reason == "Synced" for e in events)
    assert (storage := custom.get_namespaced_custom_object(G, V, namespace, "backupstorages", "s3"))
    wait_for(
        "the storage's sync status",
        lambda: (
            (custom.get_namespaced_custom_object(G, V, namespace, "backupstorages", "s3").get("status") or {})
            .get("sync", {})
            .get("snapshots")
            == 3
        ),
        30,
    )

    # Deleted on purpose: its data goes, and no sync brings it back. Shared content stays: the
    # other two still restore.
    custom.delete_namespaced_custom_object(G, V, namespace, "backups", "monday")
    wait_for("monday deleted", lambda: backup_gone(custom, namespace, "monday"), 60)
    assert before["monday"]["storage"]["manifestKey"] not in _keys(s3, bucket, prefix)
    time.sleep(12)  # a sync or two
    assert backup_gone(custom, namespace, "monday")

    psql(env, app_db, f"set role {app_db}; delete from orders where id % 2 = 0")
    custom.create_namespaced_custom_object(G, V, namespace, "restores", restore_body("back", "tuesday"))
    st = wait_restore(custom, namespace, "back")
    assert st["phase"] == "Completed", st.get("message")
    assert psql(env, app_db, TABLE_CHECKSUMS) == rows

    # A synced Backup expires like any other: garbage collection deletes it and its objects.
    past = format_time(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    custom.patch_namespaced_custom_object(
        G,
        V,
        namespace,
        "backups",
        "wednesday",
        {"metadata": {"annotations": {"nightjar.dev/expires-at": past}}},
    )
    wait_for("wednesday collected", lambda: backup_gone(custom, namespace, "wednesday"), 60)
    left = _keys(s3, bucket, prefix)
    assert before["wednesday"]["storage"]["manifestKey"] not in left
    assert before["tuesday"]["storage"]["manifestKey"] in left
    assert storage


def test_the_orphan_sweep_deletes_expired_snapshots_and_leftovers_and_keeps_shared_content(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    s3: Any,
) -> None:
    make_storage(custom, core, env, namespace)
    bucket, prefix = env["NIGHTJAR_S3_BUCKET_PLAIN"], f"tests/{namespace}/"
    soon = format_time(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=75))
    short = backup_body("short-lived", files=False)
    short["metadata"]["annotations"] = {"nightjar.dev/expires-at": soon}
    old = take_backup(custom, namespace, short)
    kept = take_backup(custom, namespace, backup_body("kept", files=False))
    source = old["storage"]["manifestKey"].rsplit("/", 3)[0]
    # An attempt that never wrote its manifest (its Backup deleted while the Job ran), and a key
    # that is not a snapshot at all.
    leftover = f"{source}/{uuid.uuid4()}/pod-x/packs/000001.pack"
    s3.put_object(Bucket=bucket, Key=leftover, Body=b"half a pack")
    stray = f"{prefix}nightjar/v1/{namespace}/not-a-snapshot.txt"
    s3.put_object(Bucket=bucket, Key=stray, Body=b"hello")
    # (In a source of its own: a manifest nobody can read might share content with its source's
    # snapshots, so while it is there nothing of that source is swept.)
    garbled = f"{prefix}nightjar/v1/{namespace}/0000000000000000/{uuid.uuid4()}/pod-y/manifest.json"
    s3.put_object(Bucket=bucket, Key=garbled, Body=b"{not json")
    db_secret = core.read_namespaced_secret("db", namespace)

    _delete_and_recreate_namespace(core, namespace, db_secret)
    # Sync off: the sweep alone.
    body = {
        "apiVersion": f"{G}/{V}",
        "kind": "BackupStorage",
        "metadata": {"name": "s3"},
        "spec": {
            "endpoint": env["NIGHTJAR_S3_ENDPOINT"],
            "bucket": bucket,
            "region": "us-east-1",
            "prefix": f"tests/{namespace}",
            "credentials": {"secretName": "s3-creds"},
            "objectLock": {"mode": "None"},
            "jurisdiction": "EU",
            "sync": {"enabled": False},
        },
    }
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-creds"},
            "stringData": {
                "AWS_ACCESS_KEY_ID": env["NIGHTJAR_S3_ACCESS_KEY"],
                "AWS_SECRET_ACCESS_KEY": env["NIGHTJAR_S3_SECRET_KEY"],
            },
        },
    )
    custom.create_namespaced_custom_object(G, V, namespace, "backupstorages", body)

    def swept() -> bool:
        keys = _keys(s3, bucket, prefix)
        return old["storage"]["manifestKey"] not in keys and leftover not in keys

    wait_for("the expired snapshot and the leftovers swept", swept, 150)
    keys = _keys(s3, bucket, prefix)
    # Never deleted because of what it does not understand: a stray key, a manifest that does
    # not parse (each named in a Warning Event).
    assert {kept["storage"]["manifestKey"], stray, garbled} <= keys
    assert not custom.list_namespaced_custom_object(G, V, namespace, "backups")["items"]
    events = core.list_namespaced_event(namespace).items
    assert {"OrphanDeleted", "NotASnapshot", "BadManifest"} <= {e.reason for e in events}
    assert any(e.reason == "BadManifest" and garbled in e.message for e in events)

    # Sync on: the unexpired one comes back, and restores: the sweep kept what it shares.
    custom.patch_namespaced_custom_object(
        G, V, namespace, "backupstorages", "s3", {"spec": {"sync": {"enabled": True}}}
    )
    wait_for("kept re-created", lambda: _completed(custom, namespace, ["kept"]), 60)
    custom.create_namespaced_custom_object(G, V, namespace, "restores", restore_body("back", "kept"))
    st = wait_restore(custom, namespace, "back")
    assert st["phase"] == "Completed", st.get("message")


def test_a_new_cluster_on_the_same_bucket_lists_the_backups_and_restores_them(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    tmp_path: Path,
) -> None:
    """The day the cluster is lost: a second stack (its own etcd, API server and operator; the
    process node, which needs no root) is given the namespace, the database Secret and a
    BackupStorage on the first stack's bucket. Its Backups appear, and one restores."""
    make_storage(custom, core, env, namespace)
    took = take_backup(custom, namespace, backup_body("nightly", files=False, comment="before the loss"))
    rows = psql(env, app_db, TABLE_CHECKSUMS)
    db_secret = core.read_namespaced_secret("db", namespace)

    other = Stack(tmp_path / "new-cluster", out=lambda _line: None)
    try:
        started = time.monotonic()
        other.up(with_operator=True, node="process")
        print(f"second stack up in {time.monotonic() - started:.0f}s")
        api = kube_config.new_client_from_config(str(tmp_path / "new-cluster" / "kubeconfig"))
        core2, custom2 = client.CoreV1Api(api), client.CustomObjectsApi(api)
        core2.create_namespace({"metadata": {"name": namespace}})
        wait_for(
            "the default ServiceAccount",
            lambda: any(
                sa.metadata.name == "default" for sa in core2.list_namespaced_service_account(namespace).items
            ),
            30,
        )
        core2.create_namespaced_secret(namespace, {"metadata": {"name": "db"}, "data": db_secret.data})
        started = time.monotonic()
        make_storage(custom2, core2, env, namespace)
        back = wait_for(
            "the Backup in the new cluster", lambda: _completed(custom2, namespace, ["nightly"]), 60
        )
        print(f"the Backup appeared Completed {time.monotonic() - started:.1f}s after the BackupStorage")
        st = back["nightly"]["status"]
        assert st["snapshotId"] == took["snapshotId"] and st["expiresOn"] == took["expiresOn"]
        assert back["nightly"]["spec"]["comment"] == "before the loss"

        psql(env, app_db, f"set role {app_db}; delete from orders where id > 2500")
        custom2.create_namespaced_custom_object(G, V, namespace, "restores", restore_body("back", "nightly"))
        done = wait_restore(custom2, namespace, "back")
        assert done["phase"] == "Completed", done.get("message")
        assert psql(env, app_db, TABLE_CHECKSUMS) == rows
    finally:
        other.down(quiet=True)
