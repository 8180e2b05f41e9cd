"""Back up a tree of files: walk it in a fixed order, store changed files, reuse unchanged ones.

Designed for a million files: memory does not grow with the file count. The tree is walked
depth-first with each directory's entries sorted by name, which is the order of the path
component tuples; the previous snapshot's index is streamed in the same order, so deciding
whether a file is unchanged is a merge join, not a lookup table. A file whose path, size and
modification time match the previous snapshot reuses that snapshot's stored bytes without
being read (as restic does). Other files are read once and become blobs in packs
(:mod:`nightjar.storage.packs`; one S3 request per pack, not per file).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from nightjar.storage.index import Entry, read_index
from nightjar.storage.writer import IndexWriter

__all__ = ["Entry", "read_index"]


class Sink(Protocol):
    """Where the index goes: a file, or a streaming S3 upload."""

    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


def sort_key(path: str) -> list[str]:
    """The order of the walk and of the index: by path components."""
    return path.split("/")


def walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything under ``root``, in :func:`sort_key` order.

    Holds only the names of the directories on the current path (a directory's names must be
    sorted), never DirEntry or stat objects, and never the whole tree.
    """
    stack: list[tuple[str, Iterator[str]]] = [("", iter(sorted(os.listdir(root))))]
    while stack:
        rel, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        child = f"{rel}/{name}" if rel else name
        full = os.path.join(root, child)
        st = os.lstat(full)
        yield child, st
        if stat.S_ISDIR(st.st_mode):
            try:
                names_below = sorted(os.listdir(full))
            except FileNotFoundError:
                continue  # removed by the consumer meanwhile (a restore pruning it)
            stack.append((child, iter(names_below)))


class PreviousIndex:
    """Cursor over the previous snapshot's index for the merge join."""

    def __init__(self, entries: Iterator[Entry] | None) -> None:
        self.it = entries
        self.cur: Entry | None = None
        self._advance()

    def _advance(self) -> None:
        self.cur = next(self.it, None) if self.it is not None else None

    def find_key_order(self, key: str) -> Entry | None:
        """Like :meth:`find` for an S3 listing, whose order is the keys' byte order."""
        raw = key.encode()
        while self.cur is not None and self.cur.path.encode() < raw:
            self._advance()
        if self.cur is not None and self.cur.path == key:
            return self.cur
        return None

    def find(self, path: str) -> Entry | None:
        key = sort_key(path)
        while self.cur is not None and sort_key(self.cur.path) < key:
            self._advance()
        if self.cur is not None and self.cur.path == path:
            return self.cur
        return None


def back_up_tree(root: Path, index: IndexWriter, previous: PreviousIndex) -> None:
    """Store ``root`` through ``index`` (format 2): changed files read and packed, unchanged
    ones (same path, size and mtime as in the previous snapshot) referenced without reading."""
    for rel, st in walk(root):
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            index.add_dir(rel, mode)
        elif stat.S_ISLNK(st.st_mode):
            index.add_link(rel, mode, os.readlink(os.path.join(root, rel)))
        elif stat.S_ISREG(st.st_mode):
            prev = previous.find(rel)
            if (
                prev is not None
                and prev.type == "f"
                and prev.size == st.st_size
                and prev.mtime_ns == st.st_mtime_ns
                and prev.chunks is not None
            ):
                index.reuse(rel, mode, prev)
            else:
                with open(os.path.join(root, rel), "rb") as f:
                    index.add_file(rel, mode, st.st_mtime_ns, f, st.st_size)
        # sockets, fifos and devices are not app documents
