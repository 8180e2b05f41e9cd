"""``nightjar upload``: an archive in the Mendix format becomes a snapshot in the bucket and a
Completed Backup of type Uploaded.

The archive streams once, straight from the file into storage, in the layout of a taken
snapshot (``<prefix>nightjar/v1/<ns>/uploaded/<upload-id>/<snapshot-id>/``: ``db.dump``,
``packs/``, ``files.jsonl.gz``, ``manifest.json``), so download and restore treat it exactly like
one. It is validated while it streams (``archive.inspect``: gzip, tar, ``.metadata``, and the
dump's custom-format structure); when anything is wrong, every object already written is
deleted (none carries retention yet) and no Backup is created.

The file index must be in path order, and an archive's ``tree/`` may come in any order (GNU tar
writes directory order): index entries, never file contents, are sorted with bounded memory
(``transfer.order``). File contents are packed in the archive's order, so a reader that wants
one GET per pack reads an upload in storage order (``order.storage_order``), as download does.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import IO, Any, cast

from nightjar import archive
from nightjar.agent.files import Packer, StoredObject
from nightjar.constants import ANNOTATION_EXPIRES_AT, API_VERSION
from nightjar.domain.retention import default_expiry, format_time
from nightjar.reconcile.backup import UPLOADED, UPLOADED_SOURCE
from nightjar.storage import layout
from nightjar.storage.index import Entry
from nightjar.storage.manifest import FORMAT_1 as MANIFEST_FORMAT
from nightjar.storage.objects import ObjectStore, ObjectWriter, StorageError, describe_error
from nightjar.transfer.order import RUN, IndexSorter, with_directories

CHUNK = 1024 * 1024


@dataclass
class Stored:
    """The snapshot an upload wrote."""

    manifest_key: str
    manifest_sha256: str
    manifest: dict[str, Any]
    #: Everything the upload wrote is under this prefix.
    prefix: str


class SnapshotSink:
    """Receives an archive's parts from ``archive.inspect`` and stores them as a snapshot."""

    def __init__(self, store: ObjectStore, loc: layout.SnapshotLocation, run: int = RUN) -> None:
        self.store = store
        self.loc = loc
        self.objects: dict[str, dict[str, Any]] = {}
        self.database: dict[str, Any] | None = None
        self.sorter = IndexSorter(run)
        self.packer = Packer(open_object=self._open_pack, on_object=self._stored)

    def _open_pack(self, n: int) -> tuple[str, ObjectWriter]:
        key = self.loc.pack(n)
        return key, self.store.writer(key)

    def _stored(self, o: StoredObject) -> None:
        self.objects[o.key] = {"key": o.key, "bytes": o.size, "sha256": o.sha256}

    def on_dump(self, stream: archive.Readable, size: int) -> None:
        key = self.loc.db_dump
        with self.store.writer(key) as w:
            while chunk := stream.read(CHUNK):
                w.write(chunk)
        self.database = {"key": key, "bytes": w.size, "sha256": w.sha256}
        self.objects[key] = dict(self.database)

    def on_file(self, member: archive.TreeFile, stream: archive.Readable) -> None:
        pack, offset, digest, n = self.packer.add_stream(cast(IO[bytes], stream), member.size)
        mode = member.mode or 0o644
        self.sorter.add(Entry(member.path, "f", mode, n, member.mtime * 10**9, digest, pack, offset))

    def finish(
        self,
        info: archive.ArchiveInfo,
        *,
        namespace: str,
        name: str,
        upload_id: str,
        created: dt.datetime,
        expires: dt.datetime,
        file_name: str,
    ) -> Stored:
        """Write the index and the manifest (last: a snapshot exists only once it does)."""
        if self.database is None:
            raise archive.ArchiveError("the archive has no database dump")
        self.packer.close()
        files: dict[str, Any] | None = None
        if self.sorter.count:
            key = self.loc.files_index
            dirs = count = total = 0
            with (
                self.store.writer(key) as idx,
                gzip.GzipFile(fileobj=cast(IO[bytes], idx), mode="wb", compresslevel=6) as gz,
            ):
                for e in with_directories(self.sorter.sorted()):
                    if e.type == "d":
                        dirs += 1
                    else:
                        count += 1
                        total += e.size
                    gz.write(e.to_json().encode() + b"\n")
            self.objects[key] = {"key": key, "bytes": idx.size, "sha256": idx.sha256}
            files = {
                "index": self.objects[key],
                "count": count,
                "bytes": total,
                "dirs": dirs,
                "reusedFiles": 0,
                "reusedBytes": 0,
                "uploadedBytes": self.packer.stats.uploaded_bytes,
            }
        manifest = build_manifest(
            self.loc,
            info,
            database=self.database,
            files=files,
            objects=list(self.objects.values()),
            namespace=namespace,
            name=name,
            upload_id=upload_id,
            created=created,
            expires=expires,
            file_name=file_name,
        )
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        self.store.put(self.loc.manifest, body, content_type="application/json")
        return Stored(self.loc.manifest, hashlib.sha256(body).hexdigest(), manifest, self.loc.backup_prefix)

    def discard(self) -> list[str]:
        """Delete everything this upload wrote; returns the keys Object Lock kept (bucket defaults)."""
        self.sorter.close()
        if self.packer.writer is not None:
            self.packer.writer.abort()
            self.packer.writer = None
        _, locked = self.store.delete(self.loc.backup_prefix)
        return locked


def build_manifest(
    loc: layout.SnapshotLocation,
    info: archive.ArchiveInfo,
    *,
    database: dict[str, Any],
    files: dict[str, Any] | None,
    objects: list[dict[str, Any]],
    namespace: str,
    name: str,
    upload_id: str,
    created: dt.datetime,
    expires: dt.datetime,
    file_name: str,
) -> dict[str, Any]:
    """The manifest of an uploaded snapshot: the agent's format (so readers need not care where a
    snapshot came from) plus an ``upload`` section saying what was uploaded."""
    h = info.dump_header
    db = {
        **database,
        "pgDumpVersion": h.pg_dump_version,
        "serverVersion": h.server_version,
        "archiveVersion": h.archive_version_text,
        "dbname": h.database,
    }
    size = int(database["bytes"]) + (int(files["bytes"]) if files else 0)
    meta = {k: str(v) for k, v in info.metadata.items()}
    return {
        "formatVersion": MANIFEST_FORMAT,
        "snapshotId": loc.attempt,
        "backup": {"namespace": namespace, "name": name, "type": UPLOADED},
        "source": UPLOADED_SOURCE,
        "contents": info.kind,
        "createdOn": format_time(created),
        "expiresOn": format_time(expires),
        "modelVersion": meta.get("modelVersion", ""),
        "sizeUncompressedBytes": size,
        "database": db,
        "files": files,
        "objects": sorted(objects, key=lambda o: o["key"]),
        "upload": {
            "uploadId": upload_id,
            "fileName": file_name,
            "archive": info.kind,
            "metadata": meta,
            "dumpCreated": h.created.isoformat() if h.created else "",
            "mendixCompatible": h.mendix_compatible,
        },
    }


def backup_body(name: str, namespace: str, storage: str, stored: Stored, comment: str) -> dict[str, Any]:
    """The Backup that adopts an uploaded snapshot (the operator verifies and completes it). Its
    expiry is the manifest's, so the two agree."""
    spec: dict[str, Any] = {
        "storageRef": {"name": storage},
        "type": UPLOADED,
        "contents": stored.manifest["contents"],
        "upload": {"manifestKey": stored.manifest_key, "manifestSha256": stored.manifest_sha256},
    }
    if comment:
        spec["comment"] = comment
    return {
        "apiVersion": API_VERSION,
        "kind": "Backup",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {ANNOTATION_EXPIRES_AT: stored.manifest["expiresOn"]},
        },
        "spec": spec,
    }


def store(
    into: ObjectStore,
    storage_prefix: str,
    source: archive.Readable,
    *,
    namespace: str,
    name: str,
    file_name: str,
    now: dt.datetime,
    run: int = RUN,
) -> Stored:
    """Validate ``source`` while storing it as a snapshot; on any error (or Ctrl-C) delete what
    was written, then raise: ArchiveError for a bad archive, UploadFailed (a secret-free message)
    for storage problems.
    """
    upload_id = uuid.uuid4().hex
    loc = layout.SnapshotLocation(
        prefix=storage_prefix,
        namespace=namespace,
        source=UPLOADED_SOURCE,
        backup_uid=upload_id,
        attempt=str(uuid.uuid4()),
    )
    sink = SnapshotSink(into, loc, run)
    expires = default_expiry(now, UPLOADED)
    try:
        info = archive.inspect(source, on_dump=sink.on_dump, on_file=sink.on_file)
        return sink.finish(
            info,
            namespace=namespace,
            name=name,
            upload_id=upload_id,
            created=now,
            expires=expires,
            file_name=file_name,
        )
    except BaseException as e:
        try:
            locked = sink.discard()
        except StorageError as cleanup:
            raise UploadFailed(
                f"{_reason(e)}; and the objects already written under {loc.backup_prefix} could not be "
                f"deleted ({describe_error(cleanup, 'cleanup')}): delete them by hand"
            ) from e
        if locked:
            raise UploadFailed(
                f"{_reason(e)}; {len(locked)} objects already written under {loc.backup_prefix} are kept "
                "by the bucket's default Object Lock retention until it ends"
            ) from e
        if isinstance(e, StorageError):
            raise UploadFailed(
                describe_error(e, f"storage: writing the upload to bucket {into.bucket}")
            ) from e
        raise
    finally:
        sink.sorter.close()


class UploadFailed(Exception):
    """The upload did not make it into storage; nothing of it is left (or the message says what)."""


def _reason(e: BaseException) -> str:
    if isinstance(e, StorageError):
        return describe_error(e, "storage")
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return str(e) or type(e).__name__


def summary_text(stored: Stored) -> str:
    m = stored.manifest
    files = m.get("files") or {}
    parts = [f"database dump {m['database']['bytes'] / 1e6:.2f} MB"]
    if files:
        parts.append(f"{files['count']} files, {files['bytes'] / 1e6:.2f} MB")
    mv = m.get("modelVersion")
    return f"{m['contents']} archive: " + ", ".join(parts) + (f", model version {mv}" if mv else "")
