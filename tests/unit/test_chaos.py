"""The fault-injection run's pure parts: the seeded schedule, the independent snapshot check (on the
in-memory store) and the invariants over fabricated observations."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from nightjar.devstack.chaos.invariants import (
    BackupSeen,
    Content,
    RestoreSeen,
    check_backups,
    check_restores,
    find_orphans,
    rebase,
    verifiable_attempt,
    verify_snapshot,
)
from nightjar.devstack.chaos.plan import (
    INVARIANTS,
    FaultKind,
    Pace,
    Tally,
    Violation,
    lane_rng,
    plan_faults,
    table,
)
from nightjar.storage import layout
from nightjar.storage.manifest import Database, Manifest, StoredObject, Stream
from nightjar.storage.objects import StorageError
from tests.memstore import MemoryStore

PREFIX = "chaos"
SRC = layout.source_prefix(PREFIX, "ns1", "src1")


# --- the schedule ---------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    assert plan_faults(7, 40) == plan_faults(7, 40)
    assert plan_faults(7, 40) != plan_faults(8, 40)


def test_every_kind_is_injected_about_equally_often() -> None:
    faults = plan_faults(1, 200)
    assert [f.index for f in faults] == list(range(200))
    counts = Counter(f.kind for f in faults)
    assert set(counts) == set(FaultKind)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_a_schedule_shorter_than_the_kinds_has_no_kind_twice() -> None:
    kinds = [f.kind for f in plan_faults(3, 4)]
    assert len(kinds) == len(set(kinds)) == 4


def test_waits_and_holds_stay_in_the_pace() -> None:
    pace = Pace(wait=(1.0, 2.0), hold=(3.0, 4.0))
    for f in plan_faults(5, 100, pace):
        assert 1.0 <= f.wait <= 2.0 and 3.0 <= f.hold <= 4.0


def test_only_the_kinds_asked_for() -> None:
    faults = plan_faults(2, 10, kinds=[FaultKind.OPERATOR_KILL])
    assert {f.kind for f in faults} == {FaultKind.OPERATOR_KILL}


def test_a_negative_count_or_no_kinds_is_refused() -> None:
    with pytest.raises(ValueError, match="count"):
        plan_faults(1, -1)
    with pytest.raises(ValueError, match="kinds"):
        plan_faults(1, 3, kinds=[])


def test_lanes_choose_independently_but_replayably() -> None:
    a, b = lane_rng(9, 0), lane_rng(9, 1)
    first = [a.random() for _ in range(5)]
    assert first != [b.random() for _ in range(5)]
    again = lane_rng(9, 0)
    assert [again.random() for _ in range(5)] == first


def test_the_table_counts_faults_operations_and_violations_and_names_the_seed() -> None:
    tally = Tally()
    tally.ops["backups Completed"] = 12
    tally.faults[FaultKind.POSTGRES] = 3
    tally.skipped[FaultKind.AGENT_POD] = 1
    tally.seconds["faults"] = 61.4
    out = table(
        42,
        tally,
        [Violation("no-orphans", "b/k1", "x"), Violation("no-orphans", "b/k2", "y")],
        faults_wanted=4,
    )
    lines = out.splitlines()
    assert "make chaos CHAOS_SEED=42 CHAOS_FAULTS=4" in out
    assert any(line.split() == ["backups", "Completed", "12"] for line in lines)
    assert any(line.split()[-1:] == ["3"] and "PostgreSQL restart" in line for line in lines)
    assert any("1 tries found nothing" in line and "agent Pod killed" in line for line in lines)
    assert "faults injected (3 of 4 planned)" in out
    assert "invariant violations (must be 0): 2" in out
    assert any(line.split() == ["no-orphans", "2"] for line in lines)
    assert any(line.split() == ["backup-terminal", "0"] for line in lines)
    assert all(any(line.split()[:1] == [inv] for line in lines) for inv in INVARIANTS)


# --- the snapshot check ---------------------------------------------------------------------


def snapshot(mem: MemoryStore, uid: str, blobs: dict[str, bytes], prefix: str = "") -> tuple[str, str]:
    """A snapshot of Backup ``uid``: its objects and its manifest; returns (key, manifest sha256)."""
    objects = []
    for name, data in blobs.items():
        key = f"{SRC}{uid}/att1/packs/{name}"
        mem.put(prefix + key, data)
        objects.append(StoredObject(key, len(data), hashlib.sha256(data).hexdigest()))
    m = Manifest(
        snapshot_id="att1",
        created_on="2026-11-29T03:00:00Z",
        expires_on="2027-11-29T03:00:00Z",
        objects=objects,
        database=Database(Stream(bytes=1, sha256="")),
    )
    key = f"{SRC}{uid}/att1/manifest.json"
    body = m.to_bytes()
    mem.put(prefix + key, body)
    return key, hashlib.sha256(body).hexdigest()


def test_a_complete_snapshot_verifies() -> None:
    mem = MemoryStore()
    key, sha = snapshot(mem, "u1", {"000001.pack": b"abc", "000002.pack": b"defg"})
    assert verify_snapshot(mem, key, sha) == ""
    assert verify_snapshot(mem, key) == ""


def test_a_missing_object_a_changed_byte_or_a_wrong_size_is_named() -> None:
    mem = MemoryStore()
    key, sha = snapshot(mem, "u1", {"000001.pack": b"abc", "000002.pack": b"defg"})
    pack = f"{SRC}u1/att1/packs/000002.pack"
    mem.objects[pack] = b"defG"
    assert "does not match its sha256" in verify_snapshot(mem, key, sha)
    mem.objects[pack] = b"defgh"
    assert "has 5 bytes, the manifest says 4" in verify_snapshot(mem, key, sha)
    del mem.objects[pack]
    assert verify_snapshot(mem, key, sha) == f"{pack} (listed by {key}) is missing"


def test_a_manifest_missing_other_than_recorded_or_unparsable_is_named() -> None:
    mem = MemoryStore()
    key, sha = snapshot(mem, "u1", {"000001.pack": b"abc"})
    assert "differs from the digest" in verify_snapshot(mem, key, "0" * 64)
    mem.objects[key] = b"{not json"
    assert "does not parse" in verify_snapshot(mem, key)
    del mem.objects[key]
    assert verify_snapshot(mem, key, sha) == f"manifest {key} is missing"


def test_an_unreachable_store_is_no_verdict() -> None:
    mem = MemoryStore()
    key, sha = snapshot(mem, "u1", {"000001.pack": b"abc"})
    mem.down = "connection refused"
    with pytest.raises(StorageError, match="connection refused"):
        verify_snapshot(mem, key, sha)


def test_a_replica_copy_is_checked_under_its_own_prefix() -> None:
    mem = MemoryStore()
    where = rebase(PREFIX, "chaos-dr")
    primary_key, sha = snapshot(mem, "u1", {"000001.pack": b"abc"})
    replica_key = where(primary_key)
    assert replica_key.startswith("chaos-dr/nightjar/v1/ns1/")
    mem.put(replica_key, mem.objects.pop(primary_key))
    pack = f"{SRC}u1/att1/packs/000001.pack"
    mem.put(where(pack), mem.objects.pop(pack))
    assert verify_snapshot(mem, primary_key, sha, where) == ""
    assert "is missing" in verify_snapshot(mem, primary_key, sha)
    assert where("elsewhere/key") == "elsewhere/key"


def test_a_failed_backups_keys_with_a_verifiable_manifest_are_found() -> None:
    mem = MemoryStore()
    key, _ = snapshot(mem, "u1", {"000001.pack": b"abc"})
    assert verifiable_attempt(mem, f"{SRC}u1/", PREFIX) == key
    mem.put(f"{SRC}u2/att1/packs/000001.pack", b"leftover without a manifest")
    assert verifiable_attempt(mem, f"{SRC}u2/", PREFIX) == ""
    del mem.objects[f"{SRC}u1/att1/packs/000001.pack"]
    assert verifiable_attempt(mem, f"{SRC}u1/", PREFIX) == ""


# --- the invariants -------------------------------------------------------------------------


def kinds(violations: list[Violation]) -> list[str]:
    return [v.invariant for v in violations]


def test_good_backups_violate_nothing() -> None:
    seen = [
        BackupSeen("ns/a", "Completed", "ok", jobs=1, max_jobs_at_once=1, verify="", replica=""),
        BackupSeen("ns/b", "Failed", "pg_dump: connection refused", jobs=1, max_jobs_at_once=1),
        BackupSeen("ns/c", "Completed", exists=False, expired=True, jobs=1),
        BackupSeen("ns/d", "Failed", "BackupStorage s3 missing"),  # failed before any Job
    ]
    assert check_backups(seen) == []


@pytest.mark.parametrize(
    ("seen", "invariant"),
    [
        (BackupSeen("ns/a", "Running", "retrying in 40 s"), "backup-terminal"),
        (BackupSeen("ns/a", ""), "backup-terminal"),
        (BackupSeen("ns/a", "Completed", exists=False, verify=""), "backup-terminal"),
        (BackupSeen("ns/a", "Failed", "  "), "failed-has-reason"),
        (
            BackupSeen("ns/a", "Completed", jobs=2, max_jobs_at_once=1, verify="", replica=""),
            "one-job-per-backup",
        ),
        (
            BackupSeen("ns/a", "Completed", jobs=1, max_jobs_at_once=2, verify="", replica=""),
            "one-job-per-backup",
        ),
        (BackupSeen("ns/a", "Completed", verify="k is missing", replica=""), "completed-verifies"),
        (BackupSeen("ns/a", "Completed", verify=None, replica=""), "completed-verifies"),
        (BackupSeen("ns/a", "Failed", "verify: 503", verifiable="m.json"), "failed-not-verifiable"),
        (BackupSeen("ns/a", "Completed", verify="", replica="not replicated"), "replica-verifies"),
        (BackupSeen("ns/a", "Completed", expired=True, exists=True), "expired-collected"),
    ],
)
def test_each_backup_invariant_is_caught(seen: BackupSeen, invariant: str) -> None:
    found = check_backups([seen])
    assert kinds(found) == [invariant]
    assert found[0].resource == "ns/a"


def test_an_object_is_owned_by_a_live_backups_keys_or_by_a_manifest_listing_it() -> None:
    keys = [
        f"{SRC}live/att1/manifest.json",
        f"{SRC}live/att2/packs/000001.pack",  # a failed attempt of a live Backup: its own
        f"{SRC}gone/att1/packs/000001.pack",  # a deleted Backup's, shared with a live snapshot
        f"{SRC}gone/att1/packs/000002.pack",  # a deleted Backup's, no longer used
        f"{PREFIX}/nightjar/v1/ns1/stray-key",  # not in the layout
    ]
    shared = {f"{SRC}gone/att1/packs/000001.pack"}
    assert find_orphans(keys, PREFIX, {"live"}, shared) == [keys[3], keys[4]]
    assert find_orphans(keys, PREFIX, set(), set()) == keys


A, B, STALE = Content("db-a", "files-a"), Content("db-b", "files-b"), Content("db-stale", "files-stale")


def restore(phase: str, state: str, after: Content) -> RestoreSeen:
    return RestoreSeen("ns/r1", "b001", phase, state, "msg", expected=A, before=STALE, after=after)


def test_truthful_restores_violate_nothing() -> None:
    assert (
        check_restores(
            [
                restore("Completed", "", A),
                restore("Failed", "Unchanged", STALE),
                restore("Failed", "PartiallyRestored", Content("db-a", "files-half")),
            ]
        )
        == []
    )


@pytest.mark.parametrize(
    ("seen", "says"),
    [
        (restore("Completed", "", B), "the database differs and the files differs"),
        (restore("Completed", "", Content("db-a", "files-b")), "the files differs"),
        (restore("Failed", "Unchanged", Content("db-a", "files-stale")), "reported Unchanged, but"),
        (restore("Failed", "PartiallyRestored", STALE), "reported PartiallyRestored, but"),
        (restore("Failed", "Unknown", STALE), "in fact database as before, files as before"),
        (restore("Failed", "", A), "in fact database the Backup's, files the Backup's"),
        (
            restore("Failed", "Unknown", Content("db-stale", "files-half")),
            "in fact database as before, files neither as before nor the Backup's",
        ),
        (restore("Running", "", STALE), "never finished"),
    ],
)
def test_each_untruthful_restore_is_caught(seen: RestoreSeen, says: str) -> None:
    (v,) = check_restores([seen])
    assert v.invariant == "restore-truthful" and v.resource == "ns/r1"
    assert says in v.detail
