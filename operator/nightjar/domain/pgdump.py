"""Read the header of a PostgreSQL custom-format archive (``pg_dump -Fc``).

Used while the dump streams to storage (to record the server and pg_dump versions without
another connection) and to validate uploaded archives. Layout, from pg_backup_archiver.c
(``WriteHead``): ``PGDMP``, version major/minor/rev bytes, int size, offset size, format;
then the compression (an int up to archive 1.14, one algorithm byte from 1.15), the creation
time as seven ints, and three strings: database name, server version, pg_dump version.
An int is a sign byte followed by ``int size`` little-endian bytes; a string is an int length
followed by that many bytes (-1 means NULL).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

MAGIC = b"PGDMP"
FORMAT_CUSTOM = 1
#: Mendix Cloud accepts archives up to this version (what pg_dump 12-15 write).
MENDIX_MAX_ARCHIVE_VERSION = (1, 14)


class NotACustomDump(ValueError):
    """The bytes are not the start of a pg_dump custom-format archive."""


class NeedMoreBytes(ValueError):
    """The header continues past the bytes given."""


@dataclass(frozen=True)
class DumpHeader:
    archive_version: tuple[int, int, int]
    compression: str
    created: dt.datetime | None
    database: str
    server_version: str
    pg_dump_version: str

    @property
    def archive_version_text(self) -> str:
        return ".".join(str(v) for v in self.archive_version)

    @property
    def mendix_compatible(self) -> bool:
        return self.archive_version[:2] <= MENDIX_MAX_ARCHIVE_VERSION


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.int_size = 4
        self.off_size = 8

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise NeedMoreBytes(f"header needs more than {len(self.data)} bytes")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def int_(self) -> int:
        sign = self.byte()
        raw = self.take(self.int_size)
        val = int.from_bytes(raw, "little")
        return -val if sign else val

    def str_(self) -> str:
        return self.str_or_none() or ""

    def str_or_none(self) -> str | None:
        n = self.int_()
        if n < 0:
            return None
        if n > 1 << 30:
            raise NotACustomDump("implausible string length in the archive")
        return self.take(n).decode("utf-8", errors="replace")


_ALGORITHMS = {0: "none", 1: "gzip", 2: "lz4", 3: "zstd"}


def parse_header(data: bytes) -> DumpHeader:
    """Parse the header from the first bytes of a dump (a few hundred are plenty)."""
    if len(data) < len(MAGIC):
        raise NeedMoreBytes("header needs more bytes")
    if not data.startswith(MAGIC):
        raise NotACustomDump("not a PostgreSQL custom-format dump (no PGDMP signature)")
    r = _Reader(data)
    r.take(len(MAGIC))
    version = (r.byte(), r.byte(), r.byte())
    if version[0] != 1 or version[1] < 10:
        raise NotACustomDump(f"unsupported custom-format archive version {'.'.join(map(str, version))}")
    r.int_size = r.byte()
    if r.int_size not in (4, 8):
        raise NotACustomDump(f"implausible integer size {r.int_size} in header")
    r.byte()  # offset size
    fmt = r.byte()
    if fmt != FORMAT_CUSTOM:
        raise NotACustomDump(f"archive format {fmt} is not the custom format (pg_dump -Fc)")
    if version[:2] >= (1, 15):
        compression = _ALGORITHMS.get(r.byte(), "unknown")
    else:
        level = r.int_()
        compression = "none" if level == 0 else f"gzip (level {level})" if level > 0 else "gzip (default)"
    sec, minute, hour, mday, mon, year, _isdst = (r.int_() for _ in range(7))
    try:
        created: dt.datetime | None = dt.datetime(year + 1900, mon + 1, mday, hour, minute, sec)
    except ValueError:
        created = None
    database = r.str_()
    server_version = r.str_()
    pg_dump_version = r.str_()
    return DumpHeader(version, compression, created, database, server_version, pg_dump_version)


@dataclass(frozen=True)
class TocEntry:
    """One entry of an archive's table of contents: what it is (``desc``, e.g. "TABLE",
    "TABLE DATA", "INDEX") and the object's schema and name (``tag``)."""

    dump_id: int
    desc: str
    namespace: str
    tag: str


def _skip_header(r: _Reader) -> tuple[int, int]:
    """Read the header (as :func:`parse_header` does); returns the archive (major, minor)."""
    r.take(len(MAGIC))
    version = (r.byte(), r.byte(), r.byte())
    if version[0] != 1 or version[1] < 10:
        raise NotACustomDump(f"unsupported custom-format archive version {'.'.join(map(str, version))}")
    r.int_size = r.byte()
    if r.int_size not in (4, 8):
        raise NotACustomDump(f"implausible integer size {r.int_size} in header")
    r.off_size = r.byte()
    if r.byte() != FORMAT_CUSTOM:
        raise NotACustomDump("not the custom format (pg_dump -Fc)")
    if version[:2] >= (1, 15):
        r.byte()
    else:
        r.int_()
    for _ in range(7):
        r.int_()
    for _ in range(3):
        r.str_()
    return version[0], version[1]


def parse_toc(data: bytes) -> list[TocEntry]:
    """The table of contents from the first bytes of a custom-format dump (it follows the
    header; the data blocks come after it). Layout from pg_backup_archiver.c ``ReadToc`` and
    pg_backup_custom.c ``_ReadExtraToc``, archive versions 1.10 to 1.16. Raises
    :class:`NeedMoreBytes` when the TOC continues past ``data``."""
    if not data.startswith(MAGIC):
        if len(data) < len(MAGIC):
            raise NeedMoreBytes("header needs more bytes")
        raise NotACustomDump("not a PostgreSQL custom-format dump (no PGDMP signature)")
    r = _Reader(data)
    _major, minor = _skip_header(r)
    count = r.int_()
    if count < 0 or count > 50_000_000:
        raise NotACustomDump(f"implausible number of TOC entries {count}")
    entries: list[TocEntry] = []
    for _ in range(count):
        dump_id = r.int_()
        r.int_()  # hadDumper
        r.str_()  # catalog id: tableoid
        r.str_()  # catalog id: oid
        tag = r.str_()
        desc = r.str_()
        r.int_()  # section
        r.str_()  # defn
        r.str_()  # dropStmt
        r.str_()  # copyStmt
        namespace = r.str_()
        r.str_()  # tablespace
        if minor >= 14:
            r.str_()  # tableam
        if minor >= 16:
            r.int_()  # relkind
        r.str_()  # owner
        r.str_()  # "with oids" (always "false" now)
        while r.str_or_none() is not None:  # dependencies, ended by a NULL string
            pass
        r.take(1 + r.off_size)  # data state and offset of the entry's data block
        entries.append(TocEntry(dump_id, desc, namespace, tag))
    return entries


def tables(entries: list[TocEntry]) -> list[tuple[str, str]]:
    """The (schema, name) of every table the dump creates, in TOC order."""
    return [(e.namespace, e.tag) for e in entries if e.desc == "TABLE"]
