"""Replication's pure parts: locations, the n/m summary, the Replicated condition, key moves."""

from __future__ import annotations

import datetime as dt

import pytest

from nightjar.config import OperatorConfig
from nightjar.domain.residency import default_policy
from nightjar.jobs import ReplicatePlan, StorageRef, build_replicate_job, replicate_job_name
from nightjar.reconcile.replicas import (
    ReplicaCheck,
    condition,
    initial_locations,
    location_update,
    residency_refusal,
    summary,
)
from nightjar.storage import layout
from nightjar.storage.errors import IntegrityError
from nightjar.storage.replicate import rebase

NOW = dt.datetime(2026, 11, 24, 22, 0, tzinfo=dt.UTC)
PRIMARY = {"metadata": {"name": "s3"}, "spec": {"jurisdiction": "EU"}}


def check(name: str, jurisdiction: str) -> ReplicaCheck:
    return ReplicaCheck(
        name,
        {"spec": {"jurisdiction": jurisdiction}},
        jurisdiction,
        default_policy().check("EU", jurisdiction),
    )


def test_a_completed_snapshot_is_in_the_primary_and_pending_in_each_replica() -> None:
    locs = initial_locations(PRIMARY, [check("dr", "EU"), check("dr2", "EU")], NOW)
    assert [(x["storage"], x["role"], x["state"]) for x in locs] == [
        ("s3", "Primary", "Replicated"),
        ("dr", "Replica", "Pending"),
        ("dr2", "Replica", "Pending"),
    ]
    assert summary(locs) == "1/3"
    c = condition(locs)
    assert (c["status"], c["reason"]) == ("False", "ReplicationPending")
    assert "dr: Pending waiting for the copy" in c["message"]


def test_all_locations_replicated_is_true_and_a_failure_is_named() -> None:
    locs = initial_locations(PRIMARY, [check("dr", "EU")], NOW)
    locs[1].update(state="Replicated")
    assert summary(locs) == "2/2" and condition(locs)["status"] == "True"
    locs[1].update(state="Failed", message="verification failed: x")
    c = condition(locs)
    assert (c["status"], c["reason"]) == ("False", "ReplicationFailed") and "verification failed" in c[
        "message"
    ]


def test_the_location_update_keeps_the_other_conditions_and_the_transition_time() -> None:
    earlier = "2026-11-24T21:00:00Z"
    status = {
        "conditions": [
            {"type": "Completed", "status": "True"},
            {"type": "Replicated", "status": "False", "lastTransitionTime": earlier},
        ]
    }
    locs = initial_locations(PRIMARY, [check("dr", "EU")], NOW)
    out = location_update(locs).patch(status, NOW)
    assert [c["type"] for c in out["conditions"]] == ["Completed", "Replicated"]
    assert out["conditions"][1]["lastTransitionTime"] == earlier  # still False: no transition
    assert out["locations"] == locs and out["replication"] == "1/2"
    locs[1]["state"] = "Replicated"
    after = location_update(locs).patch(status, NOW)["conditions"][1]
    assert after["lastTransitionTime"] == "2026-11-24T22:00:00Z"


def test_a_replica_refused_at_completion_is_listed_as_failed_for_good() -> None:
    locs = initial_locations(PRIMARY, [check("dr", "EU"), check("london", "UK")], NOW)
    london = locs[2]
    assert (london["state"], london["final"]) == ("Failed", True)
    assert london["message"].startswith("not copied: residency rule eu-stays-in-eu")
    assert summary(locs) == "1/3"


def test_a_refused_replica_is_named_with_its_rule() -> None:
    msg = residency_refusal([check("dr", "EU"), check("london", "UK")], "frankfurt")
    assert msg.startswith("replica london (UK) refused: residency rule eu-stays-in-eu")
    assert "no data is written to frankfurt" in msg
    assert residency_refusal([check("dr", "EU")], "frankfurt") == ""


KEY = "prod/nightjar/v1/shop/abc/uid/att/packs/000001.pack"


def test_keys_move_between_prefixes() -> None:
    assert rebase(KEY, "prod/", "dr/") == "dr/nightjar/v1/shop/abc/uid/att/packs/000001.pack"
    assert rebase(KEY, "prod/", "") == "nightjar/v1/shop/abc/uid/att/packs/000001.pack"
    with pytest.raises(IntegrityError, match="not under the storage prefix"):
        rebase(KEY, "other/", "dr/")
    assert layout.relocate(KEY, "dr", "prod/") == "dr/nightjar/v1/shop/abc/uid/att/packs/000001.pack"
    assert layout.relocate(KEY, "dr") == "dr/nightjar/v1/shop/abc/uid/att/packs/000001.pack"  # prefix unknown
    with pytest.raises(ValueError, match="not a Nightjar snapshot key"):
        layout.relocate("somewhere/else", "dr")


def storage(endpoint: str, secret: str, lock: str = "None") -> StorageRef:
    return StorageRef(endpoint, "b", "eu-1", "p/", secret, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", lock)


def test_the_replicate_job_has_both_key_pairs_by_reference_and_runs_once() -> None:
    plan = ReplicatePlan(
        backup_name="b1",
        backup_uid="u1",
        namespace="shop",
        replica_name="dr",
        attempt=2,
        primary=storage("https://primary", "primary-creds"),
        replica=storage("https://dr", "dr-creds", "Compliance"),
        primary_prefix="p/",
        manifest_key="p/nightjar/v1/shop/x/u1/a/manifest.json",
        manifest_sha256="f" * 64,
        retain_until="2027-02-24T22:00:00Z",
    )
    job = build_replicate_job(plan, OperatorConfig())
    assert job["metadata"]["name"] == replicate_job_name("b1", "dr", 2) != replicate_job_name("b1", "dr", 3)
    assert job["spec"]["backoffLimit"] == 0
    c = job["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    assert args[:2] == ["agent", "replicate"]
    assert args[args.index("--replica-lock-mode") + 1] == "Compliance"
    assert args[args.index("--retain-until") + 1] == "2027-02-24T22:00:00Z"
    secrets = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in c["env"]
        if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
    }
    assert secrets == {
        "NIGHTJAR_S3_ACCESS_KEY_ID": "primary-creds",
        "NIGHTJAR_S3_SECRET_ACCESS_KEY": "primary-creds",
        "NIGHTJAR_REPLICA_S3_ACCESS_KEY_ID": "dr-creds",
        "NIGHTJAR_REPLICA_S3_SECRET_ACCESS_KEY": "dr-creds",
    }
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert job["metadata"]["labels"]["nightjar.dev/replica"] == "dr"
    assert job["metadata"]["ownerReferences"][0]["name"] == "b1"


def test_failed_copies_back_off_and_expired_backups_are_left_to_gc() -> None:
    from nightjar.reconcile.replicas import due, expired, primary_prefix

    loc = {"attempts": 3, "lastAttemptAt": "2026-11-24T21:59:00Z"}
    assert not due(loc, NOW, 30)  # 30 * 2^2 = 120 s after the last try
    assert due(loc, NOW + dt.timedelta(seconds=61), 30)
    assert due({"attempts": 40, "lastAttemptAt": "2026-11-24T16:00:00Z"}, NOW, 300)  # capped at 6 h
    assert expired({"metadata": {"annotations": {"nightjar.dev/expires-at": "2026-11-24T21:00:00Z"}}}, NOW)
    assert not expired(
        {"metadata": {"annotations": {"nightjar.dev/expires-at": "2027-01-01T00:00:00Z"}}}, NOW
    )
    # The prefix the keys carry comes from the manifest key, whatever the storage says now.
    assert (
        primary_prefix({"storage": {"manifestKey": "old/p/nightjar/v1/ns/s/u/a/manifest.json"}}) == "old/p/"
    )
    assert primary_prefix({"storage": {"manifestKey": "nightjar/v1/ns/s/u/a/manifest.json"}}) == ""
