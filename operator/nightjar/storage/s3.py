"""S3 access shared by the operator and the agent: client construction, streaming multipart
writes with a running sha256, Object Lock retention, and deletion of every version."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

from botocore.exceptions import ClientError

from nightjar.storage.objects import (
    LOCK_MODES,
    PART_SIZE,
    MultipartWriter,
    S3Target,
    StorageError,
    describe_error,
)

__all__ = [
    "LOCK_MODES",
    "PART_SIZE",
    "MultipartWriter",
    "S3Target",
    "StorageError",
    "delete_all_versions",
    "describe_error",
    "extend_retention",
    "iter_versions",
    "lock_args",
    "unreachable",
]


def unreachable(target: S3Target) -> str:
    """ "" when the target's bucket answers with its credentials now, else why not (no secret)."""
    try:
        target.client().head_bucket(Bucket=target.bucket)
    except Exception as e:
        return describe_error(e, f"bucket {target.bucket} at {target.endpoint}")
    return ""


def lock_args(mode: str, until: dt.datetime | None) -> dict[str, Any]:
    """PutObject/CreateMultipartUpload arguments for Object Lock retention (none for mode None)."""
    if mode not in LOCK_MODES or until is None:
        return {}
    return {"ObjectLockMode": LOCK_MODES[mode], "ObjectLockRetainUntilDate": until}


def extend_retention(s3: Any, bucket: str, key: str, mode: str, until: dt.datetime) -> None:
    """Make ``key`` stay locked at least until ``until`` (retention only ever grows)."""
    if mode not in LOCK_MODES:
        return
    try:
        current = s3.get_object_retention(Bucket=bucket, Key=key)["Retention"]
        cur_until = current.get("RetainUntilDate")
        if cur_until is not None and cur_until >= until:
            return
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("NoSuchObjectLockConfiguration", "InvalidRequest"):
            raise
    s3.put_object_retention(
        Bucket=bucket, Key=key, Retention={"Mode": LOCK_MODES[mode], "RetainUntilDate": until}
    )


def iter_versions(s3: Any, bucket: str, prefix: str) -> Iterator[tuple[str, str | None]]:
    """Every (key, versionId) under ``prefix``, delete markers included."""
    paginator = s3.get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
            yield v["Key"], v.get("VersionId")


def delete_all_versions(s3: Any, bucket: str, keys_or_prefix: str | list[str]) -> tuple[int, list[str]]:
    """Delete every version of the given keys (or of everything under a prefix).

    Returns (deleted, locked): keys Object Lock still protects are left and listed, never forced.
    """
    if isinstance(keys_or_prefix, str):
        targets = list(iter_versions(s3, bucket, keys_or_prefix))
    else:
        targets = []
        for key in keys_or_prefix:
            targets += [(k, v) for k, v in iter_versions(s3, bucket, key) if k == key]
    deleted, locked = 0, []
    for i in range(0, len(targets), 1000):
        batch = targets[i : i + 1000]
        objs = [{"Key": k, "VersionId": v} if v and v != "null" else {"Key": k} for k, v in batch]
        resp = s3.delete_objects(Bucket=bucket, Delete={"Objects": objs, "Quiet": True})
        errors = resp.get("Errors", [])
        deleted += len(batch) - len(errors)
        locked += sorted({e["Key"] for e in errors})
    return deleted, locked
