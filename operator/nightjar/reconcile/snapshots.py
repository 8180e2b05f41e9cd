"""Where a Backup's snapshot lies in a storage, and how to delete one without touching what
another snapshot of the same source still uses. Pure but for the object store it is given."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

from nightjar.constants import ANNOTATION_SYNCED_FROM
from nightjar.storage import layout
from nightjar.storage.crypto import KeyRing
from nightjar.storage.errors import IntegrityError
from nightjar.storage.manifest import Manifest, PublicManifest
from nightjar.storage.objects import ObjectStore


def snapshot_uid(backup: dict[str, Any]) -> str:
    """The uid under which a Backup's snapshot is stored: its own, or for a synced Backup the
    uid of the Backup that took it (in the manifest key it stands for)."""
    meta = backup["metadata"]
    synced = (meta.get("annotations") or {}).get(ANNOTATION_SYNCED_FROM)
    if synced:
        where = layout.parse_key(synced, synced[: synced.find(layout.ROOT + "/")])
        if where is not None:
            return where.backup_uid
    return str(meta.get("uid") or "")


def adopted(backup: dict[str, Any]) -> bool:
    """A synced Backup the operator verified: its status names the manifest of its annotation
    (only the operator writes status). An annotation anyone could add is never trusted alone."""
    meta = backup["metadata"]
    synced = (meta.get("annotations") or {}).get(ANNOTATION_SYNCED_FROM)
    st = backup.get("status") or {}
    return (
        bool(synced)
        and st.get("phase") == "Completed"
        and (st.get("storage") or {}).get("manifestKey") == synced
    )


def snapshot_prefixes(backup: dict[str, Any], prefix: str) -> tuple[str, str] | None:
    """The Backup's own key prefix in a storage with ``prefix`` and the prefix of its source's
    snapshots (the ones that may share its content). A synced Backup's snapshot was written
    under the uid of the Backup that took it: its keys come from the manifest it stands for,
    once the operator adopted it; before that (or never) it has no keys: None."""
    meta = backup["metadata"]
    synced = (meta.get("annotations") or {}).get(ANNOTATION_SYNCED_FROM)
    if synced:
        where = layout.parse_key(layout.relocate(synced, prefix), prefix) if adopted(backup) else None
        if where is None:
            return None
        return where.backup_prefix, where.source_prefix
    sid = layout.source_id(backup["spec"]["source"])
    ns = meta["namespace"]
    return layout.backup_prefix(prefix, ns, sid, meta["uid"]), layout.source_prefix(prefix, ns, sid)


def delete_snapshot(
    store: ObjectStore, mine: str, source_root: str, replica_prefix: str | None = None
) -> tuple[int, int, list[str]]:
    """Delete everything under ``mine`` (every attempt of one Backup) and the objects its
    manifests list, except what another snapshot of the source (under ``source_root``) lists.
    In a replica (``replica_prefix``) manifests name the primary's keys: they are relocated.

    Returns (object versions deleted, objects to delete, keys Object Lock kept).
    """
    own = {k for k, _ in store.list_versions(mine)}
    referenced: set[str] = set()
    keep: set[str] = set()
    for info in store.list(source_root):
        if not layout.is_manifest(info.key):
            continue
        try:
            listed = PublicManifest.parse(store.read(info.key), info.key).objects
        except IntegrityError as e:
            if info.key.startswith(mine):
                continue  # my own: only what lies under my prefix goes
            # Another snapshot's manifest this operator cannot read (damaged, or of a newer
            # format): what it shares is unknown, so nothing is deleted.
            raise IntegrityError(f"cannot tell what {info.key} shares ({e}); nothing deleted") from e
        objs = {
            layout.relocate(o.key, replica_prefix) if replica_prefix is not None else o.key for o in listed
        }
        if info.key.startswith(mine):
            referenced |= objs
        else:
            keep |= objs
    doomed = sorted((own | referenced) - keep)
    deleted, locked = store.delete(doomed)
    return deleted, len(doomed), locked


def newest_snapshot(store: ObjectStore, mine: str, keyring: KeyRing | None) -> dict[str, Any] | None:
    """The newest snapshot written under a Backup's own prefix ``mine`` (manifest last: one with a
    manifest is complete), checked: the manifest parses with the storage's keys and every object
    it lists is there at its size. As the agent reports it; None when there is none."""
    manifests = [i for i in store.list(mine) if layout.is_manifest(i.key)]
    if not manifests:
        return None
    oldest = dt.datetime.min.replace(tzinfo=dt.UTC)
    newest = max(manifests, key=lambda i: (i.last_modified or oldest, i.key))
    raw = store.read(newest.key)
    manifest = Manifest.parse(raw, keyring, f"manifest {newest.key}")
    if manifest.database is None:
        raise IntegrityError(f"{newest.key} is not a snapshot manifest")
    for o in manifest.objects:
        head = store.head(o.key)
        if head is None or head.size != o.bytes:
            raise IntegrityError(f"{o.key}, listed by {newest.key}, is missing or short in the bucket")
    files = manifest.files
    return {
        "snapshotId": manifest.snapshot_id,
        "manifestKey": newest.key,
        "manifestSha256": hashlib.sha256(raw).hexdigest(),
        "createdOn": manifest.created_on,
        "sizeUncompressedBytes": manifest.size_uncompressed,
        "database": manifest.database.summary(),
        "files": {"count": files.count, "bytes": files.bytes} if files else None,
        "objects": len(manifest.objects),
    }
