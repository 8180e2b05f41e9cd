"""Read a stored snapshot back, verifying every byte against its manifest while streaming.

Used by the restore agent and by ``nightjar download``. Nothing is copied to disk and memory
does not grow with the number of files:

* the manifest is read once (and checked against the digest the Backup's status recorded);
* the database dump streams with a running sha256 compared at its end with the manifest's;
* the file index streams with its own sha256 checked at its end;
* file contents stream out of the pack objects in index order. A fresh snapshot's packs hold
  the files in exactly that order, so a pack is read with one sequential GET; a file reused
  from an older snapshot costs one ranged GET where the order jumps. Each file's bytes are
  checked against the sha256 the index lists for it.

Any mismatch, short read or missing object raises :class:`IntegrityError` naming the object: a
caller never mistakes a damaged snapshot for a good one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

from botocore.exceptions import ClientError

from nightjar.storage.index import Entry, read_index
from nightjar.storage.s3 import describe_error

#: Skip forward inside an open pack stream (rather than issuing a new ranged GET) up to this gap.
SKIP_LIMIT = 4 * 1024 * 1024
CHUNK = 1024 * 1024


class IntegrityError(Exception):
    """The stored snapshot is missing, damaged or not what its manifest says."""


class _Verified:
    """A read stream of ``size`` bytes whose sha256 is checked when the last byte is read."""

    def __init__(self, body: Any, size: int, sha256: str, what: str) -> None:
        self.body = body
        self.remaining = size
        self.size = size
        self.expected = sha256
        self.what = what
        self.h = hashlib.sha256()
        self.done = False

    def read(self, n: int = -1, /) -> bytes:
        if self.remaining <= 0:
            self._finish()
            return b""
        want = self.remaining if n is None or n < 0 else min(n, self.remaining)
        data: bytes = self.body.read(want)
        if not data:
            raise IntegrityError(
                f"{self.what} is truncated: {self.size - self.remaining} of {self.size} bytes"
            )
        self.remaining -= len(data)
        self.h.update(data)
        if self.remaining <= 0:
            self._finish()
        return data

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.expected and self.h.hexdigest() != self.expected:
            raise IntegrityError(f"{self.what} does not match its sha256 in the manifest")

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


class SnapshotReader:
    """One snapshot in a bucket, addressed by its manifest key."""

    def __init__(
        self,
        s3: Any,
        bucket: str,
        manifest_key: str,
        manifest_sha256: str = "",
        rebase: tuple[str, str] | None = None,
    ) -> None:
        """``rebase`` = (primary prefix, this storage's prefix) when reading a replica: the
        manifest names objects by their keys in the primary."""
        self.s3 = s3
        self.bucket = bucket
        self.manifest_key = manifest_key
        self.rebase = rebase
        raw = self._get(manifest_key)["Body"].read()
        if manifest_sha256 and hashlib.sha256(raw).hexdigest() != manifest_sha256:
            raise IntegrityError(f"manifest {manifest_key} does not match the digest the Backup recorded")
        try:
            self.manifest: dict[str, Any] = json.loads(raw)
        except ValueError as e:
            raise IntegrityError(f"manifest {manifest_key} is not JSON: {e}") from e
        self.objects = {o["key"]: o for o in self.manifest.get("objects", [])}

    def key(self, key: str) -> str:
        """Where an object the manifest names is in this bucket."""
        if self.rebase is None:
            return key
        old, new = self.rebase
        if old and not key.startswith(old):
            raise IntegrityError(f"object {key} is not under the primary's prefix {old!r}")
        return new + key[len(old) :]

    def _get(self, key: str, **kw: Any) -> dict[str, Any]:
        try:
            out: dict[str, Any] = self.s3.get_object(Bucket=self.bucket, Key=key, **kw)
            return out
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                raise IntegrityError(f"{key} is missing from the bucket") from e
            raise IntegrityError(describe_error(e, f"reading {key}")) from e

    # --- the parts --------------------------------------------------------------------------

    @property
    def database(self) -> dict[str, Any]:
        db: dict[str, Any] = self.manifest["database"]
        return db

    @property
    def files(self) -> dict[str, Any] | None:
        f: dict[str, Any] | None = self.manifest.get("files")
        return f

    @property
    def model_version(self) -> str:
        return str(self.manifest.get("modelVersion") or "")

    def open_dump(self) -> _Verified:
        """The custom-format dump as a stream; its sha256 is checked at its last byte."""
        db = self.database
        body = self._get(self.key(db["key"]))["Body"]
        return _Verified(body, int(db["bytes"]), db.get("sha256", ""), f"database dump {db['key']}")

    def entries(self) -> Iterator[Entry]:
        """Every index entry (directories, files, symlinks) in path order; the index is checked."""
        files = self.files
        if not files:
            return
        idx = files["index"]
        stream = _Verified(
            self._get(self.key(idx["key"]))["Body"], int(idx["bytes"]), idx["sha256"], idx["key"]
        )
        yield from read_index(stream)  # type: ignore[arg-type]
        stream.drain()

    def contents(self, entries: Iterator[Entry]) -> Iterator[tuple[Entry, _Verified | None]]:
        """Pair each entry with a verified stream of its bytes (None for directories/symlinks).

        The caller reads the stream (or not); whatever is left is read and checked before the
        next entry, so a damaged file is always reported.
        """
        cursor = _PackCursor(self)
        try:
            for e in entries:
                if e.type != "f":
                    yield e, None
                    continue
                stream = cursor.open(e)
                yield e, stream
                stream.drain()
        finally:
            cursor.close()


class _PackCursor:
    """Sequential reads of pack objects, reopening with a ranged GET only where order jumps."""

    def __init__(self, reader: SnapshotReader) -> None:
        self.reader = reader
        self.key = ""
        self.body: Any = None
        self.pos = 0
        self.requests = 0

    def open(self, e: Entry) -> _Verified:
        if e.size == 0:
            return _Verified(_Empty(), 0, e.sha256, f"file {e.path}")
        if not (self.body is not None and self.key == e.pack and 0 <= e.offset - self.pos <= SKIP_LIMIT):
            self.close()
            if e.pack not in self.reader.objects:
                raise IntegrityError(f"file {e.path}: its pack {e.pack} is not in the manifest")
            self.body = self.reader._get(self.reader.key(e.pack), Range=f"bytes={e.offset}-")["Body"]
            self.key, self.pos = e.pack, e.offset
            self.requests += 1
        while self.pos < e.offset:
            skipped = self.body.read(min(CHUNK, e.offset - self.pos))
            if not skipped:
                raise IntegrityError(f"pack {e.pack} is truncated")
            self.pos += len(skipped)
        self.pos += e.size
        return _Verified(self.body, e.size, e.sha256, f"file {e.path}")

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
        self.body = None
        self.key = ""


class _Empty:
    def read(self, n: int = -1, /) -> bytes:
        return b""


class PresignedReader:
    """The ``get_object`` of an S3 client, for one snapshot, through presigned GET URLs.

    A restore into another namespace gets a Secret holding these URLs instead of the storage's
    credentials: it can read that one snapshot until the URLs expire, and nothing else.
    """

    def __init__(self, urls: dict[str, str], ca_file: str | None = None, insecure: bool = False) -> None:
        import urllib3

        self.urls = urls
        kw: dict[str, Any] = {"retries": urllib3.Retry(total=5, backoff_factor=0.5), "timeout": 120.0}
        if insecure:
            kw["cert_reqs"] = "CERT_NONE"
        elif ca_file:
            kw["ca_certs"] = ca_file
        self.http = urllib3.PoolManager(**kw)

    def get_object(self, Bucket: str, Key: str, Range: str = "") -> dict[str, Any]:
        url = self.urls.get(Key)
        if url is None:
            raise ClientError(
                {"Error": {"Code": "AccessDenied", "Message": f"no presigned URL for {Key}"}}, "GetObject"
            )
        headers = {"Range": Range} if Range else {}
        resp = self.http.request("GET", url, headers=headers, preload_content=False)
        if resp.status >= 300:
            body = resp.read(2048).decode(errors="replace")
            resp.release_conn()
            code = "NoSuchKey" if resp.status == 404 else f"HTTP{resp.status}"
            if "<Code>" in body:
                code = body.split("<Code>", 1)[1].split("</Code>", 1)[0]
            raise ClientError({"Error": {"Code": code, "Message": f"GET {Key}"}}, "GetObject")
        return {"Body": resp}


def presign_snapshot(
    s3: Any, bucket: str, manifest_key: str, keys: list[str], expires_in: int
) -> dict[str, str]:
    """Presigned GET URLs for a snapshot's manifest and objects."""
    return {
        k: s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": k}, ExpiresIn=expires_in)
        for k in [manifest_key, *keys]
    }
