"""A Restore whose storage does not answer *before* its Job is retried, not failed (issue 15).

Across namespaces the operator reads the snapshot's manifest to hand the Job presigned URLs: an
S3 outage at that moment once failed the Restore for good ("Refused"). Now a transient error is
retried with capped backoff and said in status, a permanent one fails at once, and a transient
one that outlasts the deadline fails saying so; nothing was changed in any of these cases.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from nightjar.config import OperatorConfig
from nightjar.reconcile import restore as restore_rec
from nightjar.reconcile.errors import Retry
from nightjar.reconcile.restore import RestoreReconciler
from tests.fakes import FakeClock, FakeKube
from tests.memstore import MemoryStore

KEY = "nightjar/v1/shop/src/uid-b1/snap-1/manifest.json"
MANIFEST = b'{"formatVersion": 2, "objects": []}'


def setup(clock: FakeClock) -> tuple[FakeKube, MemoryStore, RestoreReconciler, dict[str, Any]]:
    kube, store = FakeKube(), MemoryStore("bk")
    store.put(KEY, MANIFEST)
    storage = {
        "metadata": {"name": "s3", "namespace": "shop"},
        "spec": {
            "endpoint": "http://s3.test",
            "bucket": "bk",
            "credentials": {"secretName": "s3"},
            "allowedRestoreNamespaces": ["staging"],
        },
    }
    kube.add("backupstorages", storage)
    kube.add_secret("shop", "s3", AWS_ACCESS_KEY_ID="a", AWS_SECRET_ACCESS_KEY="b")
    kube.add_secret("staging", "db", uri="postgresql://x")
    kube.add(
        "backups",
        {
            "metadata": {"name": "b1", "namespace": "shop"},
            "spec": {"storageRef": {"name": "s3"}, "contents": "DatabaseOnly", "source": {}},
            "status": {
                "phase": "Completed",
                "storage": {"manifestKey": KEY, "manifestSha256": hashlib.sha256(MANIFEST).hexdigest()},
            },
        },
    )
    restore = kube.add(
        "restores",
        {
            "metadata": {"name": "r1", "namespace": "staging"},
            "spec": {
                "backupRef": {"name": "b1", "namespace": "shop"},
                "contents": "DatabaseOnly",
                "target": {"database": {"secretRef": {"name": "db"}}},
            },
        },
    )
    rec = RestoreReconciler(kube, OperatorConfig(), clock=clock, open_store=lambda target: store)
    return kube, store, rec, restore


def status(kube: FakeKube) -> dict[str, Any]:
    return kube.status_of("restores", "staging", "r1")


def test_storage_down_before_the_job_is_retried_then_the_job_starts() -> None:
    clock = FakeClock()
    kube, store, rec, restore = setup(clock)
    store.down = "cannot connect to the S3 endpoint"
    with pytest.raises(Retry) as retry:
        rec.reconcile(restore)
    st = status(kube)
    assert st["phase"] == "Queued" and retry.value.delay == 10
    assert "cannot connect to the S3 endpoint; retrying in 10 s" in st["message"]
    (cond,) = [c for c in st["conditions"] if c["type"] == "Retrying"]
    assert cond["reason"] == "StorageUnavailable"
    assert kube.reasons("r1") == ["Queued", "Retrying"] and kube.created_jobs == []

    clock.advance(30)  # still down: a longer wait, the same condition (its time kept), no new Event
    with pytest.raises(Retry) as retry:
        rec.reconcile(kube.get("restores", "staging", "r1") or {})
    assert retry.value.delay == 30
    (again,) = [c for c in status(kube)["conditions"] if c["type"] == "Retrying"]
    assert again["lastTransitionTime"] == cond["lastTransitionTime"]
    assert kube.reasons("r1") == ["Queued", "Retrying"]

    store.down = ""
    clock.advance(30)
    rec.reconcile(kube.get("restores", "staging", "r1") or {})
    assert [j["metadata"]["name"] for j in kube.created_jobs] == ["nightjar-restore-r1"]
    assert status(kube)["message"] == "restore Job created"
    # The presigned-URL Secret went to the target namespace, for exactly this Restore.
    assert [o["metadata"]["name"] for o in kube.made if o["kind"] == "Secret"] == ["nightjar-restore-r1"]


def test_storage_down_past_the_deadline_fails_and_changes_nothing() -> None:
    clock = FakeClock()
    kube, store, rec, restore = setup(clock)
    store.down = "cannot connect to the S3 endpoint"
    with pytest.raises(Retry):
        rec.reconcile(restore)
    clock.advance(restore_rec.RETRY_DEADLINE.total_seconds())
    rec.reconcile(kube.get("restores", "staging", "r1") or {})
    st = status(kube)
    assert st["phase"] == "Failed" and st["targetState"] == "Unchanged"
    assert "cannot connect" in st["message"] and "still failing 15 min after the first try" in st["message"]
    assert "Retrying" not in [c["type"] for c in st["conditions"]] and "nextRetryAt" not in st
    assert kube.created_jobs == []


def test_a_manifest_gone_from_the_bucket_fails_at_once() -> None:
    clock = FakeClock()
    kube, store, rec, restore = setup(clock)
    store.objects.pop(KEY)
    rec.reconcile(restore)
    st = status(kube)
    assert st["phase"] == "Failed" and st["targetState"] == "Unchanged"
    assert KEY in st["message"] and st["message"].endswith("nothing was changed")
    assert st["conditions"][-1]["reason"] == "ObjectMissing"
    assert kube.created_jobs == []


def test_an_api_server_error_while_planning_is_retried() -> None:
    clock = FakeClock()
    kube, _store, rec, restore = setup(clock)
    kube.fail("secret_data", 503)  # the target database Secret cannot be read right now
    with pytest.raises(Retry):
        rec.reconcile(restore)
    assert status(kube)["phase"] == "Queued"
    assert status(kube)["message"] == "Kubernetes API: 503 injected; retrying in 10 s"
    clock.advance(10)
    rec.reconcile(kube.get("restores", "staging", "r1") or {})
    assert len(kube.created_jobs) == 1
