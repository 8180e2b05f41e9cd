"""The one in-memory ObjectStore of the tests: code above the storage seam runs on it without an
S3 server. ``locked`` keys survive deletion (Object Lock); ``down`` fails every call (an outage);
``writes`` records the order of writes; ``gets`` counts reads."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from collections.abc import Iterator
from types import TracebackType
from typing import IO

from nightjar.storage.objects import Lock, ObjectInfo, ObjectMissing, StorageError

EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class _Writer:
    def __init__(
        self, store: MemoryStore, key: str, lock: Lock | None, metadata: dict[str, str] | None
    ) -> None:
        self.store, self.key, self.lock, self.metadata = store, key, lock, metadata or {}
        self.buf = bytearray()
        self.size = 0

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.buf).hexdigest()

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        self.buf += data
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.store.put(self.key, bytes(self.buf), lock=self.lock, metadata=self.metadata)

    def abort(self) -> None:
        self.buf = bytearray()

    def __enter__(self) -> _Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class MemoryStore:
    """An ObjectStore in a dict; ``locked`` keys survive deletion; ``down`` fails everything."""

    def __init__(self, bucket: str = "memory") -> None:
        self.bucket, self.endpoint = bucket, "memory://"
        self.gets = 0
        self.objects: dict[str, bytes] = {}
        self.meta: dict[str, dict[str, str]] = {}
        self.locks: dict[str, Lock] = {}
        self.locked: set[str] = set()
        self.writes: list[str] = []
        self.object_lock: str | None = None
        self.down = ""

    def _up(self, what: str) -> None:
        if self.down:
            raise StorageError(f"{what}: {self.down}")

    def check(self) -> None:
        self._up(f"bucket {self.bucket} at {self.endpoint}")

    def put(
        self,
        key: str,
        data: bytes | bytearray,
        *,
        lock: Lock | None = None,
        metadata: dict[str, str] | None = None,
        content_type: str = "",
    ) -> None:
        self._up(f"writing {key}")
        self.objects[key], self.meta[key] = bytes(data), dict(metadata or {})
        self.writes.append(key)
        if lock is not None:
            self.locks[key] = lock

    def writer(
        self, key: str, *, lock: Lock | None = None, metadata: dict[str, str] | None = None
    ) -> _Writer:
        return _Writer(self, key, lock, metadata)

    def get(self, key: str, start: int = 0, end: int | None = None) -> IO[bytes]:
        return io.BytesIO(self.read(key, start, end))

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        self._up(f"reading {key}")
        if key not in self.objects:
            raise ObjectMissing(f"reading {key}: NoSuchKey")
        self.gets += 1
        return self.objects[key][start:end]

    def head(self, key: str) -> ObjectInfo | None:
        self._up(f"checking {key}")
        if key not in self.objects:
            return None
        return ObjectInfo(key, len(self.objects[key]), dict(self.meta[key]))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._up(f"listing {prefix}")
        for k in sorted(self.objects):
            if k.startswith(prefix):
                yield ObjectInfo(
                    k, len(self.objects[k]), last_modified=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
                )

    def list_versions(self, prefix: str) -> Iterator[tuple[str, str | None]]:
        for o in self.list(prefix):
            yield o.key, None

    def delete(self, keys_or_prefix: str | list[str]) -> tuple[int, list[str]]:
        self._up("deleting objects")
        if isinstance(keys_or_prefix, str):
            keys = [k for k in self.objects if k.startswith(keys_or_prefix)]
        else:
            keys = [k for k in keys_or_prefix if k in self.objects]
        locked = sorted(k for k in keys if k in self.locked)
        for k in keys:
            if k not in self.locked:
                del self.objects[k]
        return len(keys) - len(locked), locked

    def extend_retention(self, key: str, lock: Lock) -> None:
        self._up(f"setting Object Lock retention on {key}")
        if key not in self.locks or self.locks[key].until < lock.until:
            self.locks[key] = lock

    def lock_mode(self) -> str | None:
        self._up(f"bucket {self.bucket}: reading its Object Lock configuration")
        return self.object_lock

    def presign_get(self, key: str, expires_in: int) -> str:
        return f"memory://{key}?expires={expires_in}"

    def stored_bytes(self) -> int:
        return sum(len(v) for v in self.objects.values())
