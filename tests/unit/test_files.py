"""Walking, packing and reusing files: order, merge join, packing and memory-flat design."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

from nightjar.agent import files as f


class MemoryObject:
    """An in-memory object sink with the writer interface (sha256, size, close)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.closed = False

    def write(self, data: bytes) -> int:
        return self.buf.write(data)

    def close(self) -> None:
        self.closed = True

    @property
    def size(self) -> int:
        return len(self.buf.getvalue())

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.buf.getvalue()).hexdigest()


class Store:
    def __init__(self) -> None:
        self.objects: dict[str, MemoryObject] = {}
        self.stored: list[f.StoredObject] = []

    def open_object(self, n: int) -> tuple[str, Any]:
        key = f"packs/{n:06d}"
        self.objects[key] = MemoryObject()
        return key, self.objects[key]

    def packer(self) -> f.Packer:
        return f.Packer(open_object=self.open_object, on_object=self.stored.append)


def tree(root: Path) -> None:
    (root / "a").mkdir()
    (root / "a" / "b").mkdir()
    (root / "a.b").write_text("dot")
    (root / "a" / "b" / "x").write_text("x")
    (root / "a" / "y").write_text("y")
    (root / "z").write_bytes(b"z" * (f.LARGE_FILE + 1))
    (root / "empty").mkdir()
    os.symlink("a/y", root / "ln")


def test_walk_order_is_path_component_order(tmp_path: Path) -> None:
    tree(tmp_path)
    paths = [p for p, _ in f.walk(tmp_path)]
    assert paths == ["a", "a/b", "a/b/x", "a/y", "a.b", "empty", "ln", "z"]
    assert paths == sorted(paths, key=f.sort_key)


def test_small_files_share_a_pack_and_a_large_file_gets_its_own(tmp_path: Path) -> None:
    tree(tmp_path)
    store = Store()
    out = io.BytesIO()
    stats = f.back_up_tree(tmp_path, out, store.packer(), f.PreviousIndex(None), lambda e: None)
    assert (stats.files, stats.dirs) == (4, 3)
    entries = {e.path: e for e in f.read_index(io.BytesIO(out.getvalue()))}
    assert entries["a/b/x"].pack == entries["a/y"].pack == entries["a.b"].pack
    assert entries["z"].pack != entries["a/y"].pack
    assert entries["ln"].type == "l"
    assert entries["ln"].target == "a/y"
    assert entries["empty"].type == "d"
    for e in entries.values():
        if e.type == "f":
            data = store.objects[e.pack].buf.getvalue()[e.offset : e.offset + e.size]
            assert (
                hashlib.sha256(data).hexdigest()
                == e.sha256
                == hashlib.sha256((tmp_path / e.path).read_bytes()).hexdigest()
            )
    assert all(o.closed for o in store.objects.values())
    assert len(store.stored) == 2


def test_unchanged_files_are_reused_without_reading_and_changed_ones_are_stored(tmp_path: Path) -> None:
    tree(tmp_path)
    first, out1 = Store(), io.BytesIO()
    f.back_up_tree(tmp_path, out1, first.packer(), f.PreviousIndex(None), lambda e: None)
    (tmp_path / "a" / "y").write_text("changed")
    (tmp_path / "a" / "new").write_text("new")
    second, out2, reused = Store(), io.BytesIO(), []
    prev = f.PreviousIndex(f.read_index(io.BytesIO(out1.getvalue())))
    stats = f.back_up_tree(tmp_path, out2, second.packer(), prev, reused.append)
    assert stats.reused_files == 3  # a/b/x, a.b, z
    assert sorted(e.path for e in reused) == ["a.b", "a/b/x", "z"]
    assert stats.uploaded_bytes == len("changed") + len("new")
    entries = {e.path: e for e in f.read_index(io.BytesIO(out2.getvalue()))}
    assert entries["z"].pack in first.objects  # still points at the first snapshot's pack


def test_packs_are_cut_at_the_target_size(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(bytes([i]) * (f.LARGE_FILE - 1))
    store = Store()
    f.back_up_tree(tmp_path, io.BytesIO(), store.packer(), f.PreviousIndex(None), lambda e: None)
    assert all(o.size <= f.PACK_TARGET for o in store.objects.values())
    assert len(store.objects) == 2


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
