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
import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nightjar import archive
from nightjar.constants import ANNOTATION_EXPIRES_AT, API_VERSION, UPLOADED, UPLOADED_SOURCE
from nightjar.domain.retention import default_expiry
from nightjar.storage import layout
from nightjar.storage.crypto import KeyRing
from nightjar.storage.index import Entry
from nightjar.storage.manifest import Files, Manifest
from nightjar.storage.objects import ObjectStore, StorageError, describe_error
from nightjar.storage.packs import ChunkRef, Ordered, Slot, StreamStore, split_file
from nightjar.storage.writer import SnapshotWriter
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
    """Receives an archive's parts from ``archive.inspect`` and stores them as a format-2
    snapshot (compressed, deduplicated within itself, encrypted when the storage encrypts)."""

    def __init__(
        self, into: ObjectStore, loc: layout.SnapshotLocation, run: int = RUN, keyring: KeyRing | None = None
    ) -> None:
        self.store = into
        self.loc = loc
        self.writer = SnapshotWriter(into, loc, keyring=keyring)
        self.dump: StreamStore | None = None
        self.sorter = IndexSorter(run)
        self.order = Ordered()
        self.uploaded_bytes = 0

    def on_dump(self, stream: archive.Readable, size: int) -> None:
        dump = self.writer.dump_stream()
        while chunk := stream.read(CHUNK):
            dump.write(chunk)
        self.dump = dump

    def on_file(self, member: archive.TreeFile, stream: archive.Readable) -> None:
        h = hashlib.sha256()
        n = 0
        slots: list[Slot] = []
        for blob in split_file(stream, member.size):
            h.update(blob)
            n += len(blob)
            slots.append(self.writer.packs.add(blob))
        self.uploaded_bytes += n
        entry = Entry(member.path, "f", member.mode or 0o644, n, member.mtime * 10**9, h.hexdigest())
        self._sort(self.order.put(entry, slots))

    def _sort(self, ready: Iterable[tuple[Any, list[ChunkRef]]]) -> None:
        for e, refs in ready:
            e.chunks = refs
            self.sorter.add(e)

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
        if self.dump is None:
            raise archive.ArchiveError("the archive has no database dump")
        self.writer.packs.flush()
        self._sort(self.order.drain())
        h = info.dump_header
        database = self.writer.database(
            self.dump,
            pg_dump_version=h.pg_dump_version,
            server_version=h.server_version,
            archive_version=h.archive_version_text,
            dbname=h.database,
        )
        database.dump_compression = ""  # the archive's dump, byte for byte (pg_dump's compression)
        files: Files | None = None
        if self.sorter.count:
            index = self.writer.index()
            for e in with_directories(self.sorter.sorted()):
                if e.type == "d":
                    index.add_dir(e.path, e.mode)
                else:
                    index.add_stored(e)
            files = index.finish()
            files.uploaded_bytes = self.uploaded_bytes
        meta = {k: str(v) for k, v in info.metadata.items()}
        key, digest, m = self.writer.commit(
            created=created,
            expires=expires,
            database=database,
            files=files,
            backup={"namespace": namespace, "name": name, "type": UPLOADED},
            source=UPLOADED_SOURCE,
            contents=info.kind,
            model_version=meta.get("modelVersion", ""),
            extra={"upload": upload_section(info, upload_id, file_name)},
        )
        return Stored(key, digest, summary(m), self.loc.backup_prefix)

    def discard(self) -> list[str]:
        """Delete everything this upload wrote; returns the keys Object Lock kept (bucket defaults)."""
        self.sorter.close()
        self.writer.abort()
        _, locked = self.store.delete(self.loc.backup_prefix)
        return locked


def upload_section(info: archive.ArchiveInfo, upload_id: str, file_name: str) -> dict[str, Any]:
    """What was uploaded, kept in the manifest."""
    h = info.dump_header
    return {
        "uploadId": upload_id,
        "fileName": file_name,
        "archive": info.kind,
        "metadata": {k: str(v) for k, v in info.metadata.items()},
        "dumpCreated": h.created.isoformat() if h.created else "",
        "mendixCompatible": h.mendix_compatible,
    }


def summary(m: Manifest) -> dict[str, Any]:
    """The parts of an upload's manifest the CLI shows and the Backup is made of."""
    return {
        "formatVersion": m.format,
        "snapshotId": m.snapshot_id,
        "contents": m.contents,
        "createdOn": m.created_on,
        "expiresOn": m.expires_on,
        "modelVersion": m.model_version,
        "sizeUncompressedBytes": m.size_uncompressed,
        "database": m.database.summary() if m.database else {},
        "files": {"count": m.files.count, "bytes": m.files.bytes} if m.files else None,
        "objects": len(m.objects),
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
    keyring: KeyRing | None = None,
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
    sink = SnapshotSink(into, loc, run, keyring)
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
    parts = [f"database dump {m['database'].get('bytes', 0) / 1e6:.2f} MB"]
    if files:
        parts.append(f"{files['count']} files, {files['bytes'] / 1e6:.2f} MB")
    mv = m.get("modelVersion")
    return f"{m['contents']} archive: " + ", ".join(parts) + (f", model version {mv}" if mv else "")
