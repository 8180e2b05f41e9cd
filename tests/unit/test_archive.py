"""Mendix-format archives: streamed writing, validation of uploads, round trips."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pytest

from nightjar import archive
from tests.unit.test_pgdump_header import header

DUMP = header() + b"\x00" * 5000  # a custom-format header and some body


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


def test_round_trip_gives_back_the_dump_and_the_same_paths_and_bytes() -> None:
    got_files: dict[str, bytes] = {}
    got_dump = io.BytesIO()
    info = archive.inspect(
        io.BytesIO(full_archive()),
        on_dump=lambda s, n: got_dump.write(s.read()),
        on_file=lambda p, s, n: got_files.__setitem__(p, s.read()),
    )
    assert info.kind == "Full"
    assert info.metadata["modelVersion"] == "1.0.0.40"
    assert info.dump_header.server_version.startswith("15.")
    assert (info.files, info.files_size, info.dump_size) == (2, 403, len(DUMP))
    assert got_dump.getvalue() == DUMP
    assert got_files == {f.path: f.open().read() for f in files()}


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
            on_file=lambda p, s, n: s.read(),
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
