"""Write one snapshot in format 2: the only writer of snapshot objects and manifests.

Used by the backup agent (and the pieces by ``nightjar upload``)::

    w = SnapshotWriter(store, location, keyring=ring, previous=prev_manifest, lock=lock)
    dump = w.stream("database")          # file-like: write the pg_dump -Z0 bytes into it
    ...
    w.database(dump, header fields)
    index = w.index()                    # add(entry, stream-or-None) per index entry, in order
    ...
    w.files(index, stats)
    key, sha, manifest = w.commit(...)   # packs stored, locks applied, manifest last, read back

Nothing becomes a snapshot until ``commit`` has written the manifest: a failure before leaves
only pack objects under the attempt's own prefix, without retention, which deleting the Backup
removes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO

from nightjar.storage import layout, packs
from nightjar.storage.crypto import KeyRing
from nightjar.storage.errors import IntegrityError
from nightjar.storage.index import Entry
from nightjar.storage.manifest import FORMAT_2, Database, Files, Manifest, StoredObject, Stream
from nightjar.storage.objects import Lock, ObjectStore
from nightjar.storage.packs import (
    WHOLE_FILE,
    ChunkRef,
    ListStore,
    Ordered,
    PackObject,
    PackWriter,
    Ready,
    Slot,
    StreamStore,
    split_file,
)

READ_CHUNK = 1024 * 1024
#: Index lines are handed to the chunker in blocks of about this size.
INDEX_BUFFER = 256 * 1024


@dataclass
class FileStats:
    files: int = 0
    bytes: int = 0
    dirs: int = 0
    reused_files: int = 0
    reused_bytes: int = 0
    uploaded_bytes: int = 0


class IndexWriter:
    """The file index of a snapshot, written in path order while file contents are stored."""

    def __init__(self, writer: SnapshotWriter, stream: StreamStore) -> None:
        self.w = writer
        self.stream = stream
        self.order = Ordered()
        self.stats = FileStats()
        self._buf = bytearray()
        self._last_pack = ""

    def _write(self, line: str) -> None:
        self._buf += line.encode()
        self._buf += b"\n"
        if len(self._buf) >= INDEX_BUFFER:
            self.stream.write(bytes(self._buf))
            self._buf.clear()

    def _emit(self, ready: Iterable[tuple[object, list[ChunkRef]]]) -> None:
        for item, refs in ready:
            if isinstance(item, str):  # an unchanged entry's line, as the previous index had it
                self._write(item)
                continue
            if not isinstance(item, Entry):
                raise TypeError("the index holds entries only")
            if item.type == "f":
                item.chunks = refs
            self._write(item.to_json())

    def _put(self, item: Entry | str, slots: list[Slot]) -> None:
        if not slots and not self.order.pending:
            self._emit([(item, [])])  # nothing waits for a pack: no queueing
        else:
            self._emit(self.order.put(item, slots))

    def add_dir(self, path: str, mode: int) -> None:
        self.stats.dirs += 1
        self._put(Entry(path, "d", mode), [])

    def add_link(self, path: str, mode: int, target: str) -> None:
        self._put(Entry(path, "l", mode, target=target), [])

    def reuse(self, path: str, mode: int, prev: Entry) -> None:
        """An unchanged file: the previous snapshot's blobs, not read again (and, when nothing
        about it changed, its index line written again as it was)."""
        for c in prev.chunks or []:
            if c.pack != self._last_pack:
                self.w.use_object(c.pack)
                self._last_pack = c.pack
        self.stats.files += 1
        self.stats.bytes += prev.size
        self.stats.reused_files += 1
        self.stats.reused_bytes += prev.size
        if prev.raw and prev.mode == mode and prev.path == path:
            self._put(prev.raw, [])
        else:
            slots: list[Slot] = [Ready(c) for c in prev.chunks or []]
            self._put(Entry(path, "f", mode, prev.size, prev.mtime_ns, prev.sha256), slots)

    def add_stored(self, entry: Entry) -> None:
        """A file already stored by this snapshot (``entry.chunks`` set), e.g. by an upload that
        stored contents in archive order and writes the index in path order afterwards."""
        for c in entry.chunks or []:
            self.w.use_object(c.pack)
        self.stats.files += 1
        self.stats.bytes += entry.size
        self.stats.uploaded_bytes += entry.size
        self._emit(self.order.put(entry, [Ready(c) for c in entry.chunks or []]))

    def add_file(self, path: str, mode: int, mtime_ns: int, stream: IO[bytes], size: int) -> None:
        h = hashlib.sha256()
        n = 0
        slots: list[Slot] = []
        for blob in split_file(stream, size):
            h.update(blob)
            n += len(blob)
            slots.append(self.w.packs.add(blob))
        self.stats.files += 1
        self.stats.bytes += n
        self.stats.uploaded_bytes += n
        self._emit(self.order.put(Entry(path, "f", mode, n, mtime_ns, h.hexdigest()), slots))

    def add_whole(self, path: str, mode: int, mtime_ns: int, data: bytes, sha256: str) -> None:
        """A small file read whole (shorter than one chunk) with its sha256, e.g. by a reader
        thread: one blob."""
        if len(data) >= WHOLE_FILE:
            raise ValueError(f"{path}: {len(data)} bytes is not a small file")
        self.stats.files += 1
        self.stats.bytes += len(data)
        self.stats.uploaded_bytes += len(data)
        slot = self.w.packs.add(data)
        self._emit(self.order.put(Entry(path, "f", mode, len(data), mtime_ns, sha256), [slot]))

    def finish(self) -> Files:
        self.w.packs.flush()
        self._emit(self.order.drain())
        if self._buf:
            self.stream.write(bytes(self._buf))
            self._buf.clear()
        self.stream.finish()
        s = self.stats
        return Files(
            Stream(self.stream.size, self.stream.sha256),
            s.files,
            s.bytes,
            s.dirs,
            s.reused_files,
            s.reused_bytes,
            s.uploaded_bytes,
        )


class SnapshotWriter:
    def __init__(
        self,
        store: ObjectStore,
        loc: layout.SnapshotLocation,
        *,
        keyring: KeyRing | None = None,
        previous: Manifest | None = None,
        lock: Lock | None = None,
        level: int = 3,
        workers: int = 2,
    ) -> None:
        self.store = store
        self.loc = loc
        self.keyring = keyring
        self.lock = lock
        usable = previous if previous is not None and previous.format == FORMAT_2 else None
        if usable is not None and (usable.encrypted != (keyring is not None)):
            usable = None  # encryption switched on or off: nothing is shared across the switch
        self.previous = usable
        self.id_key: bytes | None = None
        if keyring is not None:
            self.id_key = usable.id_key if usable is not None and usable.id_key else os.urandom(32)
        self.objects: dict[str, StoredObject] = {}
        self._previous_objects = {o.key: o for o in usable.objects} if usable else {}
        self.packs = PackWriter(store, loc.pack, keyring, self._on_pack, level=level, workers=workers)
        self._dump: StreamStore | None = None
        self._index: StreamStore | None = None

    def _on_pack(self, p: PackObject) -> None:
        self.objects[p.key] = StoredObject(p.key, p.size, p.sha256, p.key_id, p.wrapped_key)

    def use_object(self, key: str) -> None:
        """Content of an earlier snapshot this one uses: listed (and locked) as this one's too."""
        if key in self.objects or key.startswith(self.loc.base):
            return
        prev = self._previous_objects.get(key)
        if prev is None:
            raise IntegrityError(f"the previous snapshot's manifest does not list {key}")
        self.objects[key] = prev

    # --- streams ---------------------------------------------------------------------------

    def _stream(self, previous: list[ChunkRef], background: bool = False, head: int = 0) -> StreamStore:
        return StreamStore(
            self.packs, self.id_key, {c.id: c for c in previous if c.id}, background=background, head=head
        )

    def dump_stream(self) -> StreamStore:
        """The database dump (written alone: content ids are computed on a thread of their own)."""
        prev = self.previous.database.dump.chunks if self.previous and self.previous.database else []
        self._dump = self._stream(prev, background=True, head=packs.DUMP_HEAD)
        return self._dump

    def database(
        self,
        stream: StreamStore,
        *,
        pg_dump_version: str,
        server_version: str,
        archive_version: str,
        dbname: str,
    ) -> Database:
        stream.finish()
        return Database(
            Stream(stream.size, stream.sha256),
            pg_dump_version,
            server_version,
            archive_version,
            dbname,
            dump_compression="uncompressed",
        )

    def index(self) -> IndexWriter:
        prev = self.previous.files.index.chunks if self.previous and self.previous.files else []
        self._index = self._stream(prev)
        return IndexWriter(self, self._index)

    # --- commit ----------------------------------------------------------------------------

    def commit(
        self,
        *,
        created: dt.datetime,
        expires: dt.datetime,
        database: Database | None,
        files: Files | None,
        backup: dict[str, str],
        source: str,
        contents: str,
        model_version: str,
        extra: dict[str, object] | None = None,
    ) -> tuple[str, str, Manifest]:
        """Store what is queued, lock it, write the manifest last and read it back."""
        from nightjar.domain.retention import format_time

        self.packs.flush()
        if database is not None and self._dump is not None:
            database.dump.chunks = self._dump.refs()
        if files is not None and self._index is not None:
            files.index.chunks = self._index.refs()
        # The chunk lists are stored as blobs too (after the chunks: they name their packs).
        prev_db = self.previous.database if self.previous else None
        prev_files = self.previous.files if self.previous else None
        lists: list[tuple[Stream, ListStore]] = []
        for part, prev in (
            (database.dump if database else None, prev_db.dump if prev_db else None),
            (files.index if files else None, prev_files.index if prev_files else None),
        ):
            if part is not None and len(part.chunks) > packs.LIST_INLINE_MAX:
                store = ListStore(self.packs, self.id_key, prev.lists if prev else [])
                lists.append((part, store.store(part.chunks)))
        self.packs.close()
        for part, stored in lists:
            part.lists = stored.refs()
            part.count = len(part.chunks)
        for part in (database.dump if database else None, files.index if files else None):
            for r in [*part.chunks, *part.lists] if part else []:
                self.use_object(r.pack)
        if self.lock is not None:
            for key in sorted(self.objects):
                self.store.extend_retention(key, self.lock)
        size = (database.dump.bytes if database else 0) + (files.bytes if files else 0)
        manifest = Manifest(
            snapshot_id=self.loc.attempt,
            created_on=format_time(created),
            expires_on=format_time(expires),
            objects=sorted(self.objects.values(), key=lambda o: o.key),
            database=database,
            files=files,
            format=FORMAT_2,
            backup=dict(backup),
            source=source,
            contents=contents,
            model_version=model_version,
            size_uncompressed=size,
            id_key=self.id_key,
            extra=dict(extra or {}),
        )
        body = manifest.to_bytes(self.keyring)
        digest = hashlib.sha256(body).hexdigest()
        self.store.put(self.loc.manifest, body, lock=self.lock, content_type="application/json")
        verify_written(self.store, self.loc.manifest, digest, manifest.objects)
        return self.loc.manifest, digest, manifest

    def abort(self) -> None:
        if self._dump is not None:
            self._dump.stop()
        self.packs.abort()

    @property
    def stored_bytes(self) -> int:
        return self.packs.stored_bytes


def verify_written(store: ObjectStore, manifest_key: str, digest: str, objects: list[StoredObject]) -> None:
    """Read the manifest back and check every object it lists exists with its size."""
    back = store.read(manifest_key)
    if hashlib.sha256(back).hexdigest() != digest:
        raise IntegrityError("verification: the manifest read back differs from what was written")
    for o in objects:
        info = store.head(o.key)
        if info is None:
            raise IntegrityError(f"verification: {o.key} is missing")
        if info.size != o.bytes:
            raise IntegrityError(f"verification: {o.key} has {info.size} bytes, expected {o.bytes}")
