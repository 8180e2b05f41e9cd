"""Copy one snapshot from its primary storage to a replica, streaming and verified.

Every object the snapshot's manifest lists (its own, and content it shares with earlier
snapshots) is streamed from the primary into the replica under the replica's prefix, its sha256
checked *before* the object becomes visible (a mismatch aborts the upload): a corrupt or
truncated copy never lands. An object the replica already holds with the same size and sha256 is
not copied again (content shared between snapshots crosses the wire once); its Object Lock
retention is only extended. The manifest goes last, byte for byte, so a snapshot is in a replica
exactly when its manifest is. Memory is about one multipart part per copy, whatever the sizes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from nightjar.storage.s3 import MultipartWriter, extend_retention, lock_args
from nightjar.storage.snapshot import IntegrityError

#: User metadata the replica keeps on every object it receives: how a later copy recognises it.
SHA_META = "nightjar-sha256"
CHUNK = 1024 * 1024


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


def _head(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        out: dict[str, Any] = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return out


def _already_there(head: dict[str, Any] | None, size: int, sha256: str) -> bool:
    if head is None:
        return False
    meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
    return int(head.get("ContentLength", -1)) == size and meta.get(SHA_META) == sha256


def copy_object(
    src: Any,
    src_bucket: str,
    src_key: str,
    dst: Any,
    dst_bucket: str,
    dst_key: str,
    size: int,
    sha256: str,
    lock: dict[str, Any],
) -> int:
    """Stream one object; it becomes visible only when its size and sha256 are the expected ones."""
    body = src.get_object(Bucket=src_bucket, Key=src_key)["Body"]
    extra = {"Metadata": {SHA_META: sha256}, **lock}
    with MultipartWriter(dst, dst_bucket, dst_key, extra) as w:
        while chunk := body.read(CHUNK):
            w.write(chunk)
        if w.size != size or w.sha256 != sha256:
            # Raising inside the block aborts the upload: nothing of it is visible.
            raise IntegrityError(
                f"object {src_key} in the primary is damaged: {w.size} bytes, sha256 {w.sha256[:12]}…, "
                f"expected {size} bytes, {sha256[:12]}…"
            )
    return w.size


def replicate_snapshot(
    src: Any,
    src_bucket: str,
    src_prefix: str,
    dst: Any,
    dst_bucket: str,
    dst_prefix: str,
    manifest_key: str,
    manifest_sha256: str,
    lock_mode: str,
    retain_until: dt.datetime | None,
    progress: Callable[[ReplicaReport], None] | None = None,
) -> ReplicaReport:
    """Copy the snapshot whose manifest is ``manifest_key`` in the primary into the replica."""
    manifest_body = src.get_object(Bucket=src_bucket, Key=manifest_key)["Body"].read()
    if manifest_sha256 and hashlib.sha256(manifest_body).hexdigest() != manifest_sha256:
        raise IntegrityError(f"manifest {manifest_key} in the primary does not match the Backup's sha256")
    manifest = json.loads(manifest_body)
    lock = lock_args(lock_mode, retain_until)
    report = ReplicaReport(manifest_key=rebase(manifest_key, src_prefix, dst_prefix))
    for obj in manifest.get("objects", []):
        key, size, sha = obj["key"], int(obj["bytes"]), obj["sha256"]
        dkey = rebase(key, src_prefix, dst_prefix)
        if _already_there(_head(dst, dst_bucket, dkey), size, sha):
            report.skipped_objects += 1
            if retain_until is not None:
                extend_retention(dst, dst_bucket, dkey, lock_mode, retain_until)
        else:
            report.copied_bytes += copy_object(src, src_bucket, key, dst, dst_bucket, dkey, size, sha, lock)
            report.copied_objects += 1
        if progress is not None:
            progress(report)
    digest = hashlib.sha256(manifest_body).hexdigest()
    if _already_there(_head(dst, dst_bucket, report.manifest_key), len(manifest_body), digest):
        report.skipped_objects += 1
        if retain_until is not None:
            extend_retention(dst, dst_bucket, report.manifest_key, lock_mode, retain_until)
    else:
        dst.put_object(
            Bucket=dst_bucket,
            Key=report.manifest_key,
            Body=manifest_body,
            ContentType="application/json",
            Metadata={SHA_META: digest},
            **lock,
        )
        report.copied_objects += 1
        report.copied_bytes += len(manifest_body)
    # Read back what landed: the replica holds the manifest the Backup's status names, and every
    # object it lists (one skipped as "already there" may have been deleted meanwhile, by the
    # deletion of the Backup that brought it; a retry then copies it again).
    landed = dst.get_object(Bucket=dst_bucket, Key=report.manifest_key)["Body"].read()
    if hashlib.sha256(landed).hexdigest() != digest:
        raise IntegrityError(f"manifest {report.manifest_key} in the replica does not read back intact")
    for obj in manifest.get("objects", []):
        dkey = rebase(obj["key"], src_prefix, dst_prefix)
        if not _already_there(_head(dst, dst_bucket, dkey), int(obj["bytes"]), obj["sha256"]):
            raise IntegrityError(f"object {dkey} vanished from the replica during the copy")
    return report
