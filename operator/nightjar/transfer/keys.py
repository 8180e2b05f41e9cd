"""``nightjar keys status``: which encryption key ids the live snapshots of a storage still need.

A key may leave the Secret only when no live snapshot needs it (snapshots are never
re-encrypted: Object Lock forbids rewriting them). The answer comes from the public part of each
Completed Backup's manifest (the key ids of its objects), so it needs no key itself.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nightjar.kube import Kube
from nightjar.storage.errors import IntegrityError
from nightjar.storage.manifest import PublicManifest
from nightjar.storage.objects import StorageError
from nightjar.transfer.cluster import Storage
from nightjar.transfer.resources import list_backups


@dataclass
class KeyStatus:
    secret: str
    in_secret: list[str]
    current: str
    #: key id → how many live snapshots need it
    needed: Counter[str] = field(default_factory=Counter)
    snapshots: int = 0
    unencrypted: int = 0
    unreadable: list[str] = field(default_factory=list)

    def rows(self) -> list[list[str]]:
        ids = sorted(set(self.in_secret) | set(self.needed))
        return [
            [
                kid,
                "yes" if kid in self.in_secret else "MISSING",
                "yes" if kid == self.current else "",
                str(self.needed.get(kid, 0)),
                _verdict(kid, self),
            ]
            for kid in ids
        ]


def _verdict(kid: str, s: KeyStatus) -> str:
    if kid not in s.in_secret:
        return "put it back: these snapshots cannot be restored without it"
    if kid == s.current:
        return "current: new backups use it"
    if not s.needed.get(kid):
        return "no live snapshot needs it: it may be removed"
    return "keep"


def status(kube: Kube, namespace: str, storage: Storage, name: str) -> KeyStatus:
    ring = storage.keyring
    result = KeyStatus(
        secret=ring.secret if ring else "",
        in_secret=sorted(ring.keys) if ring else [],
        current=ring.current if ring else "",
    )
    store = storage.target.store()
    for b in list_backups(kube, namespace):
        st: dict[str, Any] = b.get("status") or {}
        if (b.get("spec") or {}).get("storageRef", {}).get("name") != name or st.get("phase") != "Completed":
            continue
        key = (st.get("storage") or {}).get("manifestKey")
        if not key:
            continue
        try:
            ids = PublicManifest.parse(store.read(key)).key_ids()
        except (StorageError, IntegrityError) as e:
            result.unreadable.append(f"{b['metadata']['name']}: {e}")
            continue
        result.snapshots += 1
        if not ids:
            result.unencrypted += 1
        result.needed.update(ids)
    return result
