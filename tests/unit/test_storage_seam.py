"""The storage seam: S3Store turns boto3's answers and failures into Nightjar's (driven by a fake
boto3 client), and the code above it (replication's copy, the BackupStorage check, a Backup's
deletion) works through any ObjectStore (driven by an in-memory one)."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from nightjar.config import OperatorConfig
from nightjar.domain.residency import default_policy
from nightjar.reconcile import storage as storage_rec
from nightjar.reconcile.backup import BackupReconciler
from nightjar.reconcile.errors import Retry
from nightjar.reconcile.replication import Replicator
from nightjar.storage import layout
from nightjar.storage.errors import IntegrityError
from nightjar.storage.objects import (
    SHA_META,
    AccessDenied,
    Lock,
    MultipartWriter,
    ObjectLocked,
    ObjectMissing,
    S3Store,
    S3Target,
    StorageError,
    copy_object,
    translate,
    unreachable,
)
from nightjar.storage.replicate import replicate_snapshot
from tests.fakes import FakeKube
from tests.memstore import MemoryStore as MemStore

UNTIL = dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
TARGET = S3Target("http://s3.test", "bk", "us-east-1", "AKIA", "secret")


def client_error(code: str, status: int = 400, message: str = "") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "Op",
    )


# --- S3Store on a fake boto3 client ----------------------------------------------------------


class FakeS3:
    """The boto3 S3 client calls S3Store makes, over a dict; ``fail`` maps an operation to the
    error it raises (once per call)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.meta: dict[str, dict[str, Any]] = {}
        self.retention: dict[str, dict[str, Any]] = {}
        self.locked: set[str] = set()
        self.lock_config: dict[str, Any] | None = None
        self.uploads: dict[str, dict[int, bytes]] = {}
        self.aborted: list[str] = []
        self.fail: dict[str, Exception] = {}
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def _call(self, op: str) -> None:
        with self.lock:
            self.calls.append(op)
        if op in self.fail:
            raise self.fail[op]

    def head_bucket(self, Bucket: str) -> dict[str, Any]:
        self._call("head_bucket")
        return {}

    def put_object(self, Bucket: str, Key: str, Body: bytes, **extra: Any) -> dict[str, Any]:
        self._call("put_object")
        self.objects[Key] = bytes(Body)
        self.meta[Key] = extra
        return {}

    def get_object(self, Bucket: str, Key: str, Range: str = "") -> dict[str, Any]:
        self._call("get_object")
        if Key not in self.objects:
            raise client_error("NoSuchKey", 404)
        data = self.objects[Key]
        if Range:
            a, b = Range.removeprefix("bytes=").split("-")
            data = data[int(a) : int(b) + 1 if b else None]
        return {"Body": io.BytesIO(data)}

    def head_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        self._call("head_object")
        if Key not in self.objects:
            raise client_error("404", 404, "Not Found")
        return {"ContentLength": len(self.objects[Key]), "Metadata": self.meta[Key].get("Metadata", {})}

    def get_paginator(self, op: str) -> Any:
        fake = self

        class Pages:
            def paginate(self, Bucket: str, Prefix: str) -> Iterator[dict[str, Any]]:
                keys = sorted(k for k in fake.objects if k.startswith(Prefix))
                for i in range(0, max(len(keys), 1), 2):  # two per page: paging is exercised
                    page = keys[i : i + 2]
                    if op == "list_objects_v2":
                        yield {"Contents": [{"Key": k, "Size": len(fake.objects[k])} for k in page]}
                    else:
                        yield {"Versions": [{"Key": k, "VersionId": f"v-{k}"} for k in page]}

        return Pages()

    def delete_objects(self, Bucket: str, Delete: dict[str, Any]) -> dict[str, Any]:
        self._call("delete_objects")
        errors = []
        for o in Delete["Objects"]:
            if o["Key"] in self.locked:
                errors.append({"Key": o["Key"], "Code": "AccessDenied"})
            else:
                self.objects.pop(o["Key"], None)
        return {"Errors": errors}

    def get_object_retention(self, Bucket: str, Key: str) -> dict[str, Any]:
        self._call("get_object_retention")
        if Key not in self.retention:
            raise client_error("NoSuchObjectLockConfiguration", 404)
        return {"Retention": self.retention[Key]}

    def put_object_retention(self, Bucket: str, Key: str, Retention: dict[str, Any]) -> dict[str, Any]:
        self._call("put_object_retention")
        self.retention[Key] = Retention
        return {}

    def get_object_lock_configuration(self, Bucket: str) -> dict[str, Any]:
        self._call("get_object_lock_configuration")
        if self.lock_config is None:
            raise client_error("ObjectLockConfigurationNotFoundError", 404)
        return {"ObjectLockConfiguration": self.lock_config}

    def create_multipart_upload(self, Bucket: str, Key: str, **extra: Any) -> dict[str, Any]:
        self._call("create_multipart_upload")
        self.uploads[Key] = {}
        self.meta[Key] = extra
        return {"UploadId": f"u-{Key}"}

    def upload_part(
        self, Bucket: str, Key: str, UploadId: str, PartNumber: int, Body: bytes
    ) -> dict[str, Any]:
        self._call("upload_part")
        self.uploads[Key][PartNumber] = Body
        return {"ETag": f"e{PartNumber}"}

    def complete_multipart_upload(
        self, Bucket: str, Key: str, UploadId: str, MultipartUpload: dict[str, Any]
    ) -> dict[str, Any]:
        self._call("complete_multipart_upload")
        parts = self.uploads.pop(Key)
        numbers = [p["PartNumber"] for p in MultipartUpload["Parts"]]
        assert numbers == sorted(parts) == list(range(1, len(parts) + 1))
        self.objects[Key] = b"".join(parts[n] for n in numbers)
        return {}

    def abort_multipart_upload(self, Bucket: str, Key: str, UploadId: str) -> dict[str, Any]:
        self.aborted.append(Key)
        self.uploads.pop(Key, None)
        return {}

    def generate_presigned_url(self, op: str, Params: dict[str, Any], ExpiresIn: int) -> str:
        return f"http://s3.test/{Params['Bucket']}/{Params['Key']}?X-Amz-Expires={ExpiresIn}"


@pytest.fixture
def fake() -> FakeS3:
    return FakeS3()


@pytest.fixture
def store(fake: FakeS3) -> S3Store:
    return S3Store(TARGET, client=fake)


def test_boto_failures_become_storage_errors_that_say_what_and_whether_to_retry() -> None:
    missing = translate(client_error("NoSuchKey", 404), "reading k")
    assert isinstance(missing, ObjectMissing) and not missing.retryable
    denied = translate(client_error("AccessDenied", 403), "bucket bk at http://s3.test")
    assert isinstance(denied, AccessDenied) and not denied.retryable
    assert (
        str(denied)
        == "bucket bk at http://s3.test: access denied (AccessDenied); check the credentials Secret"
    )
    worm = translate(client_error("AccessDenied", 403, "Object is WORM protected"), "deleting k")
    assert isinstance(worm, ObjectLocked)
    assert isinstance(translate(client_error("ObjectLocked", 400), "writing k"), ObjectLocked)
    bad = translate(client_error("InvalidArgument", 400, "no"), "writing k")
    assert type(bad) is StorageError and not bad.retryable and str(bad) == "writing k: InvalidArgument no"
    assert translate(client_error("SlowDown", 503), "writing k").retryable
    down = translate(EndpointConnectionError(endpoint_url="http://s3.test"), "bucket bk")
    assert down.retryable and str(down) == "bucket bk: cannot connect to the S3 endpoint"
    assert "secret" not in str(denied) and "AKIA" not in repr(TARGET)


def test_reads_ranges_heads_and_listings(store: S3Store, fake: FakeS3) -> None:
    fake.objects.update({"p/a": b"0123456789", "p/b": b"x", "p/c": b"yz", "q/d": b""})
    fake.meta.update({k: {"Metadata": {SHA_META: "s"}} for k in fake.objects})
    assert store.read("p/a") == b"0123456789"
    assert store.read("p/a", 2, 5) == b"234" and store.read("p/a", 7) == b"789"
    assert store.read("p/a", 5, 5) == b""
    with store.get("p/a", 8) as body:
        assert body.read() == b"89"
    info = store.head("p/a")
    assert info is not None and (info.size, info.metadata) == (10, {SHA_META: "s"})
    assert store.head("p/none") is None
    with pytest.raises(ObjectMissing, match="reading p/none: NoSuchKey"):
        store.read("p/none")
    assert [(o.key, o.size) for o in store.list("p/")] == [("p/a", 10), ("p/b", 1), ("p/c", 2)]
    assert list(store.list_versions("q/")) == [("q/d", "v-q/d")]
    assert store.presign_get("p/a", 60).endswith("/bk/p/a?X-Amz-Expires=60")


def test_check_and_unreachable_name_the_bucket(store: S3Store, fake: FakeS3) -> None:
    assert unreachable(store) == ""
    fake.fail["head_bucket"] = client_error("404", 404)
    assert unreachable(store) == "bucket bk at http://s3.test: bucket does not exist"
    fake.fail["head_bucket"] = EndpointConnectionError(endpoint_url="http://s3.test")
    with pytest.raises(StorageError, match="cannot connect"):
        store.check()
    bad = S3Target("not a url", "bk", "us-east-1", "a", "b").store()  # making a store never fails
    assert unreachable(bad) == "bucket bk at not a url: Invalid endpoint: not a url"


def test_object_lock_mode_and_retention_that_only_grows(store: S3Store, fake: FakeS3) -> None:
    assert store.lock_mode() is None
    fake.lock_config = {"ObjectLockEnabled": "Enabled"}
    assert store.lock_mode() == ""
    fake.lock_config["Rule"] = {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}}
    assert store.lock_mode() == "GOVERNANCE"
    fake.fail["get_object_lock_configuration"] = client_error("AccessDenied", 403)
    with pytest.raises(
        AccessDenied, match=r"^bucket bk: reading its Object Lock configuration: access denied"
    ):
        store.lock_mode()

    store.extend_retention("k", Lock("Governance", UNTIL))
    assert fake.retention["k"] == {"Mode": "GOVERNANCE", "RetainUntilDate": UNTIL}
    store.extend_retention("k", Lock("Governance", UNTIL - dt.timedelta(days=1)))  # never shortened
    assert fake.retention["k"]["RetainUntilDate"] == UNTIL
    store.extend_retention("k", Lock("None", UNTIL + dt.timedelta(days=9)))  # no lock mode: nothing
    assert fake.retention["k"]["RetainUntilDate"] == UNTIL
    assert Lock.of("None", UNTIL) is None and Lock.of("Compliance", None) is None


def test_delete_removes_every_version_and_lists_what_object_lock_keeps(store: S3Store, fake: FakeS3) -> None:
    fake.objects.update({"p/a": b"1", "p/b": b"2", "p/c": b"3", "p/cc": b"4"})
    fake.locked.add("p/b")
    assert store.delete(["p/a", "p/b", "p/c"]) == (2, ["p/b"])
    assert sorted(fake.objects) == ["p/b", "p/cc"]  # "p/c" named a key, not a prefix
    assert store.delete("p/") == (1, ["p/b"])


def test_writes_carry_lock_and_metadata(store: S3Store, fake: FakeS3) -> None:
    store.put(
        "m.json", b"{}", lock=Lock("Compliance", UNTIL), metadata={"a": "b"}, content_type="application/json"
    )
    assert fake.meta["m.json"] == {
        "ObjectLockMode": "COMPLIANCE",
        "ObjectLockRetainUntilDate": UNTIL,
        "Metadata": {"a": "b"},
        "ContentType": "application/json",
    }
    with store.writer("small", metadata={"x": "y"}) as w:
        w.write(b"tiny")
    assert fake.objects["small"] == b"tiny" and "create_multipart_upload" not in fake.calls
    assert (w.size, w.sha256) == (4, hashlib.sha256(b"tiny").hexdigest())


def test_a_multipart_write_sends_parts_in_parallel_in_order(fake: FakeS3) -> None:
    data = bytes(range(256)) * 41  # 10,496 bytes: 11 parts of 1,000 (the last short)
    with MultipartWriter(fake, "bk", "big", {"Metadata": {"k": "v"}}, part_size=1000, in_flight=3) as w:
        for i in range(0, len(data), 333):
            w.write(memoryview(data)[i : i + 333])
    assert fake.objects["big"] == data and fake.calls.count("upload_part") == 11
    assert fake.meta["big"] == {"Metadata": {"k": "v"}}
    assert w.sha256 == hashlib.sha256(data).hexdigest() and w.size == len(data)


def test_a_failed_part_aborts_the_upload_and_nothing_is_visible(fake: FakeS3) -> None:
    fake.fail["upload_part"] = client_error("InternalError", 500)
    w = MultipartWriter(fake, "bk", "big", part_size=100, in_flight=2)

    def write_all() -> None:
        with w:
            for _ in range(50):
                w.write(b"x" * 100)

    with pytest.raises(StorageError, match=r"writing big \(part \d+\): InternalError"):
        write_all()
    assert "big" not in fake.objects and fake.aborted == ["big"]
    with pytest.raises(ValueError, match="closed"):
        w.write(b"more")


def test_copy_object_lands_only_with_the_expected_digest(store: S3Store, fake: FakeS3) -> None:
    fake.objects["src"] = b"payload"
    sha = hashlib.sha256(b"payload").hexdigest()
    assert copy_object(store, "src", store, "dst", 7, sha, Lock("Governance", UNTIL)) == 7
    assert fake.objects["dst"] == b"payload"
    assert fake.meta["dst"]["Metadata"] == {SHA_META: sha}
    assert fake.meta["dst"]["ObjectLockMode"] == "GOVERNANCE"
    with pytest.raises(IntegrityError, match="src in the primary is damaged"):
        copy_object(store, "src", store, "bad", 7, "0" * 64, None)
    assert "bad" not in fake.objects


# --- code above the seam, on an in-memory ObjectStore ---------------------------------------------


def a_snapshot(store: MemStore, prefix: str, blobs: dict[str, bytes]) -> tuple[str, str]:
    base = f"{prefix}nightjar/v1/ns/src/uid/a1/"
    objects = []
    for name, data in blobs.items():
        store.put(base + name, data)
        objects.append({"key": base + name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    body = json.dumps({"objects": objects}).encode()
    store.put(base + "manifest.json", body)
    return base + "manifest.json", hashlib.sha256(body).hexdigest()


def test_a_replica_gets_verified_copies_once_and_its_manifest_last() -> None:
    src, dst = MemStore("primary"), MemStore("replica")
    key, sha = a_snapshot(src, "p/", {"db.dump": b"dump", "packs/1.pack": b"pack" * 100})
    lock = Lock("Governance", UNTIL)
    seen: list[int] = []
    r = replicate_snapshot(
        src, "p/", dst, "r/", key, sha, lock, progress=lambda x: seen.append(x.copied_objects)
    )
    assert (r.copied_objects, r.skipped_objects, r.copied_bytes) == (3, 0, 404 + len(src.objects[key]))
    assert r.manifest_key == "r/" + key.removeprefix("p/") and dst.writes[-1] == r.manifest_key
    assert dst.objects[r.manifest_key] == src.objects[key] and seen == [1, 2]
    assert all(dst.locks[k] == lock for k in dst.objects)
    assert dst.meta[r.manifest_key][SHA_META] == sha
    later = Lock("Governance", UNTIL + dt.timedelta(days=30))
    again = replicate_snapshot(src, "p/", dst, "r/", key, sha, later)
    assert (again.copied_objects, again.skipped_objects, again.copied_bytes) == (0, 3, 0)
    assert all(dst.locks[k] == later for k in dst.objects)  # retention extended, nothing copied


def test_a_damaged_object_or_a_wrong_manifest_never_lands_in_the_replica() -> None:
    src, dst = MemStore(), MemStore()
    key, sha = a_snapshot(src, "", {"db.dump": b"dump", "packs/1.pack": b"good"})
    src.objects[key.replace("manifest.json", "packs/1.pack")] = b"rot!"
    with pytest.raises(IntegrityError, match=r"packs/1.pack in the primary is damaged"):
        replicate_snapshot(src, "", dst, "", key, sha, None)
    assert list(dst.objects) == [key.replace("manifest.json", "db.dump")]  # not the pack, no manifest
    with pytest.raises(IntegrityError, match="does not match the Backup's sha256"):
        replicate_snapshot(src, "", dst, "", key, "0" * 64, None)
    dst.down = "cannot connect to the S3 endpoint"
    with pytest.raises(StorageError, match="cannot connect"):
        replicate_snapshot(src, "", dst, "", key, "", None)


def a_kube(terminating: bool = False) -> FakeKube:
    """The fake API with the BackupStorage "s" of namespace ns."""
    kube = FakeKube()
    kube.add("backupstorages", {"metadata": {"name": "s", "namespace": "ns"}, "spec": {}})
    if terminating:
        kube.terminating.add("ns")
    return kube


def reconciler(kube: FakeKube, mem: MemStore) -> BackupReconciler:
    replicator = Replicator(kube, OperatorConfig(), default_policy())
    return BackupReconciler(kube, OperatorConfig(), replicator, open_store=lambda target: mem)


@pytest.fixture
def mem(monkeypatch: pytest.MonkeyPatch) -> MemStore:
    """The store every BackupStorage resolves to."""
    m = MemStore("bk")
    monkeypatch.setattr(storage_rec, "target_for", lambda kube, ns, spec: TARGET)
    monkeypatch.setattr(storage_rec, "store_of", lambda target: m)
    return m


def test_a_storage_check_reports_reachability_and_object_lock(mem: MemStore) -> None:
    kube = FakeKube()
    spec = {"objectLock": {"mode": "Governance"}}
    assert storage_rec.check(kube, "ns", spec) == (
        False,
        "objectLock.mode is Governance but bucket bk does not have Object Lock enabled "
        "(it can only be enabled when the bucket is created)",
        False,
    )
    mem.object_lock = ""
    assert storage_rec.check(kube, "ns", spec) == (True, "bucket bk reachable, Object Lock Governance", True)
    assert storage_rec.check(kube, "ns", {}) == (True, "bucket bk reachable, no Object Lock", True)
    mem.down = "access denied (403); check the credentials Secret"
    ready, message, _ = storage_rec.check(kube, "ns", {})
    assert (
        not ready and message == "bucket bk at memory://: access denied (403); check the credentials Secret"
    )
    assert storage_rec.unreachable(kube, "ns", {"spec": {}}) == message


def test_a_backups_deletion_keeps_shared_content_and_reports_locked_objects(mem: MemStore) -> None:
    source = {"database": {"secretRef": {"name": "db"}}}
    sid = layout.source_id(source)
    mine = layout.backup_prefix("", "ns", sid, "uid-1")
    other = layout.backup_prefix("", "ns", sid, "uid-0")
    # "reused": stored by the other Backup, but only my snapshot still lists it.
    reused, own, old = f"{other}a/packs/1.pack", f"{mine}a/db.dump", f"{other}a/db.dump"
    for k in (reused, own, old):
        mem.put(k, b"x")
    mem.put(f"{mine}a/manifest.json", manifest_of(reused, own))
    mem.put(f"{other}a/manifest.json", manifest_of(old))
    mem.locked.add(own)
    kube = a_kube()
    rec = reconciler(kube, mem)
    backup = {
        "metadata": {"name": "b", "namespace": "ns", "uid": "uid-1", "annotations": {}},
        "spec": {"storageRef": {"name": "s"}, "source": source},
        "status": {},
    }
    summary = rec.delete_stored(backup)
    # (the tombstone written first goes with the rest: the manifest was not locked)
    assert summary == "deleted 3 object versions of 4 objects; 1 locked objects left to expire"
    assert sorted(mem.objects) == sorted([own, old, f"{other}a/manifest.json"])
    assert kube.reasons("b") == ["ObjectsLocked"]
    mem.down = "cannot connect to the S3 endpoint"
    with pytest.raises(Retry, match=r"^deleting stored objects: writing .*deleted.json: cannot connect"):
        rec.delete_stored(backup)


def test_a_backup_deleted_with_its_namespace_keeps_its_snapshot(mem: MemStore) -> None:
    source = {"database": {"secretRef": {"name": "db"}}}
    mine = layout.backup_prefix("", "ns", layout.source_id(source), "uid-1")
    mem.put(f"{mine}a/db.dump", b"x")
    mem.put(f"{mine}a/manifest.json", manifest_of(f"{mine}a/db.dump"))
    rec = reconciler(a_kube(terminating=True), mem)
    backup = {
        "metadata": {"name": "b", "namespace": "ns", "uid": "uid-1", "annotations": {}},
        "spec": {"storageRef": {"name": "s"}, "source": source},
        "status": {},
    }
    assert rec.delete_stored(backup).startswith("namespace ns is being deleted: kept the stored snapshot")
    assert sorted(mem.objects) == sorted([f"{mine}a/db.dump", f"{mine}a/manifest.json"])


def test_deleting_a_backup_whose_manifest_object_lock_keeps_leaves_a_tombstone(mem: MemStore) -> None:
    source = {"database": {"secretRef": {"name": "db"}}}
    mine = layout.backup_prefix("", "ns", layout.source_id(source), "uid-1")
    mem.put(f"{mine}a/db.dump", b"x")
    mem.put(f"{mine}a/manifest.json", manifest_of(f"{mine}a/db.dump"))
    mem.locked |= {f"{mine}a/db.dump", f"{mine}a/manifest.json"}
    kube = a_kube()
    rec = reconciler(kube, mem)
    backup = {
        "metadata": {"name": "b", "namespace": "ns", "uid": "uid-1", "annotations": {}},
        "spec": {"storageRef": {"name": "s"}, "source": source},
        "status": {},
    }
    rec.delete_stored(backup)
    # Storage sync never brings back a Backup deleted on purpose.
    assert json.loads(mem.objects[f"{mine}{layout.TOMBSTONE}"])["uid"] == "uid-1"


def manifest_of(*keys: str) -> bytes:
    """A manifest's public part listing ``keys`` (what deletion reads)."""
    return json.dumps(
        {"formatVersion": 2, "objects": [{"key": k, "bytes": 1, "sha256": ""} for k in keys]}
    ).encode()


def test_nothing_is_deleted_while_another_manifest_of_the_source_cannot_be_read(mem: MemStore) -> None:
    from nightjar.reconcile.snapshots import delete_snapshot

    source = layout.source_prefix("", "ns", "src")
    mine, other = f"{source}uid-1/", f"{source}uid-2/"
    mem.put(f"{mine}a/db.dump", b"x")
    mem.put(f"{mine}a/manifest.json", manifest_of(f"{mine}a/db.dump"))
    mem.put(f"{other}a/manifest.json", b"{from a newer Nightjar")
    with pytest.raises(IntegrityError, match=r"cannot tell what .*uid-2/a/manifest.json shares"):
        delete_snapshot(mem, mine, source)
    assert f"{mine}a/db.dump" in mem.objects


def test_a_backup_merely_annotated_as_synced_deletes_nothing(mem: MemStore) -> None:
    """Only the operator's own adoption (status naming the manifest) makes a synced Backup stand
    for a snapshot: an annotation anyone may add never points a deletion at other keys."""
    source = {"database": {"secretRef": {"name": "db"}}}
    theirs = layout.backup_prefix("", "ns", layout.source_id(source), "uid-0")
    mem.put(f"{theirs}a/db.dump", b"x")
    mem.put(f"{theirs}a/manifest.json", manifest_of(f"{theirs}a/db.dump"))
    kube = a_kube()
    rec = reconciler(kube, mem)
    backup = {
        "metadata": {
            "name": "b",
            "namespace": "ns",
            "uid": "uid-1",
            "annotations": {"nightjar.dev/synced-from": f"{theirs}a/manifest.json"},
        },
        "spec": {"storageRef": {"name": "s"}, "source": source},
        "status": {"phase": "Failed"},
    }
    assert rec.delete_stored(backup) == "never adopted a snapshot from the bucket; nothing deleted"
    assert f"{theirs}a/db.dump" in mem.objects


def test_a_manifest_of_a_newer_format_is_not_read_as_this_one() -> None:
    from nightjar.storage.manifest import PublicManifest

    raw = json.dumps({"formatVersion": 3, "objects": []}).encode()
    with pytest.raises(IntegrityError, match="format 3, newer than this Nightjar reads"):
        PublicManifest.parse(raw, "m")


def test_a_backup_synced_from_a_live_namespace_never_deletes_that_namespaces_snapshot(
    mem: MemStore,
) -> None:
    """spec.sync.fromNamespace gives a namespace Backups standing for another's snapshots: while
    that namespace exists, deleting them must not delete its data."""
    source = {"database": {"secretRef": {"name": "db"}}}
    theirs = layout.backup_prefix("", "prod", layout.source_id(source), "uid-0")
    mem.put(f"{theirs}a/db.dump", b"x")
    mem.put(f"{theirs}a/manifest.json", manifest_of(f"{theirs}a/db.dump"))
    kube = a_kube()
    backup = {
        "metadata": {
            "name": "b",
            "namespace": "ns",
            "uid": "uid-1",
            "annotations": {"nightjar.dev/synced-from": f"{theirs}a/manifest.json"},
        },
        "spec": {"storageRef": {"name": "s"}, "source": source},
        "status": {"phase": "Completed", "storage": {"manifestKey": f"{theirs}a/manifest.json"}},
    }
    summary = reconciler(kube, mem).delete_stored(backup)
    assert summary == "the snapshot belongs to namespace prod, which still exists; kept"
    assert sorted(mem.objects) == sorted([f"{theirs}a/db.dump", f"{theirs}a/manifest.json"])
    # A cluster rebuilt under new names: prod is gone, this Backup is the snapshot's only owner.
    kube.terminating.add("prod")
    assert reconciler(kube, mem).delete_stored(backup).startswith("deleted 3 object versions")
    assert mem.objects == {}


def test_a_version_the_server_failed_to_delete_is_an_error_to_retry_not_a_locked_object(
    store: S3Store, fake: FakeS3
) -> None:
    fake.objects.update({"p/a": b"1", "p/b": b"2"})
    original = fake.delete_objects

    def flaky(Bucket: str, Delete: dict[str, Any]) -> dict[str, Any]:
        out = original(Bucket, {"Objects": [o for o in Delete["Objects"] if o["Key"] != "p/b"]})
        return {"Errors": [*out["Errors"], {"Key": "p/b", "Code": "InternalError", "Message": "retry"}]}

    fake.delete_objects = flaky  # type: ignore[method-assign]
    with pytest.raises(StorageError, match=r"1 not deleted \(InternalError retry on p/b\)") as err:
        store.delete(["p/a", "p/b"])
    assert err.value.retryable and "p/b" in fake.objects and "p/a" not in fake.objects
