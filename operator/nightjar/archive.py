"""Backup archives in the Mendix format: write them as a stream, and check uploaded ones.

Full snapshot: a ``.tar.gz`` holding ``.metadata`` (JSON, string values), ``db/db.backup`` (a
pg_dump custom-format dump) and the files under ``tree/``. Database only: the bare custom-format
dump. Files only: a ``.tar.gz`` of ``tree/`` (for offline keeping; it cannot be uploaded).

A file keeps its relative path under ``tree/``, so a round trip gives back the same paths; a
Mendix app's files directory is already laid out as ``<aa>/<bb>/<uuid>``, which is exactly the
Mendix ``tree/`` layout. Only regular files go into an archive (Mendix archives hold nothing
else): directories are implied by the paths, and symlinks stay out.

A dump is checked as it streams past, not only by its header: :class:`DumpChecker` walks the
custom format's table of contents and data blocks, so a truncated or damaged dump is refused
even when nothing around it (gzip, tar) notices. Pure: streams in, streams out, no clients;
``tarfile`` in stream mode, so nothing is ever seeked or copied to disk, and memory does not grow
with the archive's size or its number of files.
"""

from __future__ import annotations

import gzip
import io
import json
import stat
import tarfile
import time
import zlib
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import IO, Any, Protocol, cast

from nightjar.domain.pgdump import MAGIC, DumpHeader, NeedMoreBytes, NotACustomDump, parse_header

METADATA = ".metadata"
DB_MEMBER = "db/db.backup"
TREE = "tree/"
GZIP_MAGIC = b"\x1f\x8b"
#: gzip level of written archives: 6 costs a third of 9's CPU for nearly the same size.
COMPRESS_LEVEL = 6
CHUNK = 1024 * 1024


class Readable(Protocol):
    """Anything with ``read(n)``: the parts of an archive handed to callbacks."""

    def read(self, n: int = -1, /) -> bytes: ...


class Writable(Protocol):
    """Where an archive is written: a file, stdout, a pipe (never seeked)."""

    def write(self, data: bytes, /) -> int: ...


class ArchiveError(ValueError):
    """The archive is not one Nightjar can upload; the message says why."""


@dataclass(frozen=True)
class FileItem:
    """One file to put under ``tree/``: its relative path, size and a way to open its bytes.

    ``open`` may return any readable; it is closed after use when it has ``close``. It may also
    hand back a stream that is already open (a snapshot's files arrive one after another).
    """

    path: str
    size: int
    open: Callable[[], Readable]
    mode: int = 0o644
    mtime: float = 0.0


@dataclass(frozen=True)
class TreeFile:
    """One file of an archive's ``tree/``, as handed to ``inspect``'s ``on_file``."""

    path: str
    size: int
    mode: int
    mtime: int


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
    stream: Readable,
    mode: int = 0o644,
    mtime: float | None = None,
) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.mtime = int(mtime if mtime is not None else time.time())
    tar.addfile(info, cast(IO[bytes], stream))
    _forget_members(tar)


def _forget_members(tar: tarfile.TarFile) -> None:
    """tarfile keeps every member it has seen in ``members``, even in stream mode: without this,
    memory grows by a TarInfo per file (about 60 MB for 120,000 files)."""
    tar.members = []  # type: ignore[attr-defined]  # an undocumented attribute, absent from typeshed


def write_archive(
    out: Writable,
    *,
    meta: dict[str, str] | None,
    dump: tuple[int, Readable] | None,
    files: Iterable[FileItem],
    compresslevel: int = COMPRESS_LEVEL,
) -> None:
    """Stream a ``.tar.gz``: ``.metadata`` and ``db/db.backup`` when given, then ``tree/``.

    ``dump`` is (size, stream). Memory stays at tarfile's and gzip's block buffers whatever the
    sizes. ``out`` is only written to (a pipe or stdout will do) and is not closed.
    """
    with (
        gzip.GzipFile(
            filename="", fileobj=cast(IO[bytes], out), mode="wb", compresslevel=compresslevel, mtime=0
        ) as gz,
        tarfile.open(fileobj=cast(IO[bytes], gz), mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        if meta is not None:
            raw = json.dumps(meta).encode()
            _add_stream(tar, METADATA, len(raw), io.BytesIO(raw))
        if dump is not None:
            _add_stream(tar, DB_MEMBER, dump[0], dump[1])
        for item in files:
            stream = item.open()
            try:
                _add_stream(
                    tar, TREE + _safe_member_path(item.path), item.size, stream, item.mode, item.mtime or None
                )
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()


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
    stream: Readable,
    on_dump: Callable[[Readable, int], None] | None = None,
    on_file: Callable[[TreeFile, Readable], None] | None = None,
) -> ArchiveInfo:
    """Validate an archive read as a stream, handing its parts to the callbacks as they pass.

    ``on_dump(stream, size)`` gets the dump (size -1 for a bare dump, whose size is known only
    at its end); ``on_file(member, stream)`` each file of ``tree/``, in archive order. A callback
    may read its stream or not: what it leaves is read (and checked) before going on.

    Raises ArchiveError naming the problem: not an archive, files only, no or bad ``.metadata``,
    a dump that is not pg_dump's custom format or is truncated, a truncated archive, an unsafe
    path. Callbacks have run for whatever came before the problem: the caller undoes their work.
    """
    head = stream.read(2)
    if not head:
        raise ArchiveError("the file is empty")
    if head != GZIP_MAGIC:
        return _inspect_bare_dump(_Prepend(head, stream), on_dump)

    meta: dict[str, Any] | None = None
    dump_header: DumpHeader | None = None
    dump_size = files = files_size = 0
    try:
        gz = _Gunzip(_Prepend(head, stream))
        with tarfile.open(fileobj=cast(IO[bytes], gz), mode="r|") as tar:
            for member in tar:
                _forget_members(tar)
                name = member.name[2:] if member.name.startswith("./") else member.name
                if member.isdir():
                    continue
                if not member.isfile():
                    raise ArchiveError(f"{member.name}: only regular files may be in an archive")
                f = tar.extractfile(member)
                if f is None:
                    raise ArchiveError(f"{member.name}: cannot be read")
                if name == METADATA:
                    meta = _read_metadata(f, member.size)
                elif name == DB_MEMBER:
                    if dump_header is not None:
                        raise ArchiveError("the archive holds db/db.backup twice")
                    probe = f.read(4096)
                    try:
                        dump_header = parse_header(probe)
                    except (NotACustomDump, NeedMoreBytes) as e:
                        raise ArchiveError(f"db/db.backup is not a pg_dump custom-format dump ({e})") from e
                    dump_size = member.size
                    checked = _Checked(_Prepend(probe, f), DumpChecker("db/db.backup"))
                    if on_dump is not None:
                        on_dump(checked, member.size)
                    _drain(checked)
                    if checked.count != member.size:
                        raise ArchiveError(
                            f"db/db.backup is truncated ({checked.count} of {member.size} bytes)"
                        )
                    checked.checker.finish()
                elif name.startswith(TREE):
                    rel = _safe_member_path(name[len(TREE) :])
                    files += 1
                    files_size += member.size
                    counted = _Counting(f)
                    if on_file is not None:
                        on_file(
                            TreeFile(rel, member.size, stat.S_IMODE(member.mode), int(member.mtime)), counted
                        )
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
    _sizes_agree(meta, dump_size, files_size)
    return ArchiveInfo("Full", meta, dump_header, dump_size, files, files_size)


def _sizes_agree(meta: dict[str, Any], dump_size: int, files_size: int) -> None:
    """``.metadata`` sizes (when given) must be what the archive holds: a mismatch means a
    truncated or assembled-by-hand archive, refused naming the field."""
    for field, actual, what in (
        ("dumpSize", dump_size, "db/db.backup"),
        ("filesSize", files_size, "the files under tree/"),
    ):
        if field not in meta:
            continue
        try:
            stated = int(str(meta[field]).strip())
        except ValueError as e:
            raise ArchiveError(f".metadata {field} is {meta[field]!r}, not a number of bytes") from e
        if stated != actual:
            raise ArchiveError(f".metadata {field} says {stated} bytes, but {what} holds {actual} bytes")


def _inspect_bare_dump(rest: Readable, on_dump: Callable[[Readable, int], None] | None) -> ArchiveInfo:
    probe = rest.read(4096)
    try:
        header = parse_header(probe)
    except NeedMoreBytes as e:
        if probe[:5] == MAGIC[: len(probe[:5])]:
            raise ArchiveError("the database dump is truncated: it ends inside the header") from e
        raise ArchiveError(
            "neither a Mendix .tar.gz archive nor a PostgreSQL custom-format dump (no PGDMP signature)"
        ) from e
    except NotACustomDump as e:
        raise ArchiveError(
            f"neither a Mendix .tar.gz archive nor a PostgreSQL custom-format dump ({e})"
        ) from e
    checked = _Checked(_Prepend(probe, rest), DumpChecker("the database dump"))
    if on_dump is not None:
        on_dump(checked, -1)
    _drain(checked)
    checked.checker.finish()
    return ArchiveInfo("DatabaseOnly", {}, header, checked.count, 0, 0)


def _read_metadata(f: Readable, size: int) -> dict[str, Any]:
    if size > 1 << 20:
        raise ArchiveError(f".metadata is {size} bytes: not a Mendix .metadata document")
    try:
        meta = json.loads(f.read(size))
    except ValueError as e:
        raise ArchiveError(f".metadata is not JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ArchiveError(".metadata is not a JSON object")
    return meta


# --- the custom-format dump, checked as it streams ------------------------------------------------

#: Archive versions whose layout the checker knows (pg_dump 9.x up to 17).
KNOWN_VERSIONS = ((1, 10), (1, 16))
_BLK_DATA, _BLK_BLOBS = 1, 3
#: A parser step asks for n > 0 bytes to read, or -n bytes to skip (it is then sent b"").
_Steps = Generator[int, bytes, None]


class DumpChecker:
    """Walk a pg_dump custom-format archive's structure from bytes fed in any chunking.

    Follows ``pg_backup_archiver.c`` (``ReadHead``, ``ReadToc``) and ``pg_backup_custom.c``
    (data blocks: a type byte, the entry's dump id, then length-prefixed chunks ending with a
    zero length; large objects as (oid, chunks) pairs ending with oid 0). Strings are skipped,
    never held, so memory stays flat. At :meth:`finish` the archive must end between two data
    blocks, and every table of contents entry that has data must have had its block: a dump cut
    anywhere, even at a block boundary, is refused.

    Archive versions newer than :data:`KNOWN_VERSIONS` are not walked (``checked`` stays False).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.checked = True
        self.where = "the header"
        self.toc_entries = 0
        self.with_data: set[int] = set()
        self.seen: set[int] = set()
        self._at_boundary = False
        self._buf = bytearray()
        self._steps = self._walk()
        self._need = next(self._steps)

    def feed(self, data: bytes) -> None:
        if not self.checked:
            return
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n:
            need = self._need
            if need < 0:
                k = min(-need, n - i)
                i += k
                self._need = need + k if need + k < 0 else self._send(b"")
                continue
            k = min(need - len(self._buf), n - i)
            self._buf += view[i : i + k]
            i += k
            if len(self._buf) == need:
                chunk = bytes(self._buf)
                self._buf.clear()
                self._need = self._send(chunk)

    def _send(self, value: bytes) -> int:
        try:
            return self._steps.send(value)
        except StopIteration:
            self.checked = False  # a version the walk does not know: nothing more to check
            return -(1 << 62)

    def finish(self) -> None:
        """Raise ArchiveError unless the dump ended where a complete dump ends."""
        if not self.checked:
            return
        if not self._at_boundary or self._buf:
            raise ArchiveError(f"{self.what} is truncated or damaged: it ends inside {self.where}")
        missing = self.with_data - self.seen
        if missing:
            raise ArchiveError(
                f"{self.what} is truncated: the data of {len(missing)} of {len(self.with_data)} "
                "table of contents entries is missing"
            )

    def _bad(self, why: str) -> ArchiveError:
        return ArchiveError(f"{self.what} is damaged: {why} in {self.where}")

    def _walk(self) -> _Steps:
        magic = yield 5
        if magic != b"PGDMP":
            raise ArchiveError(f"{self.what} is not a pg_dump custom-format dump (no PGDMP signature)")
        ver = yield 3
        version = (ver[0], ver[1])
        if not KNOWN_VERSIONS[0] <= version <= KNOWN_VERSIONS[1]:
            if version > KNOWN_VERSIONS[1]:
                return  # newer than we know: its header was parsed, its body is not walked
            raise ArchiveError(f"{self.what} has the unsupported archive version {ver[0]}.{ver[1]}")
        sizes = yield 3
        int_size, off_size, fmt = sizes
        if int_size not in (4, 8) or not 1 <= off_size <= 16 or fmt != 1:
            raise self._bad("implausible header fields")

        def integer() -> Generator[int, bytes, int]:
            raw = yield int_size + 1
            value = int.from_bytes(raw[1:], "little")
            return -value if raw[0] else value

        def skip_string() -> Generator[int, bytes, bool]:
            """Skip one string; False for a NULL one."""
            length = yield from integer()
            if length > 0:
                yield -length
            return length >= 0

        def chunks() -> Generator[int, bytes, None]:
            while (length := (yield from integer())) != 0:
                if length < 0:
                    raise self._bad(f"a negative chunk length {length}")
                yield -length

        if version >= (1, 15):
            yield 1  # compression algorithm
        else:
            yield from integer()  # compression level
        for _ in range(7):  # creation time
            yield from integer()
        for _ in range(3):  # database name, server and pg_dump versions
            yield from skip_string()

        self.where = "the table of contents"
        count = yield from integer()
        if not 0 <= count < 1 << 28:
            raise self._bad(f"an implausible entry count {count}")
        for _ in range(count):
            dump_id = yield from integer()
            had_dumper = yield from integer()
            if dump_id <= 0:
                raise self._bad(f"an invalid entry id {dump_id}")
            for _ in range(4):  # table oid, oid, tag, desc
                yield from skip_string()
            if version >= (1, 11):
                yield from integer()  # section
            for _ in range(5):  # defn, drop statement, copy statement, namespace, tablespace
                yield from skip_string()
            if version >= (1, 14):
                yield from skip_string()  # table access method
            if version >= (1, 16):
                yield from integer()  # relkind
            for _ in range(2):  # owner, "with oids"
                yield from skip_string()
            while (yield from skip_string()):  # dependencies, up to a NULL string
                pass
            yield -(1 + off_size)  # data offset flag and offset
            self.toc_entries += 1
            if had_dumper:
                self.with_data.add(dump_id)

        while True:
            self.where = "the data blocks"
            self._at_boundary = True
            kind = yield 1
            self._at_boundary = False
            if kind[0] not in (_BLK_DATA, _BLK_BLOBS):
                raise self._bad(f"an unknown block type {kind[0]}")
            dump_id = yield from integer()
            self.where = f"the data of entry {dump_id}"
            if dump_id not in self.with_data or dump_id in self.seen:
                raise self._bad(f"a data block for entry {dump_id}, which has none or has it twice")
            self.seen.add(dump_id)
            if kind[0] == _BLK_DATA:
                yield from chunks()
            else:
                while (yield from integer()) != 0:  # large objects: (oid, chunks) up to oid 0
                    yield from chunks()


class _Checked:
    """A read stream that feeds what passes through it to a DumpChecker and counts it."""

    def __init__(self, inner: Readable, checker: DumpChecker) -> None:
        self.inner = inner
        self.checker = checker
        self.count = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self.inner.read(n)
        self.count += len(data)
        self.checker.feed(data)
        return data


# --- stream helpers ------------------------------------------------------------------------------


class _Prepend:
    """A read stream: ``head`` bytes first, then ``rest``."""

    def __init__(self, head: bytes, rest: Readable) -> None:
        self.head = head
        self.rest = rest

    def read(self, n: int = -1, /) -> bytes:
        if self.head:
            if n is None or n < 0:
                out, self.head = self.head + self.rest.read(), b""
                return bytes(out)
            out, self.head = self.head[:n], self.head[n:]
            if len(out) < n:
                out += self.rest.read(n - len(out))
            return bytes(out)
        return bytes(self.rest.read(n))


def _drain(stream: Readable) -> None:
    while stream.read(CHUNK):
        pass


class _Gunzip:
    """Decompress a gzip stream on the fly and tell whether it ended properly.

    Output is produced in bounded steps (a small input chunk of zeros can inflate to gigabytes),
    and concatenated gzip members (as pigz and ``cat a.gz b.gz`` write) are read as one stream.
    """

    OUT_STEP = 1024 * 1024

    def __init__(self, raw: Readable) -> None:
        self.raw = raw
        self.z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.buf = bytearray()
        self.pos = 0
        self.pending = b""
        self.complete = False
        self.eof = False

    def _fill(self) -> bool:
        """Decompress one more step into the buffer; False at the end of the input."""
        if self.z.eof:
            rest = self.z.unused_data or self.raw.read(256 * 1024)
            while rest and not rest.strip(b"\x00"):  # zero padding after the last member
                rest = self.raw.read(256 * 1024)
            if not rest:
                self.eof = True
                return False
            self.z = zlib.decompressobj(16 + zlib.MAX_WBITS)
            self.complete = False
            self.pending = rest
        if not self.pending:
            self.pending = self.raw.read(256 * 1024)
            if not self.pending:
                self.eof = True
                return False
        data, self.pending = self.pending, b""
        self.buf += self.z.decompress(data, self.OUT_STEP)
        self.pending = self.z.unconsumed_tail
        if self.z.eof:
            self.complete = True
            self.pending = b""
        return True

    def read(self, n: int = -1, /) -> bytes:
        want = (1 << 62) if n is None or n < 0 else n
        while len(self.buf) - self.pos < want and not self.eof:
            if self.pos:
                del self.buf[: self.pos]
                self.pos = 0
            if not self._fill():
                break
        end = min(len(self.buf), self.pos + want)
        out = bytes(self.buf[self.pos : end])
        self.pos = end
        return out


class _Counting:
    def __init__(self, inner: Readable) -> None:
        self.inner = inner
        self.count = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self.inner.read(n)
        self.count += len(data)
        return data
