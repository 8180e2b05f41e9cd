"""The bucket key layout."""

from __future__ import annotations

import pytest

from nightjar.storage import layout


def test_source_id_is_stable_and_ignores_key_order() -> None:
    a = {"database": {"secretRef": {"name": "db"}}, "files": {"persistentVolumeClaim": {"claimName": "f"}}}
    b = {"files": {"persistentVolumeClaim": {"claimName": "f"}}, "database": {"secretRef": {"name": "db"}}}
    assert layout.source_id(a) == layout.source_id(b)
    assert len(layout.source_id(a)) == 16
    assert layout.source_id(a) != layout.source_id({"database": {"secretRef": {"name": "other"}}})
    assert layout.source_id(a) == layout.source_id({**a, "app": {"kind": "Deployment", "name": "shop"}})


def test_snapshot_keys_live_under_namespace_source_backup_and_attempt() -> None:
    loc = layout.SnapshotLocation(
        prefix="/team-a/", namespace="shop", source="abc", backup_uid="u1", attempt="p-1"
    )
    assert loc.backup_prefix == "team-a/nightjar/v1/shop/abc/u1/"
    assert loc.manifest == "team-a/nightjar/v1/shop/abc/u1/p-1/manifest.json"
    assert loc.db_dump.endswith("/p-1/db.dump")
    assert loc.files_index.endswith("/p-1/files.jsonl.gz")
    assert loc.pack(7).endswith("/p-1/packs/000007.pack")
    assert layout.is_manifest(loc.manifest)
    assert not layout.is_manifest(loc.db_dump)
    assert loc.manifest.startswith(layout.source_prefix("team-a", "shop", "abc"))


def test_no_prefix_means_keys_start_at_the_root() -> None:
    assert layout.backup_prefix("", "ns", "s", "u") == "nightjar/v1/ns/s/u/"


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "UPPER"])
def test_attempt_ids_cannot_escape_their_prefix(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid attempt id"):
        layout.SnapshotLocation(prefix="", namespace="n", source="s", backup_uid="u", attempt=bad)
