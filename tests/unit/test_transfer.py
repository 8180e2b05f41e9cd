"""The pure parts of download, upload, backup and restore commands: names, the sorted index of
an upload, its manifest and Backup, the objects the commands create, the tenancy rule."""

from __future__ import annotations

import datetime as dt
import io
import random

import pytest

from nightjar import archive
from nightjar.agent.files import sort_key
from nightjar.domain.pgdump import parse_header
from nightjar.reconcile.adoption import upload_prefix
from nightjar.storage import layout
from nightjar.storage.index import Entry
from nightjar.storage.snapshot import SnapshotReader
from nightjar.transfer import CommandError
from nightjar.transfer.names import DATABASE_ONLY, FILES_ONLY, FULL, archive_filename, object_name
from nightjar.transfer.order import IndexSorter, scan, storage_order, with_directories
from nightjar.transfer.resources import (
    backup_body,
    backup_row,
    restore_body,
    restore_progress,
    restore_target,
    source_spec,
    table,
)
from nightjar.transfer.upload import SnapshotSink, Stored
from nightjar.transfer.upload import backup_body as uploaded_backup_body
from tests.memstore import MemoryStore
from tests.unit.test_pgdump_header import header

T = dt.datetime(2026, 11, 24, 18, 3, 59, tzinfo=dt.UTC)


# --- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("what", "name"),
    [
        (FULL, "shop-202611241803.tar.gz"),
        (DATABASE_ONLY, "database-shop-202611241803.backup"),
        (FILES_ONLY, "files-shop-202611241803.tar.gz"),
    ],
)
def test_download_names_follow_mendix(what: str, name: str) -> None:
    assert archive_filename("shop", T, what) == name


def test_download_names_use_the_snapshot_time_in_utc() -> None:
    cet = dt.timezone(dt.timedelta(hours=1))
    assert archive_filename("shop", T.astimezone(cet), FULL) == "shop-202611241803.tar.gz"


def test_generated_object_names_are_valid_and_short() -> None:
    assert object_name("upload", T) == "upload-20261124180359"
    long = object_name("Restore-" + "x" * 80 + "_Shop", T)
    assert len(long) <= 63
    assert long.endswith("-20261124180359")
    assert set(long) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    assert object_name("!!!", T) == "nightjar-20261124180359"


# --- the index of an upload -------------------------------------------------------------------------


def entry(path: str) -> Entry:
    return Entry(path, "f", 0o644, len(path), 0, "", "p", 0)


PATHS = [
    "a",
    "a b",
    "a/b/c",
    "a/b!",
    "a-z/0d/3e/0d3e301f-5551-46f8-ad44-8de2be084c95",
    "zz/ünï/file",
    "0d/3e/x",
    "0d/3f",
    "b/c",
]


@pytest.mark.parametrize("run", [1, 2, 3, 1000])
def test_index_entries_come_out_in_path_order_whatever_their_order_in(run: int) -> None:
    shuffled = PATHS[:]
    random.Random(run).shuffle(shuffled)  # noqa: S311 - a reproducible order, not a secret
    sorter = IndexSorter(run=run)
    for p in shuffled:
        sorter.add(entry(p))
    try:
        out = [e.path for e in sorter.sorted()]
        assert (len(sorter.runs) > 1) == (run < len(PATHS))  # spilled to disk only past one run
    finally:
        sorter.close()
    assert out == sorted(PATHS, key=sort_key)


def test_a_path_twice_in_an_archive_is_refused() -> None:
    sorter = IndexSorter(run=2)
    for p in ["x", "y", "x", "z"]:
        sorter.add(entry(p))
    with pytest.raises(archive.ArchiveError, match="tree/x is in the archive twice"):
        list(sorter.sorted())
    sorter.close()


def test_directories_are_added_before_their_first_entry() -> None:
    paths = sorted(["0d/3e/aaa", "0d/3e/bbb", "0d/3f/ccc", "top", "x/y/z/deep"], key=sort_key)
    got = [(e.type, e.path) for e in with_directories(iter(entry(p) for p in paths))]
    assert got == [
        ("d", "0d"),
        ("d", "0d/3e"),
        ("f", "0d/3e/aaa"),
        ("f", "0d/3e/bbb"),
        ("d", "0d/3f"),
        ("f", "0d/3f/ccc"),
        ("f", "top"),
        ("d", "x"),
        ("d", "x/y"),
        ("d", "x/y/z"),
        ("f", "x/y/z/deep"),
    ]
    assert [e.path for e in with_directories(iter(entry(p) for p in paths))] == sorted(
        [p for _, p in got], key=sort_key
    )


def test_a_path_that_is_a_file_and_a_directory_is_refused() -> None:
    with pytest.raises(archive.ArchiveError, match="tree/a is both a file and a directory"):
        list(with_directories(iter([entry("a"), entry("a/b")])))


def stored_at(path: str, pack: int, offset: int, size: int = 100) -> Entry:
    return Entry(path, "f", 0o644, size, 0, "", f"packs/{pack:06d}.pack", offset)


def test_a_taken_snapshot_reads_in_path_order_pack_after_pack() -> None:
    entries = [Entry("d", "d", 0o755)] + [
        stored_at(f"d/f{i:03d}", 1 + i // 50, (i % 50) * 100) for i in range(200)
    ]
    s = scan(entries)
    assert (s.files, s.bytes, len(s.packs), s.reopens) == (200, 20_000, 4, 4)
    assert s.sequential


def test_an_upload_of_an_unsorted_archive_is_read_in_storage_order() -> None:
    order = list(range(300))
    random.Random(7).shuffle(order)  # noqa: S311 - the archive's order, not a secret
    # The archive came in `order`: packs hold the files that way; the index is in path order.
    by_path = sorted(
        (stored_at(f"f{n:04d}", 1 + k // 100, (k % 100) * 100) for k, n in enumerate(order)),
        key=lambda e: sort_key(e.path),
    )
    s = scan(by_path)
    assert s.reopens > 200 and not s.sequential
    back = list(
        storage_order([Entry("x", "d", 0o755), *by_path, Entry("l", "l", 0o777, target="f0001")], run=7)
    )
    assert [(e.pack, e.offset) for e in back] == sorted((e.pack, e.offset) for e in by_path)
    assert scan(back).reopens == 3  # one GET per pack


def test_empty_directories_and_symlinks_are_counted() -> None:
    entries = [
        Entry("a", "d", 0o755),
        stored_at("a/x", 1, 0),
        Entry("empty", "d", 0o755),
        Entry("empty2", "d", 0o755),
        Entry("link", "l", 0o777, target="a/x"),
        Entry("z", "d", 0o755),
    ]
    s = scan(entries)
    assert (s.files, s.empty_dirs, s.symlinks) == (1, 3, 1)


# --- the manifest and the Backup of an upload ---------------------------------------------------------


STORE = MemoryStore()


def uploaded(kind: str = "Full") -> Stored:
    """A real upload (the sink ``nightjar upload`` uses) of a small archive into a memory store."""
    loc = layout.SnapshotLocation(
        "tenant-a", "shop", "uploaded", "f" * 32, "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    )
    dump = header() + b"x" * (5000 - len(header()))
    info = archive.ArchiveInfo(
        kind, {"modelVersion": "1.0.0.40", "dumpSize": 5}, parse_header(header()), 5000, 2, 403
    )
    sink = SnapshotSink(STORE, loc)
    sink.on_dump(io.BytesIO(dump), -1)
    if kind == "Full":
        sink.on_file(archive.TreeFile("b/2", 3, 0o644, 1_700_000_000), io.BytesIO(b"two"))
        sink.on_file(archive.TreeFile("a/1", 400, 0o600, 1_700_000_000), io.BytesIO(b"1" * 400))
    return sink.finish(
        info,
        namespace="shop",
        name="upload-1",
        upload_id="f" * 32,
        created=T,
        expires=T + dt.timedelta(days=90),
        file_name="shop-202611241803.tar.gz",
    )


def test_the_manifest_of_an_upload_is_a_snapshot_manifest() -> None:
    stored = uploaded()
    m = stored.manifest
    assert (m["formatVersion"], m["contents"], m["modelVersion"]) == (2, "Full", "1.0.0.40")
    assert m["createdOn"] == "2026-11-24T18:03:59Z"
    assert m["sizeUncompressedBytes"] == 5000 + 403
    assert m["files"] == {"count": 2, "bytes": 403}
    reader = SnapshotReader(STORE, stored.manifest_key, stored.manifest_sha256)
    full = reader.m
    assert (full.source, full.backup) == (
        "uploaded",
        {"namespace": "shop", "name": "upload-1", "type": "Uploaded"},
    )
    assert full.database is not None and full.database.server_version.startswith("15.")
    assert full.database.archive_version == "1.14.0"
    assert full.extra["upload"]["metadata"] == {"modelVersion": "1.0.0.40", "dumpSize": "5"}
    assert full.extra["upload"]["mendixCompatible"] is True
    # the index is in path order although the archive had b/2 first; directories are added
    assert [(e.path, e.type) for e in reader.entries()] == [
        ("a", "d"),
        ("a/1", "f"),
        ("b", "d"),
        ("b/2", "f"),
    ]
    got = {
        e.path: b"".join(iter(lambda s=st: s.read(1 << 20), b""))
        for e, st in reader.contents(reader.entries())
        if st
    }
    assert got == {"a/1": b"1" * 400, "b/2": b"two"}


def test_the_backup_of_an_upload_has_no_source_and_names_its_manifest() -> None:
    stored = uploaded("DatabaseOnly")
    body = uploaded_backup_body("upload-1", "shop", "primary", stored, "from Mendix Cloud")
    assert body["spec"] == {
        "storageRef": {"name": "primary"},
        "type": "Uploaded",
        "contents": "DatabaseOnly",
        "upload": {"manifestKey": stored.manifest_key, "manifestSha256": stored.manifest_sha256},
        "comment": "from Mendix Cloud",
    }
    assert body["metadata"]["annotations"]["nightjar.dev/expires-at"] == stored.manifest["expiresOn"]
    assert stored.manifest["files"] is None


def test_an_uploaded_backup_may_only_point_at_its_own_namespaces_uploads() -> None:
    key = uploaded().manifest_key
    assert (
        key
        == f"tenant-a/nightjar/v1/shop/uploaded/{'f' * 32}/1b4e28ba-2fa1-11d2-883f-0016d3cca427/manifest.json"
    )
    assert upload_prefix("tenant-a", "shop", key) == f"tenant-a/nightjar/v1/shop/uploaded/{'f' * 32}/"
    assert upload_prefix("/tenant-a/", "shop", key) is not None
    assert upload_prefix("tenant-a", "shop-2", key) is None  # another namespace
    assert upload_prefix("", "shop", key) is None  # another storage prefix
    assert upload_prefix("tenant-a", "shop", key.replace("/uploaded/", "/0123456789abcdef/")) is None
    assert upload_prefix("tenant-a", "shop", key.replace("manifest.json", "db.dump")) is None
    assert upload_prefix("tenant-a", "shop", key.replace(f"{'f' * 32}/", f"{'f' * 32}/../../x/")) is None
    assert upload_prefix("tenant-a", "shop", key.replace(f"{'f' * 32}/", "")) is None


# --- backup create / list -------------------------------------------------------------------------


def test_backup_create_builds_the_yaml_a_person_would_write() -> None:
    source = source_spec(db_secret="db", files_claim="files", files_path="/data/files/", app_name="shop")
    body = backup_body("b1", "shop", storage="primary", source=source, database_only=False, comment="x")
    assert body == {
        "apiVersion": "nightjar.dev/v1alpha1",
        "kind": "Backup",
        "metadata": {"name": "b1", "namespace": "shop"},
        "spec": {
            "storageRef": {"name": "primary"},
            "source": {
                "database": {"secretRef": {"name": "db"}},
                "files": {"persistentVolumeClaim": {"claimName": "files", "path": "data/files"}},
                "app": {"kind": "Deployment", "name": "shop"},
            },
            "type": "OnDemand",
            "contents": "Full",
            "comment": "x",
        },
    }


def test_files_path_without_a_claim_is_refused() -> None:
    with pytest.raises(CommandError, match="--files-path needs --files-claim"):
        source_spec(db_secret="db", files_path="x")


def test_backup_list_prints_kubectl_columns() -> None:
    b = {
        "metadata": {"name": "first", "namespace": "shop", "annotations": {"nightjar.dev/expires-at": "E"}},
        "spec": {"type": "Uploaded", "comment": "before upgrade"},
        "status": {
            "phase": "Completed",
            "createdOn": "2026-11-24T18:03:59Z",
            "expiresOn": "2027-02-24T18:03:58Z",
            "sizeUncompressedMB": "4.40",
            "modelVersion": "10.4.1.33",
        },
    }
    queued = {"metadata": {"name": "second-one", "namespace": "shop"}, "spec": {}}
    out = table(
        ["NAMESPACE", "NAME", "STATUS", "TYPE", "CREATED", "EXPIRES", "SIZE(MB)", "MODEL", "COMMENT"],
        [backup_row(b, True), backup_row(queued, True)],
    ).splitlines()
    assert out[0].split() == [
        "NAMESPACE",
        "NAME",
        "STATUS",
        "TYPE",
        "CREATED",
        "EXPIRES",
        "SIZE(MB)",
        "MODEL",
        "COMMENT",
    ]
    assert out[1].split() == [
        "shop",
        "first",
        "Completed",
        "Uploaded",
        "2026-11-24T18:03:59Z",
        "2027-02-24T18:03:58Z",
        "4.40",
        "10.4.1.33",
        "before",
        "upgrade",
    ]
    assert out[2].split() == ["shop", "second-one", "OnDemand"]
    assert out[0].index("STATUS") == out[1].index("Completed")  # aligned columns
    assert backup_row(b, False)[0] == "first"


# --- restore ------------------------------------------------------------------------------------------


def taken(files: bool = True) -> dict[str, object]:
    source: dict[str, object] = {
        "database": {"secretRef": {"name": "db"}},
        "app": {"kind": "Deployment", "name": "shop"},
    }
    if files:
        source["files"] = {"persistentVolumeClaim": {"claimName": "files", "path": "docs"}}
    return {
        "metadata": {"name": "nightly", "namespace": "prod"},
        "spec": {"source": source, "contents": "Full"},
        "status": {"phase": "Completed", "files": {"count": 3 if files else 0, "bytes": 10}},
    }


def no_flags() -> dict[str, object]:
    return {"db_secret": None, "files_claim": None, "files_path": None, "app_kind": None, "app_name": None}


def test_a_restore_target_defaults_to_the_backups_source() -> None:
    b = taken()
    assert restore_target(b, to_namespace="prod", database_only=False, **no_flags()) == b["spec"]["source"]  # type: ignore[arg-type,index]


def test_a_restore_target_takes_each_part_given_and_the_rest_from_the_source() -> None:
    flags = {**no_flags(), "db_secret": "acc-db", "files_claim": "acc-files"}
    got = restore_target(taken(), to_namespace="acc", database_only=False, **flags)  # type: ignore[arg-type]
    assert got == {
        "database": {"secretRef": {"name": "acc-db"}},
        "files": {"persistentVolumeClaim": {"claimName": "acc-files"}},
        "app": {"kind": "Deployment", "name": "shop"},
    }
    db_only = restore_target(taken(), to_namespace="acc", database_only=True, **no_flags())  # type: ignore[arg-type]
    assert "files" not in db_only


def test_an_uploaded_backup_needs_the_target_named() -> None:
    up = {
        "metadata": {"name": "upload-1", "namespace": "prod"},
        "spec": {"type": "Uploaded", "contents": "Full"},
        "status": {"phase": "Completed", "files": {"count": 5, "bytes": 1}},
    }
    with pytest.raises(CommandError, match="was uploaded and has no source to restore into"):
        restore_target(up, to_namespace="prod", database_only=False, **no_flags())  # type: ignore[arg-type]
    with pytest.raises(CommandError, match="holds files: give --files-claim"):
        restore_target(up, to_namespace="prod", database_only=False, **{**no_flags(), "db_secret": "db"})  # type: ignore[arg-type]
    got = restore_target(up, to_namespace="prod", database_only=True, **{**no_flags(), "db_secret": "db"})  # type: ignore[arg-type]
    assert got == {"database": {"secretRef": {"name": "db"}}}


def test_a_restore_names_the_backup_namespace_only_when_it_differs() -> None:
    target = {"database": {"secretRef": {"name": "db"}}}
    same = restore_body(
        "r",
        "prod",
        backup_name="b",
        backup_namespace="prod",
        target=target,
        database_only=False,
        stop_app=True,
    )
    other = restore_body(
        "r",
        "acc",
        backup_name="b",
        backup_namespace="prod",
        target=target,
        database_only=True,
        stop_app=False,
    )
    assert same["spec"] == {"backupRef": {"name": "b"}, "target": target, "contents": "Full", "stopApp": True}
    assert other["spec"]["backupRef"] == {"name": "b", "namespace": "prod"}
    assert (other["spec"]["contents"], other["spec"]["stopApp"]) == ("DatabaseOnly", False)
    assert other["metadata"] == {"name": "r", "namespace": "acc"}


def test_restore_progress_reads_the_status() -> None:
    assert restore_progress({"status": {}}) == (None, "")
    status = {
        "progress": {
            "bytesDone": 5_000_000,
            "bytesTotal": 10_000_000,
            "filesDone": 3,
            "filesTotal": 7,
            "percent": 50,
            "stage": "files",
        }
    }
    assert restore_progress({"status": status}) == (50.0, "files, 3/7 files, 5.0/10.0 MB")


def test_restore_progress_without_totals() -> None:
    assert restore_progress({"status": {"progress": {"stage": "database"}}}) == (None, "database")
