"""Orders of a snapshot's file entries, with bounded memory. Pure: no clients.

* Path order (``sort_key``) is the order of a file index (``files.jsonl.gz``); an archive's
  ``tree/`` may come in any order (GNU tar stores a directory's entries as the file system lists
  them), so an upload sorts its entries.
* Storage order (pack, offset) is the order to read contents in: one sequential GET per pack.
  A taken snapshot's packs are written in path order, so the two mostly agree; an upload's
  packs follow the archive's order, and reading those in path order would cost one ranged GET
  per file. Downloads (and anything else that may read in any order) use :func:`storage_order`
  when :func:`scan` says path order would jump around.

Sorting holds ``run`` entries in memory; beyond one run, sorted runs are spilled as gzip JSON
lines to anonymous temporary files and merged. Only entries (path, size, digest, where) ever
touch the disk, never file contents: a million entries spill about 40 MB.
"""

from __future__ import annotations

import gzip
import heapq
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from nightjar.agent.files import sort_key
from nightjar.archive import ArchiveError
from nightjar.storage.index import Entry, read_index

#: Entries sorted in memory at a time.
RUN = 20_000
DIR_MODE = 0o755
#: Forward gaps inside a pack that a reader skips instead of opening a new GET (snapshot.py's).
SKIP_LIMIT = 4 * 1024 * 1024


class ExternalSorter:
    """Entries in, the same entries out ordered by ``key``; memory bounded by ``run`` entries."""

    def __init__(self, key: Callable[[Entry], Any], run: int = RUN) -> None:
        self.key = key
        self.run = run
        self.buf: list[Entry] = []
        self.runs: list[IO[bytes]] = []
        self.count = 0

    def add(self, entry: Entry) -> None:
        self.buf.append(entry)
        self.count += 1
        if len(self.buf) >= self.run:
            self._spill()

    def _spill(self) -> None:
        self.buf.sort(key=self.key)
        f = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close(), after the merge
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=1) as gz:
            for e in self.buf:
                gz.write(e.to_json().encode() + b"\n")
        f.seek(0)
        self.runs.append(f)
        self.buf = []

    def sorted(self) -> Iterator[Entry]:
        if not self.runs:
            self.buf.sort(key=self.key)
            yield from self.buf
            return
        if self.buf:
            self._spill()
        yield from heapq.merge(*(read_index(f) for f in self.runs), key=self.key)

    def close(self) -> None:
        for f in self.runs:
            f.close()
        self.runs = []
        self.buf = []


class IndexSorter(ExternalSorter):
    """Path order for an index. A path that comes twice is an error (a tar may append a second
    copy of a member: which one is meant cannot be known)."""

    def __init__(self, run: int = RUN) -> None:
        super().__init__(lambda e: sort_key(e.path), run)

    def sorted(self) -> Iterator[Entry]:
        last = None
        for e in super().sorted():
            if e.path == last:
                raise ArchiveError(f"tree/{e.path} is in the archive twice")
            last = e.path
            yield e


def with_directories(entries: Iterable[Entry]) -> Iterator[Entry]:
    """Add a directory entry before the first entry under each directory, as the index of a
    taken snapshot has them; ``entries`` must be in path order. A path that is both a file and
    a directory is an error."""
    open_dirs: list[str] = []
    last = ""
    for e in entries:
        parts = e.path.split("/")
        parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
        while open_dirs and (len(open_dirs) > len(parents) or open_dirs[-1] != parents[len(open_dirs) - 1]):
            open_dirs.pop()
        for d in parents[len(open_dirs) :]:
            if d == last:
                raise ArchiveError(f"tree/{d} is both a file and a directory")
            open_dirs.append(d)
            yield Entry(d, "d", DIR_MODE)
        last = e.path
        yield e


@dataclass
class Scan:
    """What one pass over an index (in path order) tells about reading its files."""

    files: int = 0
    bytes: int = 0
    empty_dirs: int = 0
    symlinks: int = 0
    #: New GETs a reader in path order opens (a pack change, a backward or long forward jump).
    reopens: int = 0
    packs: set[str] = field(default_factory=set)

    @property
    def sequential(self) -> bool:
        """Path order reads the packs (nearly) front to back: no need to reorder."""
        return self.reopens <= 2 * len(self.packs) + 16


def scan(entries: Iterable[Entry]) -> Scan:
    out = Scan()
    open_dir: str | None = None
    pack, pos = "", 0
    for e in entries:
        if open_dir is not None and not e.path.startswith(open_dir + "/"):
            out.empty_dirs += 1
        open_dir = None
        if e.type == "d":
            open_dir = e.path
        elif e.type == "l":
            out.symlinks += 1
        elif e.type == "f":
            out.files += 1
            out.bytes += e.size
            if e.size:
                where, offset = e.where
                out.packs.add(where)
                if where != pack or not 0 <= offset - pos <= SKIP_LIMIT:
                    out.reopens += 1
                pack, pos = where, e.stored_end
    if open_dir is not None:
        out.empty_dirs += 1
    return out


def storage_order(entries: Iterable[Entry], run: int = RUN) -> Iterator[Entry]:
    """The regular files among ``entries`` in the order their bytes are stored."""
    sorter = ExternalSorter(lambda e: e.where, run)
    try:
        for e in entries:
            if e.type == "f":
                sorter.add(e)
        yield from sorter.sorted()
    finally:
        sorter.close()
