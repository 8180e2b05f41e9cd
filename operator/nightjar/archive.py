"""Backup archives in the Mendix format: write them as a stream, and check uploaded ones.

Full snapshot: a ``.tar.gz`` holding ``.metadata`` (JSON, string values), ``db/db.backup`` (a
pg_dump custom-format dump) and the files under ``tree/``. Database only: the bare custom-format
dump. Files only: a ``.tar.gz`` of ``tree/`` (for offline keeping; it cannot be uploaded).

A file keeps its relative path under ``tree/``, so a round trip gives back the same paths; a
Mendix app's files directory is already laid out as ``<aa>/<bb>/<uuid>``, which is exactly the
Mendix ``tree/`` layout. Pure: streams in, streams out, no clients; ``tarfile`` in stream mode, so
nothing is ever seeked or copied to disk.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any, Protocol, cast

from nightjar.domain.pgdump import DumpHeader, NeedMoreBytes, NotACustomDump, parse_header

METADATA = ".metadata"
DB_MEMBER = "db/db.backup"
TREE = "tree/"
GZIP_MAGIC = b"\x1f\x8b"


class Readable(Protocol):
    """Anything with ``read(n)``: the parts of an archive handed to callbacks."""

    def read(self, n: int = -1, /) -> bytes: ...


class ArchiveError(ValueError):
    """The archive is not one Nightjar can upload; the message says why."""


@dataclass(frozen=True)
class FileItem:
    """One file to put under ``tree/``: its relative path, size and a way to open its bytes."""

    path: str
    size: int
    open: Callable[[], IO[bytes]]
    mode: int = 0o644
    mtime: float = 0.0


def metadata(
    *, model_version: str, dump_size: int, database_size: int, files_size: int, duration_seconds: float = 0
) -> dict[str, str]:
    """The ``.metadata`` document: every value a string, as Mendix writes it."""
    return {
        "duration": str(int(duration_seconds)),
        "dumpSize": str(dump_size),
        "modelVersion": model_version,
        "databaseSize": str(database_size),
        "filesSize": str(files_size),
    }


def _safe_member_path(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise ArchiveError(f"refusing the unsafe path {path!r}")
    return "/".join(parts)


def _add_stream(
    tar: tarfile.TarFile,
    name: str,
    size: int,
    stream: IO[bytes],
    mode: int = 0o644,
    mtime: float | None = None,
) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.mtime = int(mtime if mtime is not None else time.time())
    tar.addfile(info, stream)


def write_archive(
    out: IO[bytes],
    *,
    meta: dict[str, str] | None,
    dump: tuple[int, IO[bytes]] | None,
    files: Iterable[FileItem],
) -> None:
    """Stream a ``.tar.gz``: ``.metadata`` and ``db/db.backup`` when given, then ``tree/``.

    ``dump`` is (size, stream). Memory stays at tarfile's block buffers whatever the sizes.
    """
    with tarfile.open(fileobj=out, mode="w|gz", format=tarfile.PAX_FORMAT) as tar:
        if meta is not None:
            raw = json.dumps(meta).encode()
            _add_stream(tar, METADATA, len(raw), io.BytesIO(raw))
        if dump is not None:
            _add_stream(tar, DB_MEMBER, dump[0], dump[1])
        for item in files:
            with item.open() as stream:
                _add_stream(
                    tar, TREE + _safe_member_path(item.path), item.size, stream, item.mode, item.mtime or None
                )


@dataclass
class ArchiveInfo:
    """What an uploaded archive holds."""

    kind: str  # "Full" or "DatabaseOnly"
    metadata: dict[str, Any]
    dump_header: DumpHeader
    dump_size: int
    files: int
    files_size: int


def inspect(
    stream: IO[bytes],
    on_dump: Callable[[Readable, int], None] | None = None,
    on_file: Callable[[str, Readable, int], None] | None = None,
) -> ArchiveInfo:
    """Validate an archive read as a stream, handing its parts to the callbacks as they pass.

    Raises ArchiveError naming the problem: not an archive, files only, no or bad ``.metadata``,
    a dump that is not pg_dump's custom format, a truncated archive, an unsafe path.
    """
    head = stream.read(2)
    if not head:
        raise ArchiveError("the file is empty")
    if head != GZIP_MAGIC:
        rest = _Prepend(head, stream)
        probe = rest.read(4096)
        try:
            header = parse_header(probe)
        except (NotACustomDump, NeedMoreBytes) as e:
            raise ArchiveError(
                f"neither a Mendix .tar.gz archive nor a PostgreSQL custom-format dump ({e})"
            ) from e
        size = len(probe)
        if on_dump is not None:
            counter = _Counting(_Prepend(probe, rest))
            on_dump(counter, -1)
            size = counter.count
        else:
            while chunk := rest.read(1024 * 1024):
                size += len(chunk)
        return ArchiveInfo("DatabaseOnly", {}, header, size, 0, 0)

    meta: dict[str, Any] | None = None
    dump_header: DumpHeader | None = None
    dump_size = files = files_size = 0
    try:
        gz = _Gunzip(_Prepend(head, stream))
        with tarfile.open(fileobj=cast(IO[bytes], gz), mode="r|") as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if member.isdir():
                    continue
                if not member.isfile():
                    raise ArchiveError(f"{member.name}: only regular files may be in an archive")
                f = tar.extractfile(member)
                if f is None:
                    raise ArchiveError(f"{member.name}: cannot be read")
                if name == METADATA:
                    try:
                        meta = json.loads(f.read(1 << 20))
                    except ValueError as e:
                        raise ArchiveError(f".metadata is not JSON: {e}") from e
                    if not isinstance(meta, dict):
                        raise ArchiveError(".metadata is not a JSON object")
                elif name == DB_MEMBER:
                    probe = f.read(4096)
                    try:
                        dump_header = parse_header(probe)
                    except (NotACustomDump, NeedMoreBytes) as e:
                        raise ArchiveError(f"db/db.backup is not a pg_dump custom-format dump ({e})") from e
                    dump_size = member.size
                    counted = _Counting(_Prepend(probe, f))
                    if on_dump is not None:
                        on_dump(counted, member.size)
                    _drain(counted)
                    if counted.count != member.size:
                        raise ArchiveError(
                            f"db/db.backup is truncated ({counted.count} of {member.size} bytes)"
                        )
                elif name.startswith(TREE):
                    rel = _safe_member_path(name[len(TREE) :])
                    files += 1
                    files_size += member.size
                    counted = _Counting(f)
                    if on_file is not None:
                        on_file(rel, counted, member.size)
                    _drain(counted)
                    if counted.count != member.size:
                        raise ArchiveError(
                            f"{member.name} is truncated ({counted.count} of {member.size} bytes)"
                        )
                else:
                    raise ArchiveError(
                        f"unexpected member {member.name!r} (expected .metadata, db/db.backup, tree/)"
                    )
            _drain(gz)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ArchiveError(f"the archive is damaged or truncated: {e}") from e
    if not gz.complete:
        raise ArchiveError("the archive is damaged or truncated: the gzip stream ends early")
    if dump_header is None:
        if files:
            raise ArchiveError(
                "a files-only archive cannot be uploaded or restored: it has no database "
                "(download it for offline keeping only)"
            )
        raise ArchiveError("the archive has no db/db.backup")
    if meta is None:
        raise ArchiveError("the archive has no .metadata")
    return ArchiveInfo("Full", meta, dump_header, dump_size, files, files_size)


class _Prepend:
    """A read stream: ``head`` bytes first, then ``rest``."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self.head = head
        self.rest = rest

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0:
                out, self.head = self.head + self.rest.read(), b""
                return bytes(out)
            out, self.head = self.head[:n], self.head[n:]
            if len(out) < n:
                out += self.rest.read(n - len(out))
            return bytes(out)
        return bytes(self.rest.read(n))


def _drain(stream: Any) -> None:
    while stream.read(1024 * 1024):
        pass


class _Gunzip:
    """Decompress a gzip stream on the fly and tell whether it ended properly."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.buf = b""
        self.complete = False

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self.buf) < n) and not self.complete:
            chunk = self.raw.read(256 * 1024)
            if not chunk:
                break
            self.buf += self.z.decompress(chunk)
            if self.z.eof:
                self.complete = True
        if n < 0:
            out, self.buf = self.buf, b""
        else:
            out, self.buf = self.buf[:n], self.buf[n:]
        return out


class _Counting:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.inner.read(n)
        self.count += len(data)
        return data
