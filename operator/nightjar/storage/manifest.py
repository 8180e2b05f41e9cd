"""The snapshot manifest: one typed model, one writer, one reader, every format.

A snapshot exists once its manifest does (it is written last). The manifest is JSON with a
**public part** that storage housekeeping needs without any key — the format number, snapshot
id, creation and expiry, and every stored object the snapshot uses (key, stored size, sha256 of
the stored bytes, and for encrypted objects the id of the key-encryption key and the wrapped data
key) — and a **content part** with everything else: the backup it belongs to, the database and
files details, and where every byte is (chunk lists). On an encrypted storage the content part
is sealed with the manifest's own data key and carries the sha256 of the public part, so the
public part is authenticated too.

Formats:

* ``1`` (up to release 0.1): everything in the clear, ``database.key`` is one ``db.dump`` object
  in pg_dump's own compression, ``files.index`` one ``files.jsonl.gz`` object.
* ``2`` (written now): the dump is pg_dump ``-Z0`` cut into content-defined chunks, compressed
  with zstd, deduplicated against the source's previous snapshot; the file index likewise; file
  contents are blobs in packs (:mod:`nightjar.storage.packs`); optional encryption.

Optional fields a reader that does not know them skips (so adding one makes no new format):
``database.rowCounts`` (format 2, when the Backup asked for it: each user table's exact row
count, ``{"schema.table": n}``, taken in the dump's own snapshot; names as PostgreSQL's
``format('%I.%I')`` writes them). A newer field that an older reader must not skip would need a
new format number.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from nightjar.storage.crypto import KeyProblem, KeyRing, Sealer
from nightjar.storage.errors import IntegrityError
from nightjar.storage.packs import ChunkRef, Codec

FORMAT_1 = 1
FORMAT_2 = 2
CURRENT_FORMAT = FORMAT_2
SUPPORTED = (FORMAT_1, FORMAT_2)


@dataclass(frozen=True)
class StoredObject:
    """One object in the bucket: stored bytes and their sha256 (checkable without keys)."""

    key: str
    bytes: int
    sha256: str
    key_id: str = ""
    wrapped_key: str = ""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"key": self.key, "bytes": self.bytes, "sha256": self.sha256}
        if self.key_id:
            d.update(keyId=self.key_id, wrappedKey=self.wrapped_key)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StoredObject:
        return cls(
            str(d["key"]),
            int(d["bytes"]),
            str(d.get("sha256") or ""),
            str(d.get("keyId") or ""),
            str(d.get("wrappedKey") or ""),
        )


@dataclass
class Stream:
    """A stored byte stream (the dump, the index): format 1 one object, format 2 chunks.

    Format 2 as written now lists the chunk list's groups (``lists``, see
    :func:`nightjar.storage.packs.list_groups`) rather than the chunks; the reader fills
    ``chunks`` from them. Format-2 manifests of the first builds list ``chunks`` inline.
    """

    bytes: int
    sha256: str
    key: str = ""  # format 1
    chunks: list[ChunkRef] = field(default_factory=list)  # format 2
    lists: list[ChunkRef] = field(default_factory=list)  # format 2: where ``chunks`` are stored
    count: int = 0  # the number of chunks, when they are in ``lists``

    @property
    def resolved(self) -> bool:
        """Whether ``chunks`` holds the chunk list (always, except after parsing ``lists``)."""
        return not self.lists or len(self.chunks) == self.count

    def chunk_json(self, d: dict[str, Any]) -> dict[str, Any]:
        if self.lists:
            d["chunkLists"] = [c.to_list() for c in self.lists]
            d["chunkCount"] = len(self.chunks) if self.chunks else self.count
        else:
            d["chunks"] = [c.to_list() for c in self.chunks]
        return d

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bytes": self.bytes, "sha256": self.sha256}
        if self.key:
            d["key"] = self.key
            return d
        return self.chunk_json(d)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Stream:
        return cls(
            int(d["bytes"]),
            str(d.get("sha256") or ""),
            str(d.get("key") or ""),
            [ChunkRef.from_list(c) for c in d.get("chunks") or []],
            [ChunkRef.from_list(c) for c in d.get("chunkLists") or []],
            int(d.get("chunkCount") or 0),
        )


@dataclass
class Database:
    dump: Stream
    pg_dump_version: str = ""
    server_version: str = ""
    archive_version: str = ""
    dbname: str = ""
    #: How the stored dump differs from what ``pg_restore`` reads: "" as pg_dump wrote it
    #: (format 1), "uncompressed" (-Z0, zstd-compressed by Nightjar per chunk).
    dump_compression: str = ""
    #: Each user table's exact row count in the dump's snapshot (``"schema.table"`` as
    #: ``format('%I.%I')`` writes it); None when the backup was not asked to count.
    row_counts: dict[str, int] | None = None

    def to_json(self, fmt: int) -> dict[str, Any]:
        d: dict[str, Any] = {
            "bytes": self.dump.bytes,
            "sha256": self.dump.sha256,
            "pgDumpVersion": self.pg_dump_version,
            "serverVersion": self.server_version,
            "archiveVersion": self.archive_version,
            "dbname": self.dbname,
        }
        if self.row_counts is not None:
            d["rowCounts"] = dict(sorted(self.row_counts.items()))
        if fmt == FORMAT_1:
            d["key"] = self.dump.key
            return d
        d["dumpCompression"] = self.dump_compression
        return self.dump.chunk_json(d)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Database:
        return cls(
            Stream.from_json(d),
            str(d.get("pgDumpVersion") or ""),
            str(d.get("serverVersion") or ""),
            str(d.get("archiveVersion") or ""),
            str(d.get("dbname") or ""),
            str(d.get("dumpCompression") or ""),
            _row_counts(d.get("rowCounts")),
        )

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bytes": self.dump.bytes,
            "pgDumpVersion": self.pg_dump_version,
            "serverVersion": self.server_version,
        }
        if self.row_counts is not None:
            out["tablesCounted"] = len(self.row_counts)
            out["rowsCounted"] = sum(self.row_counts.values())
        return out


def _row_counts(raw: Any) -> dict[str, int] | None:
    """``database.rowCounts`` as read: None when absent; a non-map or a negative or non-integer
    count is a damaged manifest (ValueError, which :meth:`Manifest.parse` reports)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError("database.rowCounts is not a map")
    counts: dict[str, int] = {}
    for name, n in raw.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"database.rowCounts[{name!r}] is not a row count")
        counts[str(name)] = n
    return counts


@dataclass
class Files:
    index: Stream
    count: int = 0
    bytes: int = 0
    dirs: int = 0
    reused_files: int = 0
    reused_bytes: int = 0
    uploaded_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index.to_json(),
            "count": self.count,
            "bytes": self.bytes,
            "dirs": self.dirs,
            "reusedFiles": self.reused_files,
            "reusedBytes": self.reused_bytes,
            "uploadedBytes": self.uploaded_bytes,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Files:
        return cls(
            Stream.from_json(d["index"]),
            int(d.get("count") or 0),
            int(d.get("bytes") or 0),
            int(d.get("dirs") or 0),
            int(d.get("reusedFiles") or 0),
            int(d.get("reusedBytes") or 0),
            int(d.get("uploadedBytes") or 0),
        )


@dataclass
class Manifest:
    snapshot_id: str
    created_on: str
    expires_on: str
    objects: list[StoredObject]
    database: Database | None
    files: Files | None = None
    format: int = CURRENT_FORMAT
    backup: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    contents: str = "Full"
    model_version: str = ""
    size_uncompressed: int = 0
    #: The per-source chunk-id key (encrypted storage, format 2); passed on to the next snapshot.
    id_key: bytes | None = field(default=None, repr=False)
    #: Fields this model does not know (e.g. an upload's archive details), kept as they are.
    extra: dict[str, Any] = field(default_factory=dict)
    #: Set when read: the key id the manifest itself was sealed with ("" when not encrypted).
    key_id: str = ""

    # --- views ----------------------------------------------------------------------------------

    @property
    def encrypted(self) -> bool:
        return any(o.key_id for o in self.objects) or bool(self.key_id)

    def object(self, key: str) -> StoredObject | None:
        for o in self.objects:
            if o.key == key:
                return o
        return None

    def key_ids(self) -> set[str]:
        ids = {o.key_id for o in self.objects if o.key_id}
        if self.key_id:
            ids.add(self.key_id)
        return ids

    def part_keys(self) -> set[str]:
        """Every object the snapshot's own content is in (format 1: the dump and index objects;
        format 2: every pack a chunk of the dump or the index, or their chunk lists, is in, as far
        as the chunk lists are read)."""
        keys: set[str] = set()
        for stream in (
            self.database.dump if self.database else None,
            self.files.index if self.files else None,
        ):
            if stream is None:
                continue
            if stream.key:
                keys.add(stream.key)
            keys |= {c.pack for c in stream.chunks}
            keys |= {c.pack for c in stream.lists}
        return keys

    def streams(self) -> list[tuple[str, Stream]]:
        """The snapshot's stored streams, named as errors name them."""
        out = []
        if self.database is not None:
            out.append(("database dump", self.database.dump))
        if self.files is not None:
            out.append(("file index", self.files.index))
        return out

    # --- writing --------------------------------------------------------------------------------

    def _public(self) -> dict[str, Any]:
        return {
            "formatVersion": self.format,
            "snapshotId": self.snapshot_id,
            "createdOn": self.created_on,
            "expiresOn": self.expires_on,
            "objects": [o.to_json() for o in sorted(self.objects, key=lambda o: o.key)],
        }

    def _content(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update(
            backup=self.backup,
            source=self.source,
            contents=self.contents,
            modelVersion=self.model_version,
            sizeUncompressedBytes=self.size_uncompressed,
            database=self.database.to_json(self.format) if self.database else None,
            files=self.files.to_json() if self.files else None,
        )
        if self.id_key is not None:
            d["idKey"] = base64.b64encode(self.id_key).decode()
        return d

    def to_bytes(self, keyring: KeyRing | None = None) -> bytes:
        """The manifest object's bytes (sealed when ``keyring`` is given; format 2 only)."""
        public = self._public()
        if self.format == FORMAT_1:
            if keyring is not None:
                raise ValueError("format 1 has no encryption")
            return json.dumps({**public, **self._content()}, indent=1, sort_keys=True).encode()
        content = self._content()
        if keyring is None:
            # The content part holds every chunk reference: compressed, it is a tenth of its size
            # (each night's new manifest is most of what an unchanged night adds).
            text = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
            public["contentZstd"] = base64.b64encode(Codec().encode(text)).decode()
            public["contentBytes"] = len(text)
            return json.dumps(public, sort_keys=True, separators=(",", ":")).encode()
        content["publicSha256"] = _digest(public)
        dek, kid, wrapped = keyring.new_data_key()
        text = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
        plain = Codec().encode(text)
        public["encryption"] = {"algorithm": "AES-256-GCM-SEG64K", "keyId": kid, "wrappedKey": wrapped}
        public["sealed"] = base64.b64encode(Sealer(dek).seal(0, plain)).decode()
        public["sealedBytes"] = len(text)
        return json.dumps(public, sort_keys=True, separators=(",", ":")).encode()

    # --- reading --------------------------------------------------------------------------------

    @classmethod
    def parse(
        cls,
        raw: bytes,
        keyring: KeyRing | None = None,
        what: str = "manifest",
        data_key: bytes | None = None,
    ) -> Manifest:
        """Read any format. An encrypted manifest needs ``keyring`` (or its unwrapped ``data_key``)."""
        d = _json(raw, what)
        fmt = d.get("formatVersion")
        if fmt not in SUPPORTED:
            raise IntegrityError(f"{what} has format {fmt!r}; this Nightjar reads formats 1 and 2")
        key_id = ""
        if fmt == FORMAT_1:
            content = d
        elif "sealed" in d:
            enc = d.get("encryption") or {}
            key_id = str(enc.get("keyId") or "")
            if data_key is None:
                if keyring is None:
                    raise KeyProblem(
                        f"{what} is encrypted (key id {key_id}) and the storage has no encryption key "
                        "Secret configured"
                    )
                data_key = keyring.unwrap(str(enc.get("wrappedKey") or ""), key_id)
            try:
                sealed = base64.b64decode(d["sealed"])
            except (binascii.Error, ValueError) as e:
                raise IntegrityError(f"{what} is damaged: its sealed part is not base64") from e
            plain = Codec().decode(
                Sealer(data_key).open(0, sealed, what), int(d.get("sealedBytes") or 0), what
            )
            content = _json(plain, what)
            public = {k: d[k] for k in ("formatVersion", "snapshotId", "createdOn", "expiresOn", "objects")}
            if content.get("publicSha256") != _digest(public):
                raise IntegrityError(f"{what} is damaged: its public part was changed")
        elif "contentZstd" in d:
            try:
                packed = base64.b64decode(d["contentZstd"])
            except (binascii.Error, ValueError) as e:
                raise IntegrityError(f"{what} is damaged: its content part is not base64") from e
            content = _json(Codec().decode(packed, int(d.get("contentBytes") or 0), what), what)
        else:
            content = d.get("content") or {}
        try:
            objects = [StoredObject.from_json(o) for o in d.get("objects") or []]
            known = {
                "formatVersion", "snapshotId", "createdOn", "expiresOn", "objects", "backup", "source",
                "contents", "modelVersion", "sizeUncompressedBytes", "database", "files", "idKey",
                "publicSha256", "content", "contentZstd", "contentBytes",
            }  # fmt: skip
            return cls(
                snapshot_id=str(d.get("snapshotId") or ""),
                created_on=str(d.get("createdOn") or ""),
                expires_on=str(d.get("expiresOn") or ""),
                objects=objects,
                database=Database.from_json(content["database"]) if content.get("database") else None,
                files=Files.from_json(content["files"]) if content.get("files") else None,
                format=int(fmt),
                backup=dict(content.get("backup") or {}),
                source=str(content.get("source") or ""),
                contents=str(content.get("contents") or "Full"),
                model_version=str(content.get("modelVersion") or ""),
                size_uncompressed=int(content.get("sizeUncompressedBytes") or 0),
                id_key=base64.b64decode(content["idKey"]) if content.get("idKey") else None,
                extra={k: v for k, v in content.items() if k not in known},
                key_id=key_id,
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as e:
            raise IntegrityError(f"{what} is not a snapshot manifest: {type(e).__name__} {e}") from e


@dataclass(frozen=True)
class PublicManifest:
    """What anyone with bucket access reads without a key: enough for GC, replication, deletion
    and `nightjar keys status`."""

    format: int
    snapshot_id: str
    created_on: str
    expires_on: str
    objects: list[StoredObject]
    manifest_key_id: str = ""

    @classmethod
    def parse(cls, raw: bytes, what: str = "manifest") -> PublicManifest:
        d = _json(raw, what)
        fmt = d.get("formatVersion")
        if isinstance(fmt, int) and fmt > CURRENT_FORMAT:
            # A newer Nightjar's: what it lists (and shares) cannot be told from this model.
            raise IntegrityError(
                f"{what} is of format {fmt}, newer than this Nightjar reads ({CURRENT_FORMAT})"
            )
        try:
            return cls(
                int(d.get("formatVersion") or 0),
                str(d.get("snapshotId") or ""),
                str(d.get("createdOn") or ""),
                str(d.get("expiresOn") or ""),
                [StoredObject.from_json(o) for o in d.get("objects") or []],
                str((d.get("encryption") or {}).get("keyId") or ""),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise IntegrityError(f"{what} is not a snapshot manifest: {type(e).__name__} {e}") from e

    def key_ids(self) -> set[str]:
        ids = {o.key_id for o in self.objects if o.key_id}
        if self.manifest_key_id:
            ids.add(self.manifest_key_id)
        return ids

    def manifest_data_key(self, raw: bytes, keyring: KeyRing) -> bytes:
        """The unwrapped data key of an encrypted manifest (for a restore in another namespace)."""
        enc = _json(raw, "manifest").get("encryption") or {}
        return keyring.unwrap(str(enc.get("wrappedKey") or ""), str(enc.get("keyId") or ""))


def _digest(public: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(public, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise IntegrityError(f"{what} is not JSON: {e}") from e
    if not isinstance(d, dict):
        raise IntegrityError(f"{what} is not a snapshot manifest")
    return d
