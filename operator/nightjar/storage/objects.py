"""The object-store interface: the one place that talks to a bucket.

Everything Nightjar stores goes through an :class:`ObjectStore`; :class:`S3Store` implements it
on boto3 (any S3-compatible server). Other backends (Azure Blob, GCS) implement the same
protocol. Errors come out as :class:`StorageError` subclasses whose messages name the bucket and
key but never a credential, so callers never import botocore.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import hashlib
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    ParamValidationError,
)

from nightjar.storage.errors import IntegrityError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: Multipart part size: memory per open writer is about ``in_flight`` parts.
PART_SIZE = 8 * 1024 * 1024
LOCK_MODES = {"Governance": "GOVERNANCE", "Compliance": "COMPLIANCE"}
#: User metadata a copy carries so a later copy recognises it without reading it.
SHA_META = "nightjar-sha256"
_CLIENT_LOCK = threading.Lock()


class StorageError(Exception):
    """Storage is unreachable, missing or refuses us; the message names which and never a secret."""

    #: A retry may succeed (network, 5xx, throttling); False for refusals that will not change.
    retryable = True


class ObjectMissing(StorageError):
    """The key (or the bucket) is not there."""

    retryable = False


class AccessDenied(StorageError):
    """The credentials are refused."""

    retryable = False


class ObjectLocked(StorageError):
    """Object Lock protects the version; it stays until its retention ends."""

    retryable = False


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    metadata: dict[str, str] = field(default_factory=dict)
    last_modified: dt.datetime | None = None


@dataclass(frozen=True)
class Lock:
    """Object Lock retention for a write: mode Governance/Compliance, kept until ``until``."""

    mode: str
    until: dt.datetime

    @classmethod
    def of(cls, mode: str, until: dt.datetime | None) -> Lock | None:
        return cls(mode, until) if mode in LOCK_MODES and until is not None else None


class ObjectWriter(Protocol):
    """A write-only stream into one object; visible only after ``close()``; ``abort()`` leaves
    nothing. ``size``/``sha256`` describe the bytes written."""

    key: str
    size: int

    @property
    def sha256(self) -> str: ...

    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def __enter__(self) -> ObjectWriter: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class ObjectStore(Protocol):
    """What Nightjar needs of a bucket. Keys are full keys (the store's prefix is the caller's)."""

    bucket: str
    endpoint: str

    def check(self) -> None:
        """Raise StorageError unless the bucket answers with these credentials now."""

    def put(
        self,
        key: str,
        data: bytes | bytearray,
        *,
        lock: Lock | None = None,
        metadata: dict[str, str] | None = None,
        content_type: str = "",
    ) -> None: ...

    def writer(
        self, key: str, *, lock: Lock | None = None, metadata: dict[str, str] | None = None
    ) -> ObjectWriter: ...

    def get(self, key: str, start: int = 0, end: int | None = None) -> IO[bytes]:
        """A stream of the object's bytes ``[start, end)`` (to its end when ``end`` is None)."""

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes: ...

    def head(self, key: str) -> ObjectInfo | None: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def list_versions(self, prefix: str) -> Iterator[tuple[str, str | None]]: ...

    def delete(self, keys_or_prefix: str | builtins.list[str]) -> tuple[int, builtins.list[str]]:
        """Delete every version of the keys (or of everything under a prefix); returns (versions
        deleted, keys Object Lock keeps: left and listed, never forced)."""

    def extend_retention(self, key: str, lock: Lock) -> None: ...

    def lock_mode(self) -> str | None:
        """The bucket's Object Lock default mode ("" when enabled without one), None when off."""

    def presign_get(self, key: str, expires_in: int) -> str: ...


#: Per-key DeleteObjects error codes that mean Object Lock (retention or legal hold) keeps the
#: version; any other per-key error is a failure of the server, retried.
_LOCK_REFUSALS = frozenset({"AccessDenied", "ObjectLocked", "InvalidRequest"})


def describe_error(err: BaseException, what: str) -> str:
    """A one-line, secret-free explanation of a storage failure."""
    if isinstance(err, StorageError):
        return f"{what}: {err}"
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        msg = err.response.get("Error", {}).get("Message", "")
        if code in ("NoSuchBucket",) or (code == "404" and "bucket" in what):
            return f"{what}: bucket does not exist"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return f"{what}: access denied ({code}); check the credentials Secret"
        return f"{what}: {code} {msg}".strip()
    if isinstance(err, EndpointConnectionError):
        return f"{what}: cannot connect to the S3 endpoint"
    if isinstance(err, BotoCoreError):
        return f"{what}: {type(err).__name__}: {err}"
    return f"{what}: {err}"


def translate(err: BaseException, what: str) -> StorageError:
    """The StorageError for a boto3/botocore failure (anything else becomes a transient one)."""
    message = describe_error(err, what)
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound", "NoSuchVersion"):
            return ObjectMissing(message)
        # MinIO says ObjectLocked; AWS says AccessDenied with a message about Object Lock.
        text = str(err.response.get("Error", {}).get("Message", ""))
        if code == "ObjectLocked" or (
            code == "AccessDenied" and ("WORM" in text or "object lock" in text.lower())
        ):
            return ObjectLocked(message)
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return AccessDenied(message)
        if code in _RETRYABLE_CODES:  # some come with a 400: throttled or timed out, not refused
            return StorageError(message)
        if status and 400 <= status < 500 and status not in (408, 409, 429):
            return _final(StorageError(message))
    if isinstance(err, ParamValidationError):
        return _final(StorageError(message))
    return StorageError(message)


#: Error codes a retry may get past whatever their HTTP status (botocore's own retry list).
_RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
    }
)


def is_backend_error(err: BaseException) -> bool:
    """``err`` is a storage client library's own failure (botocore's), not yet a StorageError:
    a last-resort handler can report it with :func:`describe_error` without importing botocore."""
    return isinstance(err, (ClientError, BotoCoreError))


def _final(err: StorageError) -> StorageError:
    err.retryable = False
    return err


@contextlib.contextmanager
def _errors(what: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except (ClientError, BotoCoreError) as e:
        raise translate(e, what) from e


def _lock_args(lock: Lock | None) -> dict[str, Any]:
    if lock is None:
        return {}
    return {"ObjectLockMode": LOCK_MODES[lock.mode], "ObjectLockRetainUntilDate": lock.until}


class _Body:
    """A botocore streaming body as a plain binary stream whose read errors are StorageErrors."""

    def __init__(self, body: Any, what: str) -> None:
        self._body = body
        self._what = what

    def read(self, n: int = -1, /) -> bytes:
        with _errors(self._what):
            try:
                data: bytes = self._body.read(None if n is None or n < 0 else n)
            except (OSError, ValueError) as e:  # urllib3 protocol errors surface as these
                raise StorageError(f"{self._what}: {type(e).__name__}: {e}") from e
        return data

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()

    def readable(self) -> bool:
        return True

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class S3Target:
    """Where an S3 storage is and how to reach it (credentials included: never log this)."""

    endpoint: str
    bucket: str
    region: str
    access_key: str
    secret_key: str
    prefix: str = ""
    ca_bundle: str | None = None
    insecure: bool = False

    def __repr__(self) -> str:  # never the credentials
        return f"S3Target(endpoint={self.endpoint!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"

    def client(self, pool: int = 16) -> S3Client:
        verify: bool | str = False if self.insecure else (self.ca_bundle or True)
        with _CLIENT_LOCK:  # boto3's default session is not thread-safe while it makes a client
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
                    max_pool_connections=pool,
                    # Nightjar checks every object's sha256 itself; botocore's extra CRC32 of every
                    # upload only costs CPU (S3 still gets Content-MD5 where it requires one).
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )

    def store(self) -> S3Store:
        return S3Store(self)


class S3Store:
    """:class:`ObjectStore` on boto3. Thread-safe (boto3 clients are)."""

    def __init__(self, target: S3Target, client: Any = None) -> None:
        self.target = target
        self.bucket = target.bucket
        self.endpoint = target.endpoint
        self._client: Any = client

    @property
    def s3(self) -> Any:
        """The boto3 client, made at first use: making a store never fails, a configuration
        boto3 refuses (a malformed endpoint) is the first call's StorageError."""
        if self._client is None:
            try:
                self._client = self.target.client()
            except (ValueError, BotoCoreError) as e:
                raise _final(StorageError(f"bucket {self.bucket} at {self.endpoint}: {e}")) from e
        return self._client

    def check(self) -> None:
        with _errors(f"bucket {self.bucket} at {self.endpoint}"):
            self.s3.head_bucket(Bucket=self.bucket)

    def put(
        self,
        key: str,
        data: bytes | bytearray,
        *,
        lock: Lock | None = None,
        metadata: dict[str, str] | None = None,
        content_type: str = "",
    ) -> None:
        extra: dict[str, Any] = _lock_args(lock)
        if metadata:
            extra["Metadata"] = metadata
        if content_type:
            extra["ContentType"] = content_type
        with _errors(f"writing {key}"):
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, **extra)

    def writer(
        self,
        key: str,
        *,
        lock: Lock | None = None,
        metadata: dict[str, str] | None = None,
        in_flight: int = 3,
    ) -> MultipartWriter:
        extra: dict[str, Any] = _lock_args(lock)
        if metadata:
            extra["Metadata"] = metadata
        return MultipartWriter(self.s3, self.bucket, key, extra, in_flight=in_flight)

    def get(self, key: str, start: int = 0, end: int | None = None) -> IO[bytes]:
        kw: dict[str, Any] = {}
        if start or end is not None:
            kw["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        with _errors(f"reading {key}"):
            body = self.s3.get_object(Bucket=self.bucket, Key=key, **kw)["Body"]
        return _Body(body, f"reading {key}")  # type: ignore[return-value]

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        if end is not None and end <= start:
            return b""
        with self.get(key, start, end) as body:
            return body.read()

    def head(self, key: str) -> ObjectInfo | None:
        try:
            with _errors(f"checking {key}"):
                h = self.s3.head_object(Bucket=self.bucket, Key=key)
        except ObjectMissing:
            return None
        meta = {k.lower(): v for k, v in (h.get("Metadata") or {}).items()}
        return ObjectInfo(key, int(h["ContentLength"]), meta, h.get("LastModified"))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        with _errors(f"listing {prefix}"):
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for o in page.get("Contents", []):
                    yield ObjectInfo(o["Key"], int(o["Size"]), last_modified=o.get("LastModified"))

    def list_versions(self, prefix: str) -> Iterator[tuple[str, str | None]]:
        with _errors(f"listing versions under {prefix}"):
            paginator = self.s3.get_paginator("list_object_versions")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
                    yield v["Key"], v.get("VersionId")

    def delete(self, keys_or_prefix: str | builtins.list[str]) -> tuple[int, builtins.list[str]]:
        if isinstance(keys_or_prefix, str):
            targets = list(self.list_versions(keys_or_prefix))
        else:
            targets = []
            for key in keys_or_prefix:
                targets += [(k, v) for k, v in self.list_versions(key) if k == key]
        deleted, locked = 0, builtins.list[str]()
        with _errors("deleting objects"):
            for i in range(0, len(targets), 1000):
                batch = targets[i : i + 1000]
                objs = [{"Key": k, "VersionId": v} if v and v != "null" else {"Key": k} for k, v in batch]
                resp = self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": objs, "Quiet": True})
                errors = resp.get("Errors", [])
                deleted += len(batch) - len(errors)
                kept = [e for e in errors if e.get("Code") in _LOCK_REFUSALS]
                locked += sorted({e["Key"] for e in kept})
                failed = [e for e in errors if e.get("Code") not in _LOCK_REFUSALS]
                if failed:  # the server failed, the objects are not protected: try again later
                    e = failed[0]
                    raise StorageError(
                        f"deleting objects: {len(failed)} not deleted ({e.get('Code')} "
                        f"{e.get('Message') or ''} on {e['Key']})".replace("  ", " ")
                    )
        return deleted, locked

    def delete_current(self, keys: builtins.list[str]) -> int:
        """Delete the current versions of up to 1000 keys (a plain delete: on a versioned bucket
        earlier versions stay). Returns how many were deleted."""
        if not keys:
            return 0
        with _errors("deleting objects"):
            resp = self.s3.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
            )
        return len(keys) - len(resp.get("Errors", []))

    def extend_retention(self, key: str, lock: Lock) -> None:
        """Make ``key`` stay locked at least until ``lock.until`` (retention only ever grows)."""
        if lock.mode not in LOCK_MODES:
            return
        with _errors(f"setting Object Lock retention on {key}"):
            try:
                current = self.s3.get_object_retention(Bucket=self.bucket, Key=key)["Retention"]
                cur_until = current.get("RetainUntilDate")
                if cur_until is not None and cur_until >= lock.until:
                    return
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in (
                    "NoSuchObjectLockConfiguration",
                    "InvalidRequest",
                ):
                    raise
            self.s3.put_object_retention(
                Bucket=self.bucket,
                Key=key,
                Retention={"Mode": LOCK_MODES[lock.mode], "RetainUntilDate": lock.until},
            )

    def lock_mode(self) -> str | None:
        with _errors(f"bucket {self.bucket}: reading its Object Lock configuration"):
            try:
                cfg = self.s3.get_object_lock_configuration(Bucket=self.bucket)["ObjectLockConfiguration"]
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in (
                    "ObjectLockConfigurationNotFoundError",
                    "NoSuchObjectLockConfiguration",
                ):
                    return None
                raise
        if cfg.get("ObjectLockEnabled") != "Enabled":
            return None
        return str(((cfg.get("Rule") or {}).get("DefaultRetention") or {}).get("Mode") or "")

    def presign_get(self, key: str, expires_in: int) -> str:
        """A URL that GETs ``key`` (and nothing else) without credentials for ``expires_in`` s."""
        with _errors(f"signing a URL for {key}"):
            url: str = self.s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_in
            )
        return url

    def create_bucket(self, object_lock: bool = False, versioned: bool = True) -> None:
        """For the local stack and tests (Nightjar never creates a user's bucket): make the bucket,
        versioned unless ``versioned`` is False, with Object Lock when ``object_lock`` (which
        implies versioning)."""
        with _errors(f"creating bucket {self.bucket}"):
            if object_lock:
                self.s3.create_bucket(Bucket=self.bucket, ObjectLockEnabledForBucket=True)
            else:
                self.s3.create_bucket(Bucket=self.bucket)
            if versioned and not object_lock:
                self.s3.put_bucket_versioning(
                    Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"}
                )


def unreachable(store: ObjectStore) -> str:
    """ "" when the store's bucket answers now, else why not (no secret)."""
    try:
        store.check()
    except StorageError as e:
        return str(e)
    except Exception as e:
        return describe_error(e, f"bucket {store.bucket} at {store.endpoint}")
    return ""


class MultipartWriter:
    """A write-only stream into one S3 object, uploaded in parts as it is written, up to
    ``in_flight`` parts at once while the writer goes on (so a producer such as pg_dump is not
    stalled behind each part's round trip).

    Memory is about ``in_flight + 1`` parts whatever the object's size; a small object is one
    PutObject. Leaving the ``with`` block by an exception aborts the upload, so no partial object
    is ever visible.
    """

    def __init__(
        self,
        s3: Any,
        bucket: str,
        key: str,
        extra: dict[str, Any] | None = None,
        part_size: int = PART_SIZE,
        in_flight: int = 1,
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
        self.parts: list[Future[dict[str, Any]]] = []
        self.closed = False
        self._slots = threading.BoundedSemaphore(max(1, in_flight))
        self._pool = ThreadPoolExecutor(max_workers=max(1, in_flight), thread_name_prefix="part")

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

    def _upload(self, n: int, data: bytes) -> dict[str, Any]:
        try:
            with _errors(f"writing {self.key} (part {n})"):
                resp = self.s3.upload_part(
                    Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=n, Body=data
                )
            return {"PartNumber": n, "ETag": resp["ETag"]}
        finally:
            self._slots.release()

    def _flush_part(self, data: bytes) -> None:
        if self.upload_id is None:
            with _errors(f"writing {self.key}"):
                resp = self.s3.create_multipart_upload(Bucket=self.bucket, Key=self.key, **self.extra)
            self.upload_id = resp["UploadId"]
        for done in [f for f in self.parts if f.done()]:
            done.result()  # a failed part fails the writer now, not at close
        self._slots.acquire()
        self.parts.append(self._pool.submit(self._upload, len(self.parts) + 1, data))

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.upload_id is None:
                with _errors(f"writing {self.key}"):
                    self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self.buf), **self.extra)
            else:
                if self.buf:
                    self._flush_part(bytes(self.buf))
                parts = [f.result() for f in self.parts]
                with _errors(f"writing {self.key}"):
                    self.s3.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=self.key,
                        UploadId=self.upload_id,
                        MultipartUpload={"Parts": parts},
                    )
        except BaseException:
            self.abort()
            raise
        self.closed = True
        self.buf = bytearray()
        self._pool.shutdown(wait=False)

    def abort(self) -> None:
        self.closed = True
        self.buf = bytearray()
        for f in self.parts:
            f.cancel()
        self._pool.shutdown(wait=True)
        if self.upload_id is not None:
            with contextlib.suppress(ClientError, BotoCoreError):
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


def copy_object(
    src: ObjectStore,
    src_key: str,
    dst: ObjectStore,
    dst_key: str,
    size: int,
    sha256: str,
    lock: Lock | None,
    chunk: int = 1024 * 1024,
) -> int:
    """Stream one object between stores, recording its sha256 in its metadata (``SHA_META``); it
    becomes visible only with the expected size and sha256 (else the write is aborted and
    IntegrityError raised)."""
    with src.get(src_key) as body, dst.writer(dst_key, lock=lock, metadata={SHA_META: sha256}) as w:
        while data := body.read(chunk):
            w.write(data)
        if w.size != size or w.sha256 != sha256:
            # Raising inside the block aborts the write: nothing of it is visible.
            raise IntegrityError(
                f"object {src_key} in the primary is damaged: {w.size} bytes, sha256 {w.sha256[:12]}…, "
                f"expected {size} bytes, {sha256[:12]}…"
            )
    return w.size


def already_there(info: ObjectInfo | None, size: int, sha256: str) -> bool:
    """The object is there with this size and the sha256 a copy recorded (``SHA_META``)."""
    return info is not None and info.size == size and info.metadata.get(SHA_META) == sha256


def keys_of(objects: Iterable[ObjectInfo]) -> list[str]:
    return [o.key for o in objects]
