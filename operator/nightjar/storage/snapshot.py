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

import contextlib
import hashlib
import itertools
import re
from collections.abc import Iterator
from typing import Any

from botocore.exceptions import ClientError

from nightjar.storage.crypto import KeyProblem, KeyRing, Sealer
from nightjar.storage.errors import IntegrityError
from nightjar.storage.index import Entry, read_index, read_lines
from nightjar.storage.manifest import Manifest, Stream
from nightjar.storage.objects import ObjectMissing, StorageError, translate
from nightjar.storage.packs import BlobReader, ChunkRef, KeyOpener, decode_list

#: In ``data_keys``: the manifest's own data key.
MANIFEST_DATA_KEY = "manifest"

__all__ = [
    "MANIFEST_DATA_KEY",
    "IntegrityError",
    "PresignedReader",
    "SnapshotReader",
    "hand_over_data_keys",
    "load_data_keys",
    "presign_snapshot",
]

#: Skip forward inside an open pack stream (rather than issuing a new ranged GET) up to this gap.
SKIP_LIMIT = 4 * 1024 * 1024
CHUNK = 1024 * 1024


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
        try:
            data: bytes = self.body.read(want)
        except IntegrityError as e:
            raise IntegrityError(f"{self.what}: {e}") from e
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


class _ClientStore:
    """The reading half of an ObjectStore over anything with boto3's ``get_object`` (a boto3
    client, or :class:`PresignedReader` for a restore into another namespace)."""

    def __init__(self, s3: Any, bucket: str) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.endpoint = ""

    def get(self, key: str, start: int = 0, end: int | None = None) -> Any:
        kw: dict[str, Any] = {}
        if start or end is not None:
            kw["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=key, **kw)["Body"]
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                raise ObjectMissing(f"{key} is missing from the bucket") from e
            raise translate(e, f"reading {key}") from e  # retryable or not, as the seam says

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        if end is not None and end <= start:
            return b""
        body = self.get(key, start, end)
        try:
            data: bytes = body.read()
        finally:
            body.close()
        return data


class SnapshotReader:
    """One snapshot in a bucket, addressed by its manifest key; reads formats 1 and 2.

    ``store`` is an ObjectStore, or (older call style) anything with boto3's ``get_object``
    followed by the bucket name. ``keyring`` opens an encrypted snapshot; ``data_keys`` (pack
    key → data key, plus the manifest's under its own key) do the same without the storage's
    key-encryption keys, for a restore into another namespace.
    """

    def __init__(
        self,
        store: Any,
        bucket_or_key: str,
        manifest_key: str = "",
        manifest_sha256: str = "",
        rebase: tuple[str, str] | None = None,
        *,
        keyring: KeyRing | None = None,
        data_keys: dict[str, bytes] | None = None,
    ) -> None:
        """``rebase`` = (primary prefix, this storage's prefix) when reading a replica: the
        manifest names objects by their keys in the primary."""
        if hasattr(store, "get_object"):
            self.store: Any = _ClientStore(store, bucket_or_key)
        else:
            self.store = store
            manifest_key, manifest_sha256 = bucket_or_key, manifest_key
            if manifest_sha256 and not isinstance(manifest_sha256, str):
                raise TypeError("manifest_sha256 must be a string")
        self.manifest_key = manifest_key
        self.rebase = rebase
        try:
            raw = self.store.read(manifest_key)
        except ObjectMissing as e:
            raise IntegrityError(f"{manifest_key} is missing from the bucket") from e
        except StorageError as e:
            raise IntegrityError(str(e)) from e
        if manifest_sha256 and hashlib.sha256(raw).hexdigest() != manifest_sha256:
            raise IntegrityError(f"manifest {manifest_key} does not match the digest the Backup recorded")
        data_keys = data_keys or {}
        try:
            self.m = Manifest.parse(
                raw, keyring, f"manifest {manifest_key}", data_key=data_keys.get(MANIFEST_DATA_KEY)
            )
        except KeyProblem as e:
            raise IntegrityError(str(e)) from e
        self.manifest: dict[str, Any] = {
            "formatVersion": self.m.format,
            "snapshotId": self.m.snapshot_id,
            "createdOn": self.m.created_on,
            "expiresOn": self.m.expires_on,
            "contents": self.m.contents,
            "modelVersion": self.m.model_version,
        }
        self.objects = {o.key: o.to_json() for o in self.m.objects}
        self.format = self.m.format
        wrapped = {o.key: (o.key_id, o.wrapped_key) for o in self.m.objects if o.wrapped_key}
        self.blobs = BlobReader(
            self.store,
            _CheckedOpener(KeyOpener(wrapped, keyring, data_keys), self.objects),
            self.key,
            id_key=self.m.id_key,
        )
        for what, stream in self.m.streams():
            if not stream.resolved:
                stream.chunks = self._chunk_list(what, stream)

    def _chunk_list(self, what: str, stream: Stream) -> list[ChunkRef]:
        """A stream's chunk list, read from its list groups (checked like every blob)."""
        out: list[ChunkRef] = []
        try:
            for data in self.blobs.read(stream.lists):
                out += decode_list(data, f"a chunk list group of the {what}")
        except IntegrityError as e:
            raise IntegrityError(f"the chunk list of the {what}: {e}") from e
        if len(out) != stream.count:
            raise IntegrityError(
                f"the chunk list of the {what} has {len(out)} chunks, the manifest says {stream.count}"
            )
        return out

    def key(self, key: str) -> str:
        """Where an object the manifest names is in this bucket."""
        if self.rebase is None:
            return key
        old, new = self.rebase
        if old and not key.startswith(old):
            raise IntegrityError(f"object {key} is not under the primary's prefix {old!r}")
        return new + key[len(old) :]

    def _get(self, key: str, **kw: Any) -> dict[str, Any]:
        rng = kw.get("Range", "")
        start = int(rng.split("=", 1)[1].split("-", 1)[0]) if rng else 0
        try:
            return {"Body": self.store.get(key, start)}
        except ObjectMissing as e:
            raise IntegrityError(f"{key} is missing from the bucket") from e
        except StorageError as e:
            raise IntegrityError(str(e)) from e

    # --- the parts --------------------------------------------------------------------------

    @property
    def database(self) -> dict[str, Any]:
        db = self.m.database
        if db is None:
            raise IntegrityError(f"manifest {self.manifest_key} has no database")
        return db.to_json(self.m.format)

    @property
    def files(self) -> dict[str, Any] | None:
        return self.m.files.to_json() if self.m.files else None

    @property
    def model_version(self) -> str:
        return self.m.model_version

    def open_dump(self) -> Any:
        """The custom-format dump as a stream; its sha256 is checked at its last byte."""
        db = self.m.database
        if db is None:
            raise IntegrityError(f"manifest {self.manifest_key} has no database")
        if self.m.format == 1:
            body = self._get(self.key(db.dump.key))["Body"]
            return _Verified(body, db.dump.bytes, db.dump.sha256, f"database dump {db.dump.key}")
        return _Verified(
            _Joined(self.blobs.read(db.dump.chunks)), db.dump.bytes, db.dump.sha256, "database dump"
        )

    def entries(self) -> Iterator[Entry]:
        """Every index entry (directories, files, symlinks) in path order; the index is checked."""
        files = self.m.files
        if not files:
            return
        idx = files.index
        if self.m.format == 1:
            stream = _Verified(self._get(self.key(idx.key))["Body"], idx.bytes, idx.sha256, idx.key)
            yield from read_index(stream)  # type: ignore[arg-type]
            stream.drain()
            return
        checked = _Verified(_Joined(self.blobs.read(idx.chunks)), idx.bytes, idx.sha256, "file index")
        yield from read_lines(_lines(checked))
        checked.drain()

    def contents(self, entries: Iterator[Entry]) -> Iterator[tuple[Entry, _Verified | None]]:
        """Pair each entry with a verified stream of its bytes (None for directories/symlinks).

        The caller reads the stream (or not); whatever is left is read and checked before the
        next entry, so a damaged file is always reported.
        """
        if self.m.format == 1:
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
            return
        ahead, behind = itertools.tee(entries)
        blobs = self.blobs.read(r for e in ahead if e.type == "f" for r in e.chunks or [])
        for e in behind:
            if e.type != "f":
                yield e, None
                continue
            joined = _Joined(itertools.islice(blobs, len(e.chunks or [])))
            stream = _Verified(joined, e.size, e.sha256, f"file {e.path}")
            yield e, stream
            stream.drain()
            if joined.read(1):
                raise IntegrityError(f"file {e.path} is longer than the index says")


class _CheckedOpener:
    """Refuses packs the manifest does not list (a forged reference never reads other data)."""

    def __init__(self, inner: KeyOpener, objects: dict[str, Any]) -> None:
        self.inner = inner
        self.objects = objects

    def sealer(self, pack: str) -> Sealer | None:
        if pack not in self.objects:
            raise IntegrityError(f"pack {pack} is not in the manifest")
        return self.inner.sealer(pack)


class _Joined:
    """Blobs as one stream; ``read(n)`` returns n bytes unless the stream ends (as a file does:
    tarfile and others rely on it)."""

    def __init__(self, blobs: Iterator[bytes]) -> None:
        self.blobs = blobs
        self.buf = b""
        self.pos = 0

    def _fill(self) -> bool:
        while self.pos >= len(self.buf):
            nxt = next(self.blobs, None)
            if nxt is None:
                return False
            self.buf, self.pos = nxt, 0
        return True

    def read(self, n: int = -1, /) -> bytes:
        if n is None or n < 0:
            parts = []
            while self._fill():
                parts.append(self.buf[self.pos :])
                self.pos = len(self.buf)
            return b"".join(parts)
        if not self._fill():
            return b""
        if len(self.buf) - self.pos >= n:  # the common case: no copy of a joined buffer
            out = self.buf[self.pos : self.pos + n]
            self.pos += n
            return out
        parts = []
        want = n
        while want and self._fill():
            piece = self.buf[self.pos : self.pos + want]
            self.pos += len(piece)
            want -= len(piece)
            parts.append(piece)
        return b"".join(parts)

    def close(self) -> None:
        """Nothing to release: the blobs are in memory."""


def _lines(stream: _Verified) -> Iterator[bytes]:
    rest = b""
    while chunk := stream.read(CHUNK):
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


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


def _no_answer(key: str, err: BaseException) -> StorageError:
    """urllib3's failure on a presigned URL as a retryable StorageError. Never its text as it
    is: urllib3 names the URL, whose signature is a credential; only the cause's own words."""
    reason = getattr(err, "reason", None) or err
    text = str(reason).rsplit(">: ", 1)[-1]  # "<HTTPConnection object at 0x..>: Failed to ..."
    text = re.sub(r"\S*[?&]X-Amz-\S*", "(URL)", re.sub(r"\bhttps?://\S*", "(URL)", text))
    return StorageError(
        f"reading {key}: the connection to the S3 endpoint failed ({type(reason).__name__}: {text})"
    )


class _UrlBody:
    """A presigned GET's streaming body whose read errors are (retryable) StorageErrors, as an
    S3Store's are, so that a restore tells a lost connection from a refusal."""

    def __init__(self, resp: Any, key: str) -> None:
        self._resp = resp
        self._key = key

    def read(self, n: int | None = -1, /) -> bytes:
        import urllib3

        try:
            data: bytes = self._resp.read(None if n is None or n < 0 else n)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise _no_answer(self._key, e) from e
        return data

    def close(self) -> None:  # closes the connection: one left with unread bytes is never reused
        with contextlib.suppress(Exception):
            self._resp.close()

    def readable(self) -> bool:
        return True

    def __enter__(self) -> _UrlBody:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PresignedReader:
    """The ``get_object`` of an S3 client, for one snapshot, through presigned GET URLs.

    A restore into another namespace gets a Secret holding these URLs instead of the storage's
    credentials: it can read that one snapshot until the URLs expire, and nothing else. A URL
    never appears in an error: its signature is a credential.
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
        """``{"Body": ...}``; raises botocore's ClientError for what the server said (with its
        status), a retryable StorageError when no answer came (after urllib3's retries)."""
        import urllib3

        url = self.urls.get(Key)
        if url is None:
            raise ClientError(
                {"Error": {"Code": "AccessDenied", "Message": f"no presigned URL for {Key}"}}, "GetObject"
            )
        headers = {"Range": Range} if Range else {}
        try:
            resp = self.http.request("GET", url, headers=headers, preload_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise _no_answer(Key, e) from e
        if resp.status >= 300:
            body = _UrlBody(resp, Key)
            with body:
                text = body.read(2048).decode(errors="replace")
            code = "NoSuchKey" if resp.status == 404 else f"HTTP{resp.status}"
            if "<Code>" in text:
                code = text.split("<Code>", 1)[1].split("</Code>", 1)[0]
            said: Any = {  # as botocore would say it, with the status translate() classifies by
                "Error": {"Code": code, "Message": f"GET {Key}"},
                "ResponseMetadata": {"HTTPStatusCode": resp.status},
            }
            raise ClientError(said, "GetObject")
        return {"Body": _UrlBody(resp, Key)}

    def check(self, key: str) -> None:
        """Read the first byte of ``key``. Raises a StorageError: a retryable one when no answer
        came or the server said 5xx or throttled; a final one when it refused (an expired or
        foreign URL: 403; 404)."""
        try:
            body = self.get_object(Bucket="", Key=key, Range="bytes=0-0")["Body"]
        except ClientError as e:
            raise translate(e, f"reading {key} through its presigned URL") from e
        with body:
            body.read()


def load_data_keys(handed: dict[str, str]) -> dict[str, bytes]:
    """The data keys a restore in another namespace was handed (base64 by object key)."""
    import base64

    return {k: base64.b64decode(v) for k, v in handed.items()}


def hand_over_data_keys(raw_manifest: bytes, keyring: KeyRing | None) -> dict[str, str]:
    """For a restore in another namespace: the unwrapped data keys of exactly this snapshot's
    objects (and of its manifest), base64 by object key; never a key-encryption key. Empty when
    the snapshot is not encrypted."""
    import base64

    from nightjar.storage.manifest import PublicManifest

    public = PublicManifest.parse(raw_manifest)
    if not public.key_ids():
        return {}
    if keyring is None:
        raise KeyProblem("the snapshot is encrypted and the storage has no encryption key Secret")
    out = {o.key: base64.b64encode(keyring.unwrap(o.wrapped_key, o.key_id)).decode() for o in public.objects}
    if public.manifest_key_id:
        out[MANIFEST_DATA_KEY] = base64.b64encode(public.manifest_data_key(raw_manifest, keyring)).decode()
    return out


def presign_snapshot(
    s3: Any, bucket: str, manifest_key: str, keys: list[str], expires_in: int
) -> dict[str, str]:
    """Presigned GET URLs for a snapshot's manifest and objects."""
    return {
        k: s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": k}, ExpiresIn=expires_in)
        for k in [manifest_key, *keys]
    }
