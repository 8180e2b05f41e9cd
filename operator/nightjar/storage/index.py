"""The file index of a snapshot (``files.jsonl.gz``): one JSON line per entry, in path order.

Short keys keep a million-file index small: ``p`` path, ``t`` type (``f`` file, ``d``
directory, ``l`` symlink), ``m`` mode, and for files ``s`` size, ``mt`` mtime (ns), ``h``
sha256, ``k`` pack key, ``o`` offset in the pack; ``l`` a symlink's target.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any


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

    def to_json(self) -> str:
        d: dict[str, Any] = {"p": self.path, "t": self.type, "m": self.mode}
        if self.type == "f":
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
        )


def read_index(stream: IO[bytes]) -> Iterator[Entry]:
    with gzip.GzipFile(fileobj=stream, mode="rb") as gz:
        for raw in io.TextIOWrapper(gz, encoding="utf-8"):
            if raw.strip():
                yield Entry.from_json(raw)
