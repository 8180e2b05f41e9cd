"""``nightjar download``: a stored snapshot as an archive in the Mendix format, streamed from
the bucket into a file or stdout.

Every byte is verified against the snapshot's manifest as it streams (``SnapshotReader``), so a
damaged snapshot ends the download with an error instead of a quietly bad archive. Nothing is
staged on disk; memory stays at a few buffers whatever the number of files.

Only regular files go into ``tree/``, as in Mendix's own archives: directories are implied by
the files' paths, and empty directories and symlinks (which a restore from storage keeps) are
left out and counted, so the command can say so. Files come in path order, or in storage order
when path order would jump between packs (see ``transfer.order``); the index is read twice
(it is small), the packs once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nightjar import archive
from nightjar.domain.retention import parse_time
from nightjar.kube import Kube
from nightjar.storage.crypto import KeyRing
from nightjar.storage.errors import IntegrityError
from nightjar.storage.objects import unreachable
from nightjar.storage.snapshot import SnapshotReader
from nightjar.transfer import CommandError, cluster
from nightjar.transfer.names import DATABASE_ONLY, FILES_ONLY, FULL
from nightjar.transfer.order import Scan, scan, storage_order
from nightjar.transfer.progress import Bar, Ticking

CHUNK = 1024 * 1024


@dataclass
class Snapshot:
    """A Completed Backup and a reader of its stored snapshot (``location``: where it is read)."""

    backup: dict[str, Any]
    reader: SnapshotReader
    location: str = ""
    note: str = ""

    @property
    def name(self) -> str:
        return str(self.backup["metadata"]["name"])

    @property
    def created(self) -> dt.datetime:
        st = self.backup.get("status") or {}
        return parse_time(
            st.get("createdOn")
            or self.reader.manifest.get("createdOn")
            or self.backup["metadata"]["creationTimestamp"]
        )

    def total(self, what: str) -> int:
        """Bytes read from storage to write ``what``."""
        db = int(self.reader.database["bytes"])
        files = int((self.reader.files or {}).get("bytes") or 0)
        return db if what == DATABASE_ONLY else files if what == FILES_ONLY else db + files


def open_snapshot(kube: Kube, namespace: str, name: str) -> Snapshot:
    """The Backup ``name`` and its snapshot, read with its BackupStorage's credentials; from a
    replica holding a verified copy when the primary storage cannot be reached."""
    backup = cluster.get_backup(kube, namespace, name)
    st = backup.get("status") or {}
    if st.get("phase") != "Completed":
        raise CommandError(
            f'Backup "{name}" is {st.get("phase") or "not started yet"}: '
            "only a Completed backup can be downloaded"
        )
    where = st.get("storage") or {}
    key = where.get("manifestKey")
    if not key:
        raise CommandError(f'Backup "{name}" records no snapshot manifest')
    storage = cluster.storage(
        kube, namespace, where.get("storageName") or backup["spec"]["storageRef"]["name"]
    )
    t = storage.target
    if where.get("bucket") and (where["bucket"], where.get("endpoint") or t.endpoint) != (
        t.bucket,
        t.endpoint,
    ):
        raise CommandError(
            f"BackupStorage {storage.name} now points at bucket {t.bucket} at {t.endpoint}, but the snapshot "
            f"of Backup {name} is in bucket {where['bucket']} at {where.get('endpoint')}"
        )
    sha = (
        where.get("manifestSha256")
        or ((backup.get("spec") or {}).get("upload") or {}).get("manifestSha256")
        or ""
    )
    store = t.store()
    why = unreachable(store)
    if why:
        return _from_replica(kube, namespace, backup, storage.name, why, sha, storage.keyring)
    try:
        reader = SnapshotReader(store, key, sha, keyring=storage.keyring)
    except IntegrityError as e:
        raise CommandError(f'cannot read the snapshot of Backup "{name}": {e}') from e
    return Snapshot(backup, reader, location=storage.name)


def _from_replica(
    kube: Kube,
    namespace: str,
    backup: dict[str, Any],
    primary: str,
    why: str,
    sha: str,
    keyring: KeyRing | None,
) -> Snapshot:
    from nightjar.storage import layout

    st = backup["status"]
    tried = []
    for loc in st.get("locations") or []:
        if loc.get("role") != "Replica":
            continue
        if loc.get("state") != "Replicated":
            tried.append(f"{loc['storage']}: {loc.get('state')}, no verified copy")
            continue
        try:
            replica = cluster.storage(kube, namespace, loc["storage"])
        except CommandError as e:
            tried.append(f"{loc['storage']}: {e}")
            continue
        rt = replica.target
        rstore = rt.store()
        rwhy = unreachable(rstore)
        if rwhy:
            tried.append(f"{loc['storage']}: {rwhy}")
            continue
        prefix = st["storage"].get("prefix") or ""
        key = layout.relocate(st["storage"]["manifestKey"], rt.prefix, prefix)
        try:
            rebase = (prefix, layout.normalize_prefix(rt.prefix))
            reader = SnapshotReader(rstore, key, sha, rebase=rebase, keyring=keyring)  # the primary's keys
        except IntegrityError as e:
            tried.append(f"{loc['storage']}: {e}")
            continue
        note = (
            f"read from replica {loc['storage']} ({loc.get('jurisdiction') or '?'}): "
            f"the primary {primary} cannot be reached ({why})"
        )
        return Snapshot(backup, reader, location=loc["storage"], note=note)
    raise CommandError(
        f"the storage {primary} of Backup {backup['metadata']['name']} cannot be reached ({why})"
        + (f" and no replica can serve it ({'; '.join(tried)})" if tried else " and it has no replica")
    )


@dataclass
class Written:
    """What a download wrote: bytes read from storage, files, and what an archive cannot hold."""

    bytes: int = 0
    files: int = 0
    empty_dirs: int = 0
    symlinks: int = 0
    notes: list[str] = field(default_factory=list)


class _Tree:
    """The snapshot's regular files as archive items: in path order when that reads the packs
    front to back, else in storage order (an upload of an unsorted archive), so each pack is
    read with one GET whatever the archive's order was."""

    def __init__(self, reader: SnapshotReader, bar: Bar, sequential: bool) -> None:
        self.reader = reader
        self.bar = bar
        self.sequential = sequential

    def __iter__(self) -> Iterator[archive.FileItem]:
        entries = self.reader.entries()
        if not self.sequential:
            entries = storage_order(entries)
        for entry, stream in self.reader.contents(entries):
            if stream is not None:
                yield archive.FileItem(
                    entry.path,
                    entry.size,
                    _opener(Ticking(stream, self.bar)),
                    entry.mode or 0o644,
                    entry.mtime_ns / 1e9,
                )


def _opener(stream: archive.Readable) -> Callable[[], archive.Readable]:
    """``FileItem.open`` for a stream that is already open (a snapshot's files come in order)."""
    return lambda: stream


def write(snapshot: Snapshot, what: str, out: archive.Writable, bar: Bar) -> Written:
    """Stream ``what`` (Full, DatabaseOnly or FilesOnly) of the snapshot into ``out``."""
    reader = snapshot.reader
    written = Written()
    if what == FILES_ONLY and not reader.files:
        raise CommandError(
            f'Backup "{snapshot.name}" has no files '
            f"(contents {reader.manifest.get('contents') or 'DatabaseOnly'}, or no files in its source)"
        )
    try:
        tree = scan(reader.entries()) if what != DATABASE_ONLY else Scan()
        written.files, written.empty_dirs, written.symlinks = tree.files, tree.empty_dirs, tree.symlinks
        if what == DATABASE_ONLY:
            src = Ticking(reader.open_dump(), bar)
            while chunk := src.read(CHUNK):
                out.write(chunk)
        else:
            db_bytes = int(reader.database["bytes"])
            meta = dump = None
            if what == FULL:
                st = snapshot.backup.get("status") or {}
                meta = archive.metadata(
                    model_version=reader.model_version or st.get("modelVersion") or "",
                    dump_size=db_bytes,
                    # The server-side database size is not recorded; the dump's is the best known.
                    database_size=db_bytes,
                    files_size=int((reader.files or {}).get("bytes") or 0),
                    duration_seconds=_duration(st),
                )
                dump = (db_bytes, Ticking(reader.open_dump(), bar))
            archive.write_archive(out, meta=meta, dump=dump, files=_Tree(reader, bar, tree.sequential))
    except IntegrityError as e:
        raise CommandError(f'the snapshot of Backup "{snapshot.name}" is damaged: {e}') from e
    written.bytes = bar.done
    left = []
    if written.empty_dirs:
        left.append(f"{written.empty_dirs} empty director{'y' if written.empty_dirs == 1 else 'ies'}")
    if written.symlinks:
        left.append(f"{written.symlinks} symlink{'' if written.symlinks == 1 else 's'}")
    if left and what != DATABASE_ONLY:
        written.notes.append(
            f"not in the archive: {' and '.join(left)} (Mendix archives hold regular files only; "
            "a restore from storage keeps them)"
        )
    return written


def _duration(status: dict[str, Any]) -> float:
    try:
        return max(0.0, (parse_time(status["completedOn"]) - parse_time(status["createdOn"])).total_seconds())
    except (KeyError, ValueError):
        return 0.0
