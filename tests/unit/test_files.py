"""Walking, packing and reusing files: order, merge join, packing and memory-flat design."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path

import pytest

from nightjar.agent import files as f
from nightjar.storage import layout
from nightjar.storage.manifest import Manifest
from nightjar.storage.packs import PACK_TARGET, WHOLE_FILE
from nightjar.storage.snapshot import SnapshotReader
from nightjar.storage.writer import SnapshotWriter
from tests.memstore import MemoryStore


def snapshot(root: Path, attempt: str, store: MemoryStore, previous: str = "") -> tuple[str, Manifest]:
    loc = layout.SnapshotLocation("", "ns", "src", "uid-" + attempt, attempt)
    prev = SnapshotReader(store, previous) if previous else None
    w = SnapshotWriter(store, loc, previous=prev.m if prev else None)
    index = w.index()
    f.back_up_tree(root, index, f.PreviousIndex(prev.entries() if prev else None))
    files = index.finish()
    key, _, m = w.commit(
        created=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        expires=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
        database=None,
        files=files,
        backup={},
        source="src",
        contents="Full",
        model_version="",
    )
    return key, m


def tree(root: Path) -> None:
    (root / "a").mkdir()
    (root / "a" / "b").mkdir()
    (root / "a.b").write_text("dot")
    (root / "a" / "b" / "x").write_text("x")
    (root / "a" / "y").write_text("y")
    (root / "z").write_bytes(b"z" * (WHOLE_FILE + 1))
    (root / "empty").mkdir()
    os.symlink("a/y", root / "ln")


def test_walk_order_is_path_component_order(tmp_path: Path) -> None:
    tree(tmp_path)
    paths = [p for p, _ in f.walk(tmp_path)]
    assert paths == ["a", "a/b", "a/b/x", "a/y", "a.b", "empty", "ln", "z"]
    assert paths == sorted(paths, key=f.sort_key)


def test_small_files_share_a_pack_and_a_large_file_is_cut_into_chunks(tmp_path: Path) -> None:
    tree(tmp_path)
    store = MemoryStore()
    key, m = snapshot(tmp_path, "a1", store)
    assert m.files is not None and (m.files.count, m.files.dirs) == (4, 3)
    reader = SnapshotReader(store, key)
    entries = {e.path: e for e in reader.entries()}
    packs = {c.pack for p in ("a/b/x", "a/y", "a.b") for c in entries[p].chunks or []}
    assert len(packs) == 1
    assert len(entries["z"].chunks or []) >= 2  # larger than one blob: content-defined chunks
    assert entries["ln"].type == "l" and entries["ln"].target == "a/y"
    assert entries["empty"].type == "d"
    for e, stream in reader.contents(iter(entries.values())):
        if stream is not None:
            data = b"".join(iter(lambda s=stream: s.read(1 << 20), b""))
            assert hashlib.sha256(data).hexdigest() == e.sha256
            assert data == (tmp_path / e.path).read_bytes()
    # "z" is one byte repeated: compressed to almost nothing
    assert store.stored_bytes() < 100_000


def test_unchanged_files_are_reused_without_reading_and_changed_ones_are_stored(tmp_path: Path) -> None:
    tree(tmp_path)
    store = MemoryStore()
    key1, m1 = snapshot(tmp_path, "a1", store)
    (tmp_path / "a" / "y").write_text("changed")
    (tmp_path / "a" / "new").write_text("new")
    _key2, m2 = snapshot(tmp_path, "a2", store, previous=key1)
    assert m2.files is not None
    assert m2.files.reused_files == 3  # a/b/x, a.b, z
    assert m2.files.uploaded_bytes == len("changed") + len("new")
    shared = {o.key for o in m1.objects} & {o.key for o in m2.objects}
    assert shared  # z still lives in the first snapshot's pack, listed (and locked) by the second


def test_packs_are_cut_at_the_target_size(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(os.urandom(PACK_TARGET // 3))
    store = MemoryStore()
    _key, m = snapshot(tmp_path, "a1", store)
    packs = [o for o in m.objects if "/packs/" in o.key]
    assert all(o.bytes <= PACK_TARGET + 64 * 1024 for o in packs)
    assert len(packs) == 3  # two of file contents, then one with the index


def test_previous_index_cursor_only_moves_forward() -> None:
    entries = iter([f.Entry("a", "d", 0o755), f.Entry("a/b", "f", 0o644), f.Entry("c", "f", 0o644)])
    prev = f.PreviousIndex(entries)
    assert prev.find("a/a") is None
    found = prev.find("a/b")
    assert found is not None
    assert found.path == "a/b"
    assert prev.find("b") is None
    found_c = prev.find("c")
    assert found_c is not None
    assert prev.find("d") is None


def test_read_ahead_keeps_walk_order_and_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(f, "BATCH_FILES", 3)
    monkeypatch.setattr(f, "READ_AHEAD_FILES", 5)
    src = tmp_path / "src"
    src.mkdir()
    tree(src)
    for i in range(40):  # many batches, interleaved with directories and a large file
        d = src / f"d{i % 4}"
        d.mkdir(exist_ok=True)
        (d / f"f{i:02d}").write_bytes(os.urandom(i * 37))
    store = MemoryStore()
    key, _ = snapshot(src, "a1", store)
    reader = SnapshotReader(store, key)
    got = []
    for e, stream in reader.contents(reader.entries()):
        got.append(e.path)
        if stream is not None:
            assert stream.read(-1) == (src / e.path).read_bytes(), e.path
    assert got == [p for p, _ in f.walk(src)]


def test_a_read_error_stops_the_backup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree(tmp_path)
    real = f._read_small

    def failing(path: str) -> f.Read:
        if path.endswith("a/y"):
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(f, "_read_small", failing)
    with pytest.raises(PermissionError, match="a/y"):
        snapshot(tmp_path, "a1", MemoryStore())
