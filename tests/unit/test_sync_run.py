"""One storage sync pass over an in-memory bucket with a fake Kubernetes: which Backups it
re-creates, which snapshots it skips and says so, and what it sweeps (issue 14)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from nightjar.config import OperatorConfig
from nightjar.constants import ANNOTATION_EXPIRES_AT, ANNOTATION_SYNCED_FROM, LABEL_SYNCED, LABEL_TIER
from nightjar.reconcile import storage as storage_rec
from nightjar.reconcile.sync import StorageSync
from nightjar.storage import layout
from nightjar.storage.crypto import new_key_text
from nightjar.storage.manifest import Database, Manifest, StoredObject, Stream
from nightjar.storage.objects import S3Target
from tests.fakes import FakeKube
from tests.memstore import MemoryStore

NOW = dt.datetime(2026, 11, 30, 12, tzinfo=dt.UTC)
PREFIX = "team"
SRC = layout.source_prefix(PREFIX, "shop", "src1")
SPEC = {"storageRef": {"name": "old-name"}, "source": {"database": {"secretRef": {"name": "db"}}}}


def a_kube(backups: list[dict[str, Any]], storages: list[dict[str, Any]]) -> FakeKube:
    kube = FakeKube()
    for b in backups:
        kube.add("backups", b)
    for st in storages:
        kube.add("backupstorages", st)
    return kube


def created(kube: FakeKube) -> list[dict[str, Any]]:
    """The Backups the sync made."""
    return [
        o
        for (p, _, _), o in kube.objects.items()
        if p == "backups" and "nightjar.dev/synced" in (o["metadata"].get("labels") or {})
    ]


@pytest.fixture
def mem(monkeypatch: pytest.MonkeyPatch) -> MemoryStore:
    m = MemoryStore("bk")
    target = S3Target("http://s3.test", "bk", "us-east-1", "AKIA", "secret", prefix=PREFIX)
    monkeypatch.setattr(storage_rec, "target_for", lambda kube, ns, spec: target)
    monkeypatch.setattr(storage_rec, "store_of", lambda t: m)
    return m


def snapshot(
    mem: MemoryStore, uid: str, *, expires: dt.datetime, record: dict[str, Any] | None = None
) -> str:
    """A snapshot of Backup ``uid`` in the bucket: one dump object and its manifest."""
    dump = f"{SRC}{uid}/pod/packs/000001.pack"
    mem.put(dump, b"x")
    m = Manifest(
        snapshot_id="pod",
        created_on="2026-11-29T03:00:00Z",
        expires_on=expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        objects=[StoredObject(dump, 1, "")],
        database=Database(Stream(bytes=1, sha256="")),
        backup={"namespace": "shop", "name": "nightly", "uid": uid, "type": "Nightly"}
        if record is None
        else record,
    )
    key = f"{SRC}{uid}/pod/manifest.json"
    mem.put(key, m.to_bytes())
    return key


def storage(name: str = "primary", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "nightjar.dev/v1alpha1",
        "kind": "BackupStorage",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": spec,
    }


def run(kube: FakeKube, st: dict[str, Any], mem: MemoryStore) -> Any:
    return StorageSync(kube, OperatorConfig(), open_store=lambda target: mem).run(st, NOW)


FUTURE = NOW + dt.timedelta(days=30)


def full_record(uid: str, name: str = "nightly", ns: str = "shop") -> dict[str, Any]:
    return {
        "namespace": ns,
        "name": name,
        "uid": uid,
        "type": "Nightly",
        "spec": {**SPEC, "type": "Nightly", "comment": "before"},
        "labels": {LABEL_TIER: "Nightly", "not-kept": "x"},
    }


def test_a_snapshot_no_backup_stands_for_is_recreated_completed_by_the_reconciler(mem: MemoryStore) -> None:
    key = snapshot(mem, "uid-1", expires=FUTURE, record=full_record("uid-1"))
    st = storage()
    kube = a_kube([], [st])
    report = run(kube, st, mem)
    (body,) = created(kube)
    assert body["metadata"]["name"] == "nightly"
    assert body["metadata"]["labels"] == {LABEL_TIER: "Nightly", LABEL_SYNCED: "true"}
    assert body["metadata"]["annotations"] == {
        ANNOTATION_EXPIRES_AT: FUTURE.strftime("%Y-%m-%dT%H:%M:%SZ"),
        ANNOTATION_SYNCED_FROM: key,
    }
    # The spec it was taken with, in the storage that holds it now.
    assert body["spec"] == {**SPEC, "type": "Nightly", "comment": "before", "storageRef": {"name": "primary"}}
    assert (
        report.created == ["nightly"]
        and kube.status_of("backupstorages", "shop", st["metadata"]["name"])["sync"]["created"] == 1
    )
    assert (
        "nightly",
        "Normal",
        "Synced",
        f"re-created from snapshot pod in BackupStorage primary ({key})",
    ) in kube.events


def test_a_backup_that_stands_for_it_or_a_taken_name_is_respected(mem: MemoryStore) -> None:
    snapshot(mem, "uid-1", expires=FUTURE, record=full_record("uid-1"))
    st = storage()
    live = {"metadata": {"name": "other", "namespace": "shop", "uid": "uid-1"}, "spec": SPEC}
    kube = a_kube([live], [st])
    run(kube, st, mem)
    assert created(kube) == []
    taken = {"metadata": {"name": "nightly", "namespace": "shop", "uid": "uid-9"}, "spec": SPEC}
    kube = a_kube([taken], [st])
    run(kube, st, mem)
    assert [b["metadata"]["name"] for b in created(kube)] == ["nightly-uid-1"]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        # Its keys say namespace shop, its manifest another tenant's Backup.
        (full_record("uid-1", ns="other-tenant"), "NotThisNamespace"),
        (full_record("uid-other"), "NotThisNamespace"),
        # Written before manifests kept the spec.
        ({"namespace": "shop", "name": "nightly", "uid": "uid-1", "type": "Nightly"}, "CannotRecreate"),
    ],
)
def test_a_snapshot_that_cannot_be_this_namespaces_backup_is_skipped_and_said(
    mem: MemoryStore, record: dict[str, Any], reason: str
) -> None:
    snapshot(mem, "uid-1", expires=FUTURE, record=record)
    st = storage()
    kube = a_kube([], [st])
    report = run(kube, st, mem)
    assert created(kube) == [] and report.skipped == 1
    assert [r for _, _, r, _ in kube.events] == [reason]


def test_a_replica_or_a_storage_with_sync_off_is_swept_never_synced(mem: MemoryStore) -> None:
    snapshot(mem, "uid-1", expires=FUTURE, record=full_record("uid-1"))
    expired = snapshot(mem, "uid-2", expires=NOW - dt.timedelta(days=1), record=full_record("uid-2", "old"))
    replica = storage("dr")
    primary = storage("primary", replicas=[{"name": "dr"}])
    kube = a_kube([], [primary, replica])
    report = run(kube, replica, mem)
    assert created(kube) == []
    assert report.expired_deleted == 1 and expired not in mem.objects
    assert f"{SRC}uid-1/pod/manifest.json" in mem.objects
    off = storage("primary", sync={"enabled": False})
    kube = a_kube([], [off])
    run(kube, off, mem)
    assert created(kube) == []


def test_a_failed_listing_is_reported_in_status_not_raised(mem: MemoryStore) -> None:
    mem.down = "cannot connect to the S3 endpoint"
    st = storage()
    kube = a_kube([], [st])
    report = run(kube, st, mem)
    assert report.error.startswith("sync failed:") and "cannot connect" in report.error
    assert kube.status_of("backupstorages", "shop", st["metadata"]["name"])["sync"]["message"] == report.error


def test_a_missing_encryption_key_skips_recreation_once_said_and_the_sweep_goes_on(mem: MemoryStore) -> None:
    snapshot(mem, "uid-1", expires=FUTURE, record=full_record("uid-1", name="one"))
    snapshot(mem, "uid-2", expires=FUTURE, record=full_record("uid-2", name="two"))
    expired = snapshot(mem, "uid-3", expires=NOW - dt.timedelta(days=1), record=full_record("uid-3"))
    st = storage(encryption={"keySecretRef": {"name": "backup-keys"}})
    kube = a_kube([], [st])
    report = run(kube, st, mem)
    assert report.error == ""
    assert created(kube) == []
    assert report.skipped == 2 and report.expired_deleted == 1
    assert not any(o.key == expired for o in mem.list(PREFIX))
    assert kube.calls["secret_data"] == 1  # read once per pass, not once per snapshot
    warnings = [e for e in kube.events if e[2] == "CannotRecreate"]
    assert len(warnings) == 1 and 'encryption key Secret "backup-keys" not found' in warnings[0][3]
    message = kube.status_of("backupstorages", "shop", "primary")["sync"]["message"]
    assert message.endswith(
        'skipped 2 (cannot read their manifests: encryption key Secret "backup-keys" '
        "not found in namespace shop)"
    )
    # The Secret appears: the next pass re-creates both.
    kube.add_secret("shop", "backup-keys", current="1", **{"key-1": new_key_text()})
    report = run(kube, st, mem)
    assert sorted(report.created) == ["one", "two"] and report.key_problem == ""
