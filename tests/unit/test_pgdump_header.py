"""Parsing pg_dump custom-format headers (1.14 as PostgreSQL 12-15 write, 1.15+ as 16+ write)."""

from __future__ import annotations

import pytest

from nightjar.domain.pgdump import NeedMoreBytes, NotACustomDump, parse_header


def _int(v: int) -> bytes:
    return (b"\x01" if v < 0 else b"\x00") + abs(v).to_bytes(4, "little")


def _str(s: str) -> bytes:
    raw = s.encode()
    return _int(len(raw)) + raw


def header(version: tuple[int, int, int] = (1, 14, 0), fmt: int = 1) -> bytes:
    out = b"PGDMP" + bytes(version) + b"\x04\x08" + bytes([fmt])
    out += b"\x03" if version[1] >= 15 else _int(-1)
    out += b"".join(_int(v) for v in (7, 18, 3, 3, 11, 126, 0))  # 2026-12-03 03:18:07
    return (
        out + _str("shop") + _str("15.18 (Debian 15.18-0+deb12u1)") + _str("15.18 (Debian 15.18-0+deb12u1)")
    )


def test_parses_a_pg15_header() -> None:
    h = parse_header(header() + b"rest of the archive")
    assert h.archive_version_text == "1.14.0"
    assert h.database == "shop"
    assert h.server_version.startswith("15.18")
    assert h.pg_dump_version.startswith("15.18")
    assert h.compression == "gzip (default)"
    assert h.created is not None
    assert (h.created.year, h.created.month, h.created.day, h.created.hour, h.created.minute) == (
        2026,
        12,
        3,
        3,
        18,
    )
    assert h.mendix_compatible


def test_parses_a_pg16_header_with_an_algorithm_byte() -> None:
    h = parse_header(header((1, 15, 0)))
    assert h.compression == "zstd"
    assert not h.mendix_compatible


def test_refuses_other_files_with_a_clear_reason() -> None:
    with pytest.raises(NotACustomDump, match="no PGDMP signature"):
        parse_header(b"PK\x03\x04 a zip file")
    with pytest.raises(NotACustomDump, match="not the custom format"):
        parse_header(header(fmt=3))
    with pytest.raises(NeedMoreBytes):
        parse_header(header()[:20])
