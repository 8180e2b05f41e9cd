"""Storage sync's pure parts: where a key sits in the layout, grouping a listing into one
snapshot per Backup, and what to do with each (issue 14)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from nightjar.constants import ANNOTATION_SYNCED_FROM
from nightjar.reconcile.snapshots import snapshot_prefixes, snapshot_uid
from nightjar.reconcile.sync import Action, Snapshot, Stray, decide, is_replica, snapshots
from nightjar.storage import layout
from nightjar.storage.objects import ObjectInfo

T0 = dt.datetime(2026, 11, 30, 12, tzinfo=dt.UTC)
PREFIX = "tests/shop"
BASE = "tests/shop/nightjar/v1/shop/src1/"


def info(key: str, minutes_ago: int = 0) -> ObjectInfo:
    return ObjectInfo(key, 1, last_modified=T0 - dt.timedelta(minutes=minutes_ago))


def test_parse_key_places_a_key_in_the_layout() -> None:
    k = layout.parse_key(BASE + "uid-1/pod-1/manifest.json", PREFIX)
    assert k is not None
    assert (k.namespace, k.source, k.backup_uid, k.rest) == ("shop", "src1", "uid-1", "pod-1/manifest.json")
    assert k.is_manifest and not k.is_tombstone
    assert k.backup_prefix == BASE + "uid-1/" and k.source_prefix == BASE
    tomb = layout.parse_key(BASE + "uid-1/deleted.json", PREFIX)
    assert tomb is not None and tomb.is_tombstone and not tomb.is_manifest
    pack = layout.parse_key(BASE + "uid-1/pod-1/packs/000001.pack", PREFIX)
    assert pack is not None and not pack.is_manifest


@pytest.mark.parametrize(
    "key",
    [
        "tests/shop/other/thing.txt",  # outside the layout's root
        "tests/shop/nightjar/v1/shop/src1/uid-1",  # no key below the Backup's prefix
        "tests/shop/nightjar/v1/shop/src1/",
        "tests/shop/nightjar/v1/../src1/uid/x",
        "elsewhere/nightjar/v1/shop/src1/uid/p/manifest.json",  # another storage prefix
    ],
)
def test_keys_outside_the_layout_are_not_snapshots(key: str) -> None:
    assert layout.parse_key(key, PREFIX) is None


def test_a_manifest_is_an_attempts_manifest_only() -> None:
    k = layout.parse_key(BASE + "uid-1/pod-1/packs/manifest.json", PREFIX)
    assert k is not None and not k.is_manifest


def test_a_listing_groups_into_one_snapshot_per_backup_with_strays_apart() -> None:
    listing = [
        info(BASE + "uid-1/pod-a/packs/000001.pack", 30),
        info(BASE + "uid-1/pod-a/manifest.json", 29),
        info(BASE + "uid-1/pod-b/manifest.json", 20),
        info(BASE + "uid-2/pod-c/packs/000001.pack", 5),
        info("tests/shop/nightjar/v1/shop/stray.txt"),
        info(BASE + "uid-3/deleted.json", 1),
        info(BASE + "uid-3/pod-d/manifest.json", 50),
    ]
    out = list(snapshots(listing, PREFIX))
    snaps = [s for s in out if isinstance(s, Snapshot)]
    assert [s.uid for s in snaps] == ["uid-1", "uid-2", "uid-3"]
    assert [s.key for s in out if isinstance(s, Stray)] == ["tests/shop/nightjar/v1/shop/stray.txt"]
    one, two, three = snaps
    assert one.manifest == BASE + "uid-1/pod-b/manifest.json" and one.keys == 3
    assert one.newest == T0 - dt.timedelta(minutes=20)
    assert not two.manifests and two.keys == 1
    assert three.tombstone and three.manifest


def _snap(manifest: bool = True, tombstone: bool = False, age_min: int = 60) -> Snapshot:
    where = layout.parse_key(BASE + "uid-1/p/manifest.json", PREFIX)
    assert where is not None
    return Snapshot(
        where,
        manifests=[BASE + "uid-1/p/manifest.json"] if manifest else [],
        tombstone=tombstone,
        newest=T0 - dt.timedelta(minutes=age_min),
        keys=1,
    )


GRACE = dt.timedelta(minutes=30)
FUTURE, PAST = T0 + dt.timedelta(days=1), T0 - dt.timedelta(seconds=1)


@pytest.mark.parametrize(
    ("snap", "live", "expires", "sync", "want"),
    [
        (_snap(), True, PAST, True, Action.LIVE),  # a Backup stands for it: GC goes through it
        (_snap(), False, FUTURE, True, Action.RECREATE),
        (_snap(), False, FUTURE, False, Action.KEEP),  # sync off (or a replica): only swept
        (_snap(tombstone=True), False, FUTURE, True, Action.KEEP),  # deleted on purpose
        (_snap(), False, PAST, True, Action.DELETE_EXPIRED),
        (_snap(tombstone=True), False, PAST, True, Action.DELETE_EXPIRED),
        (_snap(manifest=False, age_min=10), False, None, True, Action.WAIT),
        (_snap(manifest=False, age_min=31), False, None, True, Action.DELETE_LEFTOVERS),
    ],
)
def test_what_sync_does_with_each_snapshot(
    snap: Snapshot, live: bool, expires: dt.datetime | None, sync: bool, want: Action
) -> None:
    assert decide(snap, live, expires, T0, GRACE, sync) is want


def _backup(uid: str, synced: str = "") -> dict[str, object]:
    meta: dict[str, object] = {"name": "b", "namespace": "shop", "uid": uid}
    if synced:
        meta["annotations"] = {ANNOTATION_SYNCED_FROM: synced}
    return {"metadata": meta, "spec": {"source": {"database": {"secretRef": {"name": "db"}}}}}


def test_a_synced_backup_stands_for_the_uid_and_keys_of_the_snapshot_it_was_made_from() -> None:
    synced = BASE + "old-uid/pod-1/manifest.json"
    b = _backup("new-uid", synced)
    assert snapshot_prefixes(b, PREFIX) is None  # not adopted (verified) by the operator yet
    b["status"] = {"phase": "Completed", "storage": {"manifestKey": synced}}
    assert snapshot_uid(b) == "old-uid"
    assert snapshot_prefixes(b, PREFIX) == (BASE + "old-uid/", BASE)
    # In a replica with its own prefix, the same layout under that prefix.
    assert snapshot_prefixes(b, "dr") == ("dr/nightjar/v1/shop/src1/old-uid/", "dr/nightjar/v1/shop/src1/")
    plain = _backup("new-uid")
    assert snapshot_uid(plain) == "new-uid"
    sid = layout.source_id({"database": {"secretRef": {"name": "db"}}})
    got = snapshot_prefixes(plain, PREFIX)
    assert got is not None and got[0] == f"tests/shop/nightjar/v1/shop/{sid}/new-uid/"


def test_a_storage_listed_as_anothers_replica_is_a_replica() -> None:
    primary = {"metadata": {"name": "primary"}, "spec": {"replicas": [{"name": "dr"}]}}
    dr = {"metadata": {"name": "dr"}, "spec": {}}
    assert is_replica(dr, [primary, dr]) and not is_replica(primary, [primary, dr])


def test_grouping_a_listing_streams_memory_stays_flat_in_the_number_of_snapshots() -> None:
    import tracemalloc

    def listing(n: int) -> Iterator[ObjectInfo]:
        for i in range(n):
            for leaf in ("p/packs/000001.pack", "p/packs/000002.pack", "p/manifest.json"):
                yield ObjectInfo(f"{BASE}uid-{i:07d}/{leaf}", 1, last_modified=T0)

    def peak(n: int) -> int:
        tracemalloc.start()
        count = sum(1 for s in snapshots(listing(n), PREFIX) if isinstance(s, Snapshot))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert count == n
        return top

    small, large = peak(1_000), peak(50_000)
    assert large < small * 2, (small, large)
