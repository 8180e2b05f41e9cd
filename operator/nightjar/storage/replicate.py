"""Copy one snapshot from its primary storage to a replica, streaming and verified.

Every object the snapshot's manifest lists (its own, and content it shares with earlier
snapshots) is streamed from the primary into the replica under the replica's prefix, its sha256
checked *before* the object becomes visible (a mismatch aborts the upload): a corrupt or
truncated copy never lands. An object the replica already holds with the same size and sha256 is
not copied again (content shared between snapshots crosses the wire once); its Object Lock
retention is only extended. The manifest goes last, byte for byte, so a snapshot is in a replica
exactly when its manifest is. Memory is a few multipart parts per copy (the writer's parts in
flight), whatever the sizes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nightjar.storage.errors import IntegrityError
from nightjar.storage.manifest import PublicManifest
from nightjar.storage.objects import SHA_META, Lock, ObjectStore, already_there, copy_object

__all__ = ["SHA_META", "ReplicaReport", "rebase", "replicate_snapshot"]


def rebase(key: str, from_prefix: str, to_prefix: str) -> str:
    """A key under the primary's prefix → the same key under the replica's prefix."""
    if from_prefix and not key.startswith(from_prefix):
        raise IntegrityError(f"object {key} is not under the storage prefix {from_prefix!r}")
    return to_prefix + key[len(from_prefix) :]


@dataclass
class ReplicaReport:
    manifest_key: str = ""
    copied_objects: int = 0
    skipped_objects: int = 0
    copied_bytes: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "manifestKey": self.manifest_key,
            "copiedObjects": self.copied_objects,
            "skippedObjects": self.skipped_objects,
            "copiedBytes": self.copied_bytes,
        }


def replicate_snapshot(
    src: ObjectStore,
    src_prefix: str,
    dst: ObjectStore,
    dst_prefix: str,
    manifest_key: str,
    manifest_sha256: str,
    lock: Lock | None,
    progress: Callable[[ReplicaReport], None] | None = None,
) -> ReplicaReport:
    """Copy the snapshot whose manifest is ``manifest_key`` in the primary into the replica,
    every object written with ``lock`` (Object Lock retention; None: none).

    Storage failures raise StorageError (from either store); a damaged or vanished object
    raises IntegrityError.
    """
    manifest_body = src.read(manifest_key)
    if manifest_sha256 and hashlib.sha256(manifest_body).hexdigest() != manifest_sha256:
        raise IntegrityError(f"manifest {manifest_key} in the primary does not match the Backup's sha256")
    manifest = PublicManifest.parse(manifest_body, f"manifest {manifest_key} in the primary")
    report = ReplicaReport(manifest_key=rebase(manifest_key, src_prefix, dst_prefix))
    for obj in manifest.objects:
        key, size, sha = obj.key, obj.bytes, obj.sha256
        dkey = rebase(key, src_prefix, dst_prefix)
        if already_there(dst.head(dkey), size, sha):
            report.skipped_objects += 1
            if lock is not None:
                dst.extend_retention(dkey, lock)
        else:
            report.copied_bytes += copy_object(src, key, dst, dkey, size, sha, lock)
            report.copied_objects += 1
        if progress is not None:
            progress(report)
    digest = hashlib.sha256(manifest_body).hexdigest()
    if already_there(dst.head(report.manifest_key), len(manifest_body), digest):
        report.skipped_objects += 1
        if lock is not None:
            dst.extend_retention(report.manifest_key, lock)
    else:
        dst.put(
            report.manifest_key,
            manifest_body,
            lock=lock,
            metadata={SHA_META: digest},
            content_type="application/json",
        )
        report.copied_objects += 1
        report.copied_bytes += len(manifest_body)
    # Read back what landed: the replica holds the manifest the Backup's status names, and every
    # object it lists (one skipped as "already there" may have been deleted meanwhile, by the
    # deletion of the Backup that brought it; a retry then copies it again).
    landed = dst.read(report.manifest_key)
    if hashlib.sha256(landed).hexdigest() != digest:
        raise IntegrityError(f"manifest {report.manifest_key} in the replica does not read back intact")
    for obj in manifest.objects:
        dkey = rebase(obj.key, src_prefix, dst_prefix)
        if not already_there(dst.head(dkey), obj.bytes, obj.sha256):
            raise IntegrityError(f"object {dkey} vanished from the replica during the copy")
    return report
