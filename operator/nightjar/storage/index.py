"""The file index of a snapshot (``files.jsonl.gz``): one JSON line per entry, in path order.

Short keys keep a million-file index small: ``p`` path, ``t`` type (``f`` file, ``d``
directory, ``l`` symlink), ``m`` mode, and for files ``s`` size, ``mt`` mtime (ns), ``h``
sha256, ``k`` pack key, ``o`` offset in the pack (format 1) or ``c`` its chunk references (format 2: see
:class:`nightjar.storage.packs.ChunkRef`); ``l`` a symlink's target. Format 1 stores the index
gzip-compressed as one object; format 2 stores the plain lines as deduplicated chunks.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from nightjar.storage.packs import ChunkRef


@dataclass
class Entry:
    """One line of ``files.jsonl.gz``."""

    path: str
    type: str  # "f" file, "d" directory, "l" symlink
    mode: int
    size: int = 0
    mtime_ns: int = 0
    sha256: str = ""
    pack: str = ""
    offset: int = 0
    target: str = ""
    #: Format 2: where the file's bytes are (one blob, or several for a large file).
    chunks: list[ChunkRef] | None = None
    #: The line this entry was read from (an unchanged file's line is written again as it is).
    raw: str = field(default="", repr=False, compare=False)

    @property
    def where(self) -> tuple[str, int]:
        """(pack, offset) of the file's first stored byte: the order to read contents in."""
        if self.chunks:
            return self.chunks[0].pack, self.chunks[0].offset
        return self.pack, self.offset

    @property
    def stored_end(self) -> int:
        """Offset just past the file's (last) stored bytes in its pack."""
        if self.chunks:
            return self.chunks[-1].offset + self.chunks[-1].stored
        return self.offset + self.size

    def to_json(self) -> str:
        d: dict[str, Any] = {"p": self.path, "t": self.type, "m": self.mode}
        if self.type == "f" and self.chunks is not None:
            d.update(s=self.size, mt=self.mtime_ns, h=self.sha256, c=[c.to_list() for c in self.chunks])
        elif self.type == "f":
            d.update(s=self.size, mt=self.mtime_ns, h=self.sha256, k=self.pack, o=self.offset)
        elif self.type == "l":
            d["l"] = self.target
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Entry:
        d = json.loads(line)
        return cls(
            path=d["p"],
            type=d["t"],
            mode=d["m"],
            size=d.get("s", 0),
            mtime_ns=d.get("mt", 0),
            sha256=d.get("h", ""),
            pack=d.get("k", ""),
            offset=d.get("o", 0),
            target=d.get("l", ""),
            chunks=[ChunkRef.from_list(c) for c in d["c"]] if "c" in d else None,
            raw=line.rstrip("\n"),
        )


def read_lines(lines: Iterator[bytes]) -> Iterator[Entry]:
    """Entries of an uncompressed index (format 2), from its lines."""
    for raw in lines:
        if raw.strip():
            yield Entry.from_json(raw.decode())


def read_index(stream: IO[bytes]) -> Iterator[Entry]:
    with gzip.GzipFile(fileobj=stream, mode="rb") as gz:
        for raw in io.TextIOWrapper(gz, encoding="utf-8"):
            if raw.strip():
                yield Entry.from_json(raw)
