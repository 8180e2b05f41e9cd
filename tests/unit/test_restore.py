"""Restore pieces that are pure or local: the Job builder and its access objects, the snapshot
reader's verification, and writing a tree exactly (into a temporary directory)."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from nightjar.agent import files as f
from nightjar.agent.progress import Counters
from nightjar.agent.restore import conninfo_dbname, restore_tree
from nightjar.config import OperatorConfig
from nightjar.jobs import RestorePlan, StorageRef, build_restore_access, build_restore_job
from nightjar.reconcile.restore_plan import target_summary
from nightjar.storage import layout
from nightjar.storage.snapshot import IntegrityError, SnapshotReader
from nightjar.storage.writer import SnapshotWriter
from tests.memstore import MemoryStore

STORAGE = StorageRef.from_spec(
    {"endpoint": "https://s3.example", "bucket": "bk", "credentials": {"secretName": "s3creds"}}
)


def plan(**kw: Any) -> RestorePlan:
    base: dict[str, Any] = dict(
        name="from-prod",
        namespace="acceptance",
        uid="uid-9",
        storage=STORAGE,
        manifest_key="nightjar/v1/prod/abc/uid/att/manifest.json",
        manifest_sha256="f" * 64,
        contents="Full",
        target={
            "database": {"secretRef": {"name": "db"}},
            "files": {"persistentVolumeClaim": {"claimName": "docs", "path": "files"}},
        },
        db_secret="db",
        db_keys=("uri",),
    )
    base.update(kw)
    return RestorePlan(**base)


def test_same_namespace_job_uses_the_storage_secret_by_reference_and_never_retries_a_reported_failure() -> (
    None
):
    job = build_restore_job(plan(namespace="prod"), OperatorConfig())
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert job["metadata"]["name"] == "nightjar-restore-from-prod"
    # The agent's own failure (exit 1, its result says the target's state) ends the Job; a killed
    # Pod (no result) gets a new one, four times at most: the restore is idempotent.
    assert job["spec"]["backoffLimit"] == 4
    assert job["spec"]["podFailurePolicy"] == {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": "agent", "operator": "In", "values": [1]}}
        ]
    }
    assert pod["restartPolicy"] == "Never"  # what a pod failure policy needs
    assert pod["serviceAccountName"] == "nightjar-restore-from-prod"
    assert pod["automountServiceAccountToken"] is False  # only the explicit, scoped token volume
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert refs["NIGHTJAR_S3_ACCESS_KEY_ID"] == {"name": "s3creds", "key": "AWS_ACCESS_KEY_ID"}
    assert refs["NIGHTJAR_DB_URI"] == {"name": "db", "key": "uri"}
    assert "--presigned-file" not in c["args"]
    assert c["args"][c["args"].index("--files-dir") + 1] == "/nightjar/files/files"
    files_vol = next(v for v in pod["volumes"] if v["name"] == "files")
    assert files_vol["persistentVolumeClaim"] == {"claimName": "docs"}  # writable, unlike a backup's
    api = next(v for v in pod["volumes"] if v["name"] == "api")
    assert api["projected"]["sources"][0]["serviceAccountToken"]["path"] == "token"


def test_cross_namespace_job_gets_presigned_urls_and_never_the_storage_credentials() -> None:
    job = build_restore_job(plan(presigned=True), OperatorConfig())
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    names = {e["name"] for e in c["env"]}
    assert not any(n.startswith("NIGHTJAR_S3_") for n in names)
    assert c["args"][c["args"].index("--presigned-file") + 1] == "/nightjar/presigned/urls.json"
    assert {"name": "presigned", "secret": {"secretName": "nightjar-restore-from-prod"}} in pod["volumes"]


def test_database_only_job_mounts_no_files() -> None:
    job = build_restore_job(plan(contents="DatabaseOnly"), OperatorConfig())
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert "--files-dir" not in c["args"]
    assert all(v["name"] != "files" for v in job["spec"]["template"]["spec"]["volumes"])


def test_access_objects_grant_patching_this_restores_status_only() -> None:
    sa, role, binding = build_restore_access(plan())
    assert sa["kind"] == "ServiceAccount" and sa["automountServiceAccountToken"] is False
    assert role["rules"] == [
        {
            "apiGroups": ["nightjar.dev"],
            "resources": ["restores/status"],
            "resourceNames": ["from-prod"],
            "verbs": ["get", "patch"],
        }
    ]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "nightjar-restore-from-prod", "namespace": "acceptance"}
    ]
    for o in (sa, role, binding):
        assert o["metadata"]["ownerReferences"][0]["uid"] == "uid-9"


def test_target_summary_and_conninfo_quoting() -> None:
    t = {"database": {"secretRef": {"name": "db"}}, "files": {"persistentVolumeClaim": {"claimName": "c"}}}
    assert target_summary("acc", t, "Full") == "acc: database db, files pvc/c"
    assert target_summary("acc", t, "DatabaseOnly") == "acc: database db, files untouched"
    assert conninfo_dbname("shop") == "dbname='shop'"
    assert conninfo_dbname("a' host=evil") == "dbname='a\\' host=evil'"


# --- a snapshot in memory: objects written with the real packer and index format -------------


class Bucket:
    """get_object with Range over in-memory objects (the S3 semantics the reader relies on)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.gets = 0

    def get_object(self, Bucket: str, Key: str, Range: str = "") -> dict[str, Any]:
        from botocore.exceptions import ClientError

        if Key not in self.objects:
            raise ClientError({"Error": {"Code": "NoSuchKey", "Message": ""}}, "GetObject")
        self.gets += 1
        data = self.objects[Key]
        if Range:
            first, _, last = Range.removeprefix("bytes=").partition("-")
            data = data[int(first) : int(last) + 1 if last else None]
        return {"Body": io.BytesIO(data)}


class _Writer:
    def __init__(self, bucket: Bucket, key: str) -> None:
        self.bucket, self.key, self.buf = bucket, key, io.BytesIO()

    def write(self, data: bytes) -> int:
        return self.buf.write(data)

    def close(self) -> None:
        self.bucket.objects[self.key] = self.buf.getvalue()

    @property
    def size(self) -> int:
        return len(self.buf.getvalue())

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.buf.getvalue()).hexdigest()


def snapshot_of(src: Path) -> tuple[Bucket, str]:
    """A format-2 snapshot of ``src`` (written by the real writer), in the fake client's bucket:
    packs under their keys, the manifest as ``manifest.json``."""
    store = MemoryStore()
    loc = layout.SnapshotLocation("", "ns", "src", "uid", "a1")
    w = SnapshotWriter(store, loc)
    dump = w.dump_stream()
    dump.write(b"PGDMP-not-used-here")
    db = w.database(dump, pg_dump_version="15", server_version="15", archive_version="1.14", dbname="d")
    index = w.index()
    f.back_up_tree(src, index, f.PreviousIndex(None))
    files = index.finish()
    key, digest, _ = w.commit(
        created=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        expires=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
        database=db,
        files=files,
        backup={},
        source="src",
        contents="Full",
        model_version="",
    )
    bucket = Bucket()
    for k, v in store.objects.items():
        bucket.objects["manifest.json" if k == key else k] = v
    return bucket, digest


def make_tree(root: Path) -> None:
    for i in range(50):
        d = root / f"{i % 5:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(i * 100))
    (root / "big").write_bytes(os.urandom(5 * 1024 * 1024))
    (root / "empty").mkdir()
    (root / "ro").mkdir()
    (root / "ro" / "inside").write_text("in a read-only dir")
    (root / "ro").chmod(0o555)
    (root / "link").symlink_to("00/f0")
    (root / "exec").write_text("#!/bin/sh\n")
    (root / "exec").chmod(0o750)


def listing(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rel, st in f.walk(root):
        p = root / rel
        if p.is_symlink():
            out[rel] = ("l", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("d", st.st_mode & 0o7777)
        else:
            out[rel] = ("f", p.read_bytes(), st.st_mode & 0o7777, st.st_mtime_ns)
    return out


def test_restore_tree_writes_exactly_the_snapshot_and_removes_the_rest(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    bucket, digest = snapshot_of(src)
    dst.mkdir()
    (dst / "00").mkdir()
    (dst / "00" / "f1").write_text("stale content")
    (dst / "extra-dir" / "deep").mkdir(parents=True)
    (dst / "extra-dir" / "deep" / "x").write_text("x")
    (dst / "big").mkdir()  # a directory where the snapshot has a file
    (dst / "lost+found").mkdir()
    reader = SnapshotReader(bucket, "b", "manifest.json", digest)
    counters = Counters()
    out = restore_tree(reader, dst, counters)
    got = listing(dst)
    assert got.pop("lost+found")[0] == "d"  # a volume's lost+found is left alone
    assert got == listing(src)
    assert out["files"] == counters.files_done == 53
    assert out["removed"] >= 1
    assert bucket.gets <= 8  # index, manifest, packs read in few ranged GETs: not a GET per file
    (dst / "ro").chmod(0o755)
    (src / "ro").chmod(0o755)


def test_a_damaged_file_or_manifest_is_reported_not_restored(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a").write_bytes(b"A" * 1000)
    (src / "b").write_bytes(b"B" * 1000)
    bucket, digest = snapshot_of(src)
    with pytest.raises(IntegrityError, match="does not match the digest"):
        SnapshotReader(bucket, "b", "manifest.json", "0" * 64)
    pack = next(k for k in bucket.objects if "/packs/" in k)
    size = len(bucket.objects[pack])
    bucket.objects[pack] = bucket.objects[pack][: size - 5] + b"X" + bucket.objects[pack][size - 4 :]
    dst.mkdir()
    with pytest.raises(IntegrityError, match=r"blob|does not match its sha256|decompress"):
        restore_tree(SnapshotReader(bucket, "b", "manifest.json", digest), dst, Counters())
    bucket.objects[pack] = bucket.objects[pack][: size // 2]
    with pytest.raises(IntegrityError, match="truncated"):
        restore_tree(SnapshotReader(bucket, "b", "manifest.json", digest), dst, Counters())


def test_a_forged_index_cannot_write_outside_the_target(tmp_path: Path) -> None:
    bucket = Bucket()
    lines = [
        f.Entry("escape", "l", 0o777, target=str(tmp_path / "outside")).to_json(),
        f.Entry("escape/pwned", "f", 0o644, size=0, sha256=hashlib.sha256(b"").hexdigest()).to_json(),
    ]
    index = gzip.compress(("\n".join(lines) + "\n").encode())
    bucket.objects["i"] = index
    manifest = {
        "formatVersion": 1,
        "database": {"key": "d", "bytes": 0},
        "files": {"index": {"key": "i", "bytes": len(index), "sha256": hashlib.sha256(index).hexdigest()}},
        "objects": [],
    }
    bucket.objects["m"] = json.dumps(manifest).encode()
    (tmp_path / "outside").mkdir()
    (tmp_path / "dst").mkdir()
    with pytest.raises(IntegrityError, match="outside the files directory"):
        restore_tree(SnapshotReader(bucket, "b", "m"), tmp_path / "dst", Counters())
    assert list((tmp_path / "outside").iterdir()) == []


def test_an_upload_stored_out_of_path_order_is_read_pack_by_pack(tmp_path: Path) -> None:
    """An archive whose tree/ came in directory order: packs hold files out of path order.
    The restore reads them in storage order (a GET per pack, not per file) and the tree is exact."""
    bucket = Bucket()
    contents = {f"{i % 7:02d}/{i:04d}": os.urandom(50 + i) for i in range(400)}
    entries: list[f.Entry] = []
    pack = bytearray()  # format 1: raw file bytes one after the other, here in reverse path order
    for path in sorted(contents, reverse=True):
        data = contents[path]
        entries.append(
            f.Entry(
                path, "f", 0o640, len(data), 10**18, hashlib.sha256(data).hexdigest(), "packs/1", len(pack)
            )
        )
        pack += data
    bucket.objects["packs/1"] = bytes(pack)
    objects = [{"key": "packs/1", "bytes": len(pack), "sha256": hashlib.sha256(pack).hexdigest()}]
    entries += [f.Entry(f"{d:02d}", "d", 0o755) for d in range(7)]
    entries.sort(key=lambda e: f.sort_key(e.path))
    index = gzip.compress("".join(e.to_json() + "\n" for e in entries).encode())
    bucket.objects["i"] = index
    manifest = {
        "formatVersion": 1,
        "database": {"key": "d", "bytes": 0},
        "files": {"index": {"key": "i", "bytes": len(index), "sha256": hashlib.sha256(index).hexdigest()}},
        "objects": objects,
    }
    bucket.objects["m"] = json.dumps(manifest).encode()
    dst = tmp_path / "dst"
    dst.mkdir()
    reader = SnapshotReader(bucket, "b", "m")
    before = bucket.gets
    out = restore_tree(reader, dst, Counters())
    assert out["order"] == "storage"
    assert bucket.gets - before <= 6 + len(objects)  # the index a few times, each pack once
    got = {str(p.relative_to(dst)): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    assert got == contents
    assert (dst / "03" / "0003").stat().st_mode & 0o777 == 0o640


def test_a_damaged_index_or_file_leaves_the_target_exactly_as_it_was(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    (src / "ro").chmod(0o755)
    pristine, digest = snapshot_of(src)
    reader = SnapshotReader(pristine, "b", "manifest.json", digest)
    assert reader.m.files is not None
    index_ref = reader.m.files.index.chunks[0]
    big = next(e for e in reader.entries() if e.path == "big")
    dst.mkdir()
    (dst / "00").mkdir()
    (dst / "00" / "f1").write_text("what the target had")
    before = listing(dst)
    for ref in (index_ref, (big.chunks or [])[-1]):
        bucket = Bucket()
        bucket.objects = dict(pristine.objects)
        data = bytearray(bucket.objects[ref.pack])
        data[ref.offset + ref.stored // 2] ^= 1
        bucket.objects[ref.pack] = bytes(data)
        with pytest.raises(IntegrityError):
            restore_tree(SnapshotReader(bucket, "b", "manifest.json", digest), dst, Counters())
        assert listing(dst) == before  # no staged file, no new directory, nothing replaced
