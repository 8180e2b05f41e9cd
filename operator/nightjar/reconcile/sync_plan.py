"""What a storage sync pass decides, from a listing alone: the bucket's keys grouped into one
Backup's snapshot each (or strays), and what to do with each. Pure: no client, no clock."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from nightjar.domain.retention import format_time
from nightjar.storage import layout
from nightjar.storage.objects import ObjectInfo


@dataclass
class Snapshot:
    """One Backup's keys in the bucket, as listed (consecutive: they share a prefix)."""

    where: layout.SnapshotKey
    manifests: list[str] = field(default_factory=list)
    tombstone: bool = False
    newest: dt.datetime | None = None
    keys: int = 0

    @property
    def uid(self) -> str:
        return self.where.backup_uid

    @property
    def manifest(self) -> str:
        """The manifest it stands for: the last attempt's (a retried Job's first attempt may also
        have finished)."""
        return self.manifests[-1] if self.manifests else ""


@dataclass(frozen=True)
class Stray:
    """A key under the namespace's prefix that is not in Nightjar's layout."""

    key: str


def snapshots(infos: Iterable[ObjectInfo], prefix: str) -> Iterator[Snapshot | Stray]:
    """Group a listing (sorted by key, as S3 lists) into one Snapshot per Backup uid."""
    cur: Snapshot | None = None
    for info in infos:
        where = layout.parse_key(info.key, prefix)
        if where is None:
            yield Stray(info.key)
            continue
        if cur is None or cur.where.backup_prefix != where.backup_prefix:
            if cur is not None:
                yield cur
            cur = Snapshot(where)
        cur.keys += 1
        if where.is_manifest:
            cur.manifests.append(info.key)
        elif where.is_tombstone:
            cur.tombstone = True
        if info.last_modified is not None and (cur.newest is None or info.last_modified > cur.newest):
            cur.newest = info.last_modified
    if cur is not None:
        yield cur


class Action(Enum):
    LIVE = "a Backup stands for it"
    WAIT = "an attempt's leftovers, within the grace period"
    DELETE_LEFTOVERS = "an attempt's leftovers without a manifest, past the grace period"
    DELETE_EXPIRED = "expired, and no Backup stands for it"
    KEEP = "kept until its expiry"
    RECREATE = "re-create its Backup"


def decide(
    snap: Snapshot,
    live: bool,
    expires: dt.datetime | None,
    now: dt.datetime,
    grace: dt.timedelta,
    sync: bool,
) -> Action:
    """What to do with one snapshot (pure). ``expires``: its manifest's expiry (None when there is
    no manifest)."""
    if live:
        return Action.LIVE
    if not snap.manifests:
        if snap.newest is None or now - snap.newest < grace:
            return Action.WAIT
        return Action.DELETE_LEFTOVERS
    if expires is not None and expires <= now:
        return Action.DELETE_EXPIRED
    if snap.tombstone or not sync:
        return Action.KEEP
    return Action.RECREATE


@dataclass
class SyncReport:
    snapshots: int = 0
    created: list[str] = field(default_factory=list)
    expired_deleted: int = 0
    leftovers_deleted: int = 0
    skipped: int = 0
    error: str = ""
    #: Why snapshots of an encrypting storage could not be re-created in this pass (its key
    #: Secret is missing or bad); the rest of the pass goes on.
    key_problem: str = ""

    def status(self, now: dt.datetime) -> dict[str, Any]:
        msg = self.error or (
            f"{self.snapshots} snapshots; re-created {len(self.created)} Backups, deleted "
            f"{self.expired_deleted} expired and {self.leftovers_deleted} leftover snapshots"
            + (f", skipped {self.skipped}" if self.skipped else "")
            + (f" (cannot read their manifests: {self.key_problem})" if self.key_problem else "")
        )
        return {
            "lastSyncTime": format_time(now),
            "snapshots": self.snapshots,
            "created": len(self.created),
            "expiredDeleted": self.expired_deleted,
            "leftoversDeleted": self.leftovers_deleted,
            "skipped": self.skipped,
            "message": msg[:1024],
        }


def is_replica(storage: dict[str, Any], storages: Iterable[dict[str, Any]]) -> bool:
    name = storage["metadata"]["name"]
    return any(
        name in [r.get("name") for r in (s.get("spec") or {}).get("replicas") or []]
        for s in storages
        if s["metadata"]["name"] != name
    )
