"""S3 access shared by the operator and the agent: client construction, streaming multipart
writes with a running sha256, Object Lock retention, and deletion of every version."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

#: Multipart part size: memory per open writer is about one part.
PART_SIZE = 8 * 1024 * 1024
LOCK_MODES = {"Governance": "GOVERNANCE", "Compliance": "COMPLIANCE"}


class StorageError(Exception):
    """Storage is unreachable, missing or refuses us; the message names which and never a secret."""


@dataclass(frozen=True)
class S3Target:
    endpoint: str
    bucket: str
    region: str
    access_key: str
    secret_key: str
    prefix: str = ""
    ca_bundle: str | None = None
    insecure: bool = False

    def client(self) -> Any:
        verify: bool | str = False if self.insecure else (self.ca_bundle or True)
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            verify=verify,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=10,
                read_timeout=120,
                max_pool_connections=16,
            ),
        )


def describe_error(err: Exception, what: str) -> str:
    """A one-line, secret-free explanation of an S3 failure."""
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        msg = err.response.get("Error", {}).get("Message", "")
        if code in ("NoSuchBucket", "404") and "bucket" in what:
            return f"{what}: bucket does not exist"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return f"{what}: access denied ({code}); check the credentials Secret"
        return f"{what}: {code} {msg}".strip()
    if isinstance(err, EndpointConnectionError):
        return f"{what}: cannot connect to the S3 endpoint"
    if isinstance(err, BotoCoreError):
        return f"{what}: {type(err).__name__}: {err}"
    return f"{what}: {err}"


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


class MultipartWriter:
    """A write-only stream into one S3 object, uploaded in parts as it is written.

    Memory stays at about one part whatever the object's size; a small object is sent with one
    PutObject. ``sha256`` and ``size`` describe what was written. Leaving the ``with`` block by
    an exception aborts the upload, so no partial object is ever visible.
    """

    def __init__(
        self, s3: Any, bucket: str, key: str, extra: dict[str, Any] | None = None, part_size: int = PART_SIZE
    ) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.key = key
        self.extra = dict(extra or {})
        self.part_size = part_size
        self.buf = bytearray()
        self.hash = hashlib.sha256()
        self.size = 0
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self.closed = False

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.closed:
            raise ValueError("write to a closed MultipartWriter")
        self.hash.update(data)
        self.size += len(data)
        self.buf += data
        while len(self.buf) >= self.part_size:
            self._flush_part(bytes(self.buf[: self.part_size]))
            del self.buf[: self.part_size]
        return len(data)

    def flush(self) -> None:
        """Parts are uploaded as they fill; nothing to do (file-like API)."""

    def _flush_part(self, data: bytes) -> None:
        if self.upload_id is None:
            resp = self.s3.create_multipart_upload(Bucket=self.bucket, Key=self.key, **self.extra)
            self.upload_id = resp["UploadId"]
        n = len(self.parts) + 1
        resp = self.s3.upload_part(
            Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=n, Body=data
        )
        self.parts.append({"PartNumber": n, "ETag": resp["ETag"]})

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.upload_id is None:
            self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self.buf), **self.extra)
        else:
            if self.buf:
                self._flush_part(bytes(self.buf))
            self.s3.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts},
            )
        self.buf = bytearray()

    def abort(self) -> None:
        self.closed = True
        self.buf = bytearray()
        if self.upload_id is not None:
            with contextlib.suppress(ClientError):
                self.s3.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)

    @property
    def sha256(self) -> str:
        return self.hash.hexdigest()

    def __enter__(self) -> MultipartWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


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
