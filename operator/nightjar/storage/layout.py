"""Where everything lives in a bucket: the one module that knows the key layout.

    <prefix>nightjar/v1/<namespace>/<source>/<backup-uid>/<attempt>/
        manifest.json       written last: a snapshot exists only once this does
    <prefix>nightjar/v1/<namespace>/<source>/<backup-uid>/deleted.json
                            a tombstone: its Backup was deleted on purpose while Object Lock kept
                            objects; storage sync never brings it back
        db.dump             pg_dump custom format (-Fc -O -x)
        files.jsonl.gz      one line per file, sorted (path, size, mode, mtime, sha256, where)
        packs/000001.pack   file contents, many small files per object; a large file alone

* ``<namespace>`` keeps tenants apart (a bucket policy can grant one prefix per tenant).
* ``<source>`` is a stable hash of the Backup's ``spec.source``: snapshots of the same data share
  content, and only they are consulted to decide whether content is still referenced.
* ``<backup-uid>/<attempt>``: each attempt writes under its own prefix, so nothing is ever
  overwritten (Object Lock) and a failed attempt's objects are found by listing the Backup's
  prefix.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

ROOT = "nightjar/v1"
MANIFEST = "manifest.json"
DB_DUMP = "db.dump"
FILES_INDEX = "files.jsonl.gz"
PACKS = "packs"
TOMBSTONE = "deleted.json"

_SNAPSHOT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def source_id(source: dict[str, Any]) -> str:
    """Stable 16-hex id of the data a ``spec.source`` names: its database and files.

    Key order does not matter, and neither does ``app`` (it only says where the model version
    comes from), so backups with and without it share content.
    """
    data = {k: v for k, v in source.items() if k in ("database", "files")}
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def normalize_prefix(prefix: str) -> str:
    p = prefix.strip("/")
    return f"{p}/" if p else ""


@dataclass(frozen=True)
class SnapshotLocation:
    """The keys of one snapshot attempt."""

    prefix: str
    namespace: str
    source: str
    backup_uid: str
    attempt: str

    def __post_init__(self) -> None:
        if not _SNAPSHOT_ID.match(self.attempt):
            raise ValueError(f"invalid attempt id {self.attempt!r}")

    @property
    def backup_prefix(self) -> str:
        """Everything any attempt of this Backup wrote lives under this prefix."""
        return backup_prefix(self.prefix, self.namespace, self.source, self.backup_uid)

    @property
    def base(self) -> str:
        return f"{self.backup_prefix}{self.attempt}/"

    @property
    def manifest(self) -> str:
        return self.base + MANIFEST

    @property
    def db_dump(self) -> str:
        return self.base + DB_DUMP

    @property
    def files_index(self) -> str:
        return self.base + FILES_INDEX

    def pack(self, n: int) -> str:
        return f"{self.base}{PACKS}/{n:06d}.pack"


def backup_prefix(prefix: str, namespace: str, source: str, backup_uid: str) -> str:
    return f"{normalize_prefix(prefix)}{ROOT}/{namespace}/{source}/{backup_uid}/"


def source_prefix(prefix: str, namespace: str, source: str) -> str:
    """All snapshots of one source: the ones that may share content."""
    return f"{normalize_prefix(prefix)}{ROOT}/{namespace}/{source}/"


def relocate(key: str, to_prefix: str, from_prefix: str | None = None) -> str:
    """The same object's key in a storage with prefix ``to_prefix`` (a replica keeps the primary's
    layout under its own prefix). ``from_prefix``, when known, is stripped; otherwise everything
    before the layout's root is."""
    if from_prefix is not None and key.startswith(from_prefix):
        rel = key[len(from_prefix) :]
    else:
        at = key.find(ROOT + "/")
        if at < 0:
            raise ValueError(f"{key} is not a Nightjar snapshot key")
        rel = key[at:]
    return normalize_prefix(to_prefix) + rel


def is_manifest(key: str) -> bool:
    return key.endswith("/" + MANIFEST)


@dataclass(frozen=True)
class SnapshotKey:
    """Where a key sits in the layout: under ``root`` (the storage prefix), the ``namespace``,
    ``source`` and ``backup_uid`` it belongs to, and ``rest`` below the Backup's prefix."""

    root: str
    namespace: str
    source: str
    backup_uid: str
    rest: str

    @property
    def backup_prefix(self) -> str:
        return f"{self.root}{ROOT}/{self.namespace}/{self.source}/{self.backup_uid}/"

    @property
    def source_prefix(self) -> str:
        return f"{self.root}{ROOT}/{self.namespace}/{self.source}/"

    @property
    def is_manifest(self) -> bool:
        """The manifest of an attempt (``<attempt>/manifest.json``), not any file of that name."""
        parts = self.rest.split("/")
        return len(parts) == 2 and parts[1] == MANIFEST and bool(_SNAPSHOT_ID.match(parts[0]))

    @property
    def is_tombstone(self) -> bool:
        return self.rest == TOMBSTONE


_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


def parse_key(key: str, prefix: str) -> SnapshotKey | None:
    """The layout position of ``key`` in a storage with ``prefix``, or None when it is not under
    ``<prefix>nightjar/v1/<namespace>/<source>/<backup-uid>/`` (not a Nightjar snapshot key)."""
    root = normalize_prefix(prefix)
    head = f"{root}{ROOT}/"
    if not key.startswith(head):
        return None
    parts = key[len(head) :].split("/", 3)
    if len(parts) != 4 or not parts[3] or not all(_PART.match(p) for p in parts[:3]):
        return None
    return SnapshotKey(root, parts[0], parts[1], parts[2], parts[3])


def namespace_prefix(prefix: str, namespace: str) -> str:
    """Every snapshot of one namespace in a storage."""
    return f"{normalize_prefix(prefix)}{ROOT}/{namespace}/"
