"""An in-memory ObjectStore for unit tests of the storage seam (no S3 server needed)."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from collections.abc import Iterator
from types import TracebackType
from typing import IO

from nightjar.storage.objects import Lock, ObjectInfo, ObjectMissing


class _Writer:
    def __init__(self, store: MemoryStore, key: str, metadata: dict[str, str] | None) -> None:
        self.store, self.key, self.metadata = store, key, metadata or {}
        self.buf = bytearray()
        self.size = 0
        self.hash = hashlib.sha256()

    @property
    def sha256(self) -> str:
        return self.hash.hexdigest()

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        self.buf += data
        self.hash.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.store.put(self.key, bytes(self.buf), metadata=self.metadata)

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
    bucket = "memory"
    endpoint = "memory://"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.meta: dict[str, dict[str, str]] = {}
        self.locks: dict[str, Lock] = {}
        self.gets = 0

    def check(self) -> None:
        pass

    def put(
        self,
        key: str,
        data: bytes | bytearray,
        *,
        lock: Lock | None = None,
        metadata: dict[str, str] | None = None,
        content_type: str = "",
    ) -> None:
        self.objects[key] = bytes(data)
        self.meta[key] = dict(metadata or {})
        if lock is not None:
            self.locks[key] = lock

    def writer(
        self, key: str, *, lock: Lock | None = None, metadata: dict[str, str] | None = None
    ) -> _Writer:
        return _Writer(self, key, metadata)

    def get(self, key: str, start: int = 0, end: int | None = None) -> IO[bytes]:
        return io.BytesIO(self.read(key, start, end))

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        if key not in self.objects:
            raise ObjectMissing(f"reading {key}: NoSuchKey")
        self.gets += 1
        data = self.objects[key]
        return data[start : len(data) if end is None else end]

    def head(self, key: str) -> ObjectInfo | None:
        if key not in self.objects:
            return None
        return ObjectInfo(key, len(self.objects[key]), self.meta.get(key, {}))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        for k in sorted(self.objects):
            if k.startswith(prefix):
                yield ObjectInfo(
                    k, len(self.objects[k]), last_modified=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
                )

    def list_versions(self, prefix: str) -> Iterator[tuple[str, str | None]]:
        for o in self.list(prefix):
            yield o.key, None

    def delete(self, keys_or_prefix: str | list[str]) -> tuple[int, list[str]]:
        keys = (
            [o.key for o in self.list(keys_or_prefix)] if isinstance(keys_or_prefix, str) else keys_or_prefix
        )
        n = 0
        for k in keys:
            if self.objects.pop(k, None) is not None:
                n += 1
        return n, []

    def extend_retention(self, key: str, lock: Lock) -> None:
        cur = self.locks.get(key)
        if cur is None or cur.until < lock.until:
            self.locks[key] = lock

    def lock_mode(self) -> str | None:
        return None

    def presign_get(self, key: str, expires_in: int) -> str:
        return f"memory://{key}?expires={expires_in}"

    def stored_bytes(self) -> int:
        return sum(len(v) for v in self.objects.values())
