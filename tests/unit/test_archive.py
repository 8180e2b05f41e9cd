"""Mendix-format archives: streamed writing, validation of uploads (down to the dump's own
structure), round trips."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tracemalloc

import pytest

from nightjar import archive
from tests.unit.test_pgdump_header import header


def _int(v: int) -> bytes:
    return (b"\x01" if v < 0 else b"\x00") + abs(v).to_bytes(4, "little")


def _str(s: str | None) -> bytes:
    if s is None:
        return _int(-1)
    raw = s.encode()
    return _int(len(raw)) + raw


def toc_entry(dump_id: int, desc: str, has_data: bool, deps: tuple[int, ...] = ()) -> bytes:
    """One table of contents entry as pg_dump 12-15 (archive 1.14) writes it."""
    out = _int(dump_id) + _int(1 if has_data else 0) + _str("1259") + _str(str(16000 + dump_id))
    out += _str(f"item{dump_id}") + _str(desc) + _int(3 if has_data else 1)
    out += _str(f"CREATE {desc};") + _str("") + _str("COPY x FROM stdin;" if has_data else "")
    out += _str("public") + _str("") + _str("heap") + _str("app") + _str("false")
    out += b"".join(_str(str(d)) for d in deps) + _str(None)
    return out + b"\x01" + (0).to_bytes(8, "little")  # offset flag, 8-byte offset (header says 8)


def data_block(dump_id: int, chunks: list[bytes]) -> bytes:
    return b"\x01" + _int(dump_id) + b"".join(_int(len(c)) + c for c in chunks) + _int(0)


def blobs_block(dump_id: int, blobs: dict[int, list[bytes]]) -> bytes:
    out = b"\x03" + _int(dump_id)
    for oid, chunks in blobs.items():
        out += _int(oid) + b"".join(_int(len(c)) + c for c in chunks) + _int(0)
    return out + _int(0)


def custom_dump() -> bytes:
    """A small but structurally complete custom-format dump: TOC, table data, large objects."""
    toc = (
        _int(4)
        + toc_entry(1, "ENCODING", False)
        + toc_entry(2, "TABLE", False)
        + toc_entry(3, "TABLE DATA", True, deps=(2,))
        + toc_entry(4, "BLOBS", True)
    )
    data = data_block(3, [b"1\tone\n" * 300, b"2\ttwo\n" * 200]) + blobs_block(4, {16500: [b"lo" * 700]})
    return header() + toc + data


DUMP = custom_dump()


def files() -> list[archive.FileItem]:
    data = {"0d/3e/0d3e301f-5551-46f8-ad44-8de2be084c95": b"doc", "reports/q1 final.pdf": b"%PDF" * 100}
    return [archive.FileItem(p, len(b), (lambda b=b: io.BytesIO(b))) for p, b in data.items()]


def full_archive() -> bytes:
    out = io.BytesIO()
    meta = archive.metadata(
        model_version="1.0.0.40", dump_size=len(DUMP), database_size=9730584, files_size=403
    )
    archive.write_archive(out, meta=meta, dump=(len(DUMP), io.BytesIO(DUMP)), files=files())
    return out.getvalue()


class PipeOut:
    """A sink with nothing but write(): stdout or a pipe."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.chunks.append(bytes(data))
        return len(data)


def test_full_archive_has_the_mendix_layout_with_string_metadata() -> None:
    with tarfile.open(fileobj=io.BytesIO(full_archive()), mode="r:gz") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(".metadata").read())  # type: ignore[union-attr]
    assert names == [
        ".metadata",
        "db/db.backup",
        "tree/0d/3e/0d3e301f-5551-46f8-ad44-8de2be084c95",
        "tree/reports/q1 final.pdf",
    ]
    assert meta == {
        "duration": "0",
        "dumpSize": str(len(DUMP)),
        "modelVersion": "1.0.0.40",
        "databaseSize": "9730584",
        "filesSize": "403",
    }
    assert all(isinstance(v, str) for v in meta.values())


def test_an_archive_streams_into_a_sink_that_cannot_seek() -> None:
    out = PipeOut()
    archive.write_archive(out, meta=None, dump=(len(DUMP), io.BytesIO(DUMP)), files=files())
    with tarfile.open(fileobj=io.BytesIO(b"".join(out.chunks)), mode="r:gz") as tar:
        assert tar.extractfile("db/db.backup").read() == DUMP  # type: ignore[union-attr]


def test_round_trip_gives_back_the_dump_and_the_same_paths_bytes_and_modes() -> None:
    got_files: dict[str, bytes] = {}
    modes: set[int] = set()
    got_dump = io.BytesIO()

    def on_file(m: archive.TreeFile, s: archive.Readable) -> None:
        got_files[m.path] = s.read()
        modes.add(m.mode)
        assert m.size == len(got_files[m.path])

    info = archive.inspect(
        io.BytesIO(full_archive()), on_dump=lambda s, n: got_dump.write(s.read()), on_file=on_file
    )
    assert info.kind == "Full"
    assert info.metadata["modelVersion"] == "1.0.0.40"
    assert info.dump_header.server_version.startswith("15.")
    assert (info.files, info.files_size, info.dump_size) == (2, 403, len(DUMP))
    assert got_dump.getvalue() == DUMP
    assert got_files == {f.path: f.open().read() for f in files()}
    assert modes == {0o644}


def test_a_bare_custom_format_dump_is_a_database_only_archive() -> None:
    sink = io.BytesIO()
    info = archive.inspect(io.BytesIO(DUMP), on_dump=lambda s, n: sink.write(s.read()))
    assert info.kind == "DatabaseOnly"
    assert sink.getvalue() == DUMP
    assert info.dump_size == len(DUMP)


def test_files_only_archives_are_refused_with_the_reason() -> None:
    out = io.BytesIO()
    archive.write_archive(out, meta=None, dump=None, files=files())
    with pytest.raises(archive.ArchiveError, match="files-only archive cannot be uploaded"):
        archive.inspect(io.BytesIO(out.getvalue()))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"PK\x03\x04 zip", "neither a Mendix .tar.gz archive nor a PostgreSQL custom-format dump"),
        (
            b"hi\n",
            r"neither a Mendix .tar.gz archive nor a PostgreSQL custom-format dump \(no PGDMP signature\)",
        ),
        (b"PGD", "the database dump is truncated: it ends inside the header"),
        (gzip.compress(b"not a tar at all" * 100), "damaged or truncated"),
    ],
)
def test_foreign_files_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(archive.ArchiveError, match=message):
        archive.inspect(io.BytesIO(data))


def test_a_truncated_archive_is_refused() -> None:
    data = full_archive()
    with pytest.raises(archive.ArchiveError, match="damaged or truncated"):
        archive.inspect(
            io.BytesIO(data[: len(data) // 2]),
            on_dump=lambda s, n: s.read(),
            on_file=lambda m, s: s.read(),
        )


def test_a_dump_that_is_not_custom_format_is_refused() -> None:
    out = io.BytesIO()
    plain = b"-- PostgreSQL database dump\nCREATE TABLE x();\n"
    archive.write_archive(
        out,
        meta=archive.metadata(model_version="", dump_size=len(plain), database_size=0, files_size=0),
        dump=(len(plain), io.BytesIO(plain)),
        files=[],
    )
    with pytest.raises(archive.ArchiveError, match="not a pg_dump custom-format dump"):
        archive.inspect(io.BytesIO(out.getvalue()))


def test_unsafe_paths_are_refused_both_ways() -> None:
    bad = archive.FileItem("../etc/passwd", 1, lambda: io.BytesIO(b"x"))
    with pytest.raises(archive.ArchiveError, match="unsafe path"):
        archive.write_archive(io.BytesIO(), meta=None, dump=None, files=[bad])
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in ((".metadata", b"{}"), ("db/db.backup", DUMP), ("tree/../../x", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(archive.ArchiveError, match="unsafe path"):
        archive.inspect(io.BytesIO(out.getvalue()), on_dump=lambda s, n: s.read())


# --- the dump's structure -----------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 7, 4096, len(DUMP)])
def test_the_dump_checker_accepts_a_complete_dump_in_any_chunking(step: int) -> None:
    checker = archive.DumpChecker("the dump")
    for i in range(0, len(DUMP), step):
        checker.feed(DUMP[i : i + step])
    checker.finish()
    assert checker.checked
    assert (checker.toc_entries, checker.with_data, checker.seen) == (4, {3, 4}, {3, 4})


def test_a_dump_cut_anywhere_is_refused_as_truncated() -> None:
    for cut in range(len(DUMP)):
        checker = archive.DumpChecker("the dump")
        checker.feed(DUMP[:cut])
        with pytest.raises(archive.ArchiveError, match="the dump is truncated"):
            checker.finish()


def test_a_bare_dump_cut_between_data_blocks_is_refused() -> None:
    cut = DUMP[: DUMP.index(b"\x03" + _int(4))]  # everything up to the large objects' block
    with pytest.raises(archive.ArchiveError, match="the data of 1 of 2 table of contents entries is missing"):
        archive.inspect(io.BytesIO(cut), on_dump=lambda s, n: s.read())


def test_a_dump_with_a_damaged_block_is_refused() -> None:
    at = DUMP.index(b"\x01" + _int(3))
    damaged = DUMP[:at] + b"\x07" + DUMP[at + 1 :]
    with pytest.raises(archive.ArchiveError, match="damaged: an unknown block type 7"):
        archive.inspect(io.BytesIO(damaged))


def test_a_dump_from_a_newer_pg_dump_is_accepted_on_its_header_alone() -> None:
    newer = header((1, 17, 0)) + b"whatever a future pg_dump writes"
    info = archive.inspect(io.BytesIO(newer))
    assert info.dump_header.archive_version_text == "1.17.0"


# --- gzip streams ---------------------------------------------------------------------------------


def test_concatenated_gzip_members_are_one_archive() -> None:
    tar = gzip.decompress(full_archive())
    data = gzip.compress(tar[:3000]) + gzip.compress(tar[3000:]) + b"\x00" * 512
    info = archive.inspect(io.BytesIO(data), on_dump=lambda s, n: s.read())
    assert (info.kind, info.files) == ("Full", 2)


class Zeros:
    def __init__(self, n: int) -> None:
        self.left = n

    def read(self, n: int = -1, /) -> bytes:
        k = self.left if n < 0 else min(n, self.left)
        self.left -= k
        return bytes(k)


def test_a_highly_compressed_file_inflates_in_bounded_steps() -> None:
    size = 64 * 1024 * 1024
    out = io.BytesIO()
    meta = archive.metadata(model_version="1", dump_size=len(DUMP), database_size=0, files_size=size)
    big = archive.FileItem("zeros.bin", size, lambda: Zeros(size))
    archive.write_archive(out, meta=meta, dump=(len(DUMP), io.BytesIO(DUMP)), files=[big])
    assert len(out.getvalue()) < size // 500
    tracemalloc.start()
    try:
        info = archive.inspect(io.BytesIO(out.getvalue()), on_file=lambda m, s: None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.files_size == size
    assert peak < 16 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB while inflating {size / 1e6:.0f} MB"


def test_memory_does_not_grow_with_the_number_of_files() -> None:
    def peak(n: int) -> int:
        out = io.BytesIO()
        items = (archive.FileItem(f"0d/{i:07d}", 10, lambda: io.BytesIO(b"x" * 10)) for i in range(n))
        meta = archive.metadata(model_version="1", dump_size=len(DUMP), database_size=0, files_size=10 * n)
        archive.write_archive(out, meta=meta, dump=(len(DUMP), io.BytesIO(DUMP)), files=items)
        data = out.getvalue()
        tracemalloc.start()
        try:
            info = archive.inspect(io.BytesIO(data), on_file=lambda m, s: s.read())
            assert info.files == n
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(2_000), peak(20_000)
    assert large < small + 1_000_000, (small, large)


@pytest.mark.parametrize(
    ("dump_size", "files_size", "field"),
    [(len(DUMP) + 1, 403, "dumpSize"), (len(DUMP), 402, "filesSize"), (len(DUMP), "lots", "filesSize")],
)
def test_metadata_sizes_that_contradict_the_contents_are_refused_naming_the_field(
    dump_size: int, files_size: object, field: str
) -> None:
    meta = archive.metadata(model_version="1.0.0.40", dump_size=dump_size, database_size=1, files_size=0)
    meta["filesSize"] = str(files_size)
    out = io.BytesIO()
    archive.write_archive(out, meta=meta, dump=(len(DUMP), io.BytesIO(DUMP)), files=files())
    with pytest.raises(archive.ArchiveError, match=f".metadata {field}"):
        archive.inspect(io.BytesIO(out.getvalue()))
