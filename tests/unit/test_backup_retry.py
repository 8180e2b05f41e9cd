"""A finished backup Job whose snapshot cannot be verified *now* is retried, not failed.

Driven against the in-memory Kubernetes of tests/fakes.py and the real storage seam (``S3Store``)
over a stub boto3 client, so an S3 503 goes through the same botocore-to-StorageError
translation as in production; the clock is fixed and moved by hand.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import uuid
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from nightjar.config import OperatorConfig
from nightjar.reconcile.backup import BackupReconciler
from nightjar.reconcile.backup_taken import ANNOTATION_TEST_VERIFY_DELAY
from nightjar.reconcile.errors import Retry
from nightjar.reconcile.status import StatusConflict
from nightjar.storage.objects import S3Store
from tests.fakes import NOW, FakeClock, FakeKube
from tests.unit.test_metrics import a_backup, fmt

MANIFEST = b'{"snapshot": "snap-1"}'
KEY = "nightjar/v1/ns/src/uid-b1/snap-1/manifest.json"
FINISHED = NOW - dt.timedelta(seconds=5)


class S3Stub:
    """boto3's get_object: raises ``fail`` while it is set, else serves ``body``."""

    def __init__(self, body: bytes = MANIFEST) -> None:
        self.body = body
        self.fail: Exception | None = None
        self.calls = 0

    def get_object(self, **_: Any) -> dict[str, Any]:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return {"Body": io.BytesIO(self.body)}


def slow_down() -> ClientError:
    return ClientError(
        {
            "Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
            "ResponseMetadata": {"HTTPStatusCode": 503},
        },
        "GetObject",
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def s3() -> S3Stub:
    return S3Stub()


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()


def setup(kube: FakeKube, clock: FakeClock, s3: S3Stub) -> tuple[str, BackupReconciler, dict[str, Any]]:
    n = f"r-{uuid.uuid4().hex[:8]}"
    kube.add(
        "backupstorages",
        {
            "metadata": {"name": "s3", "namespace": n},
            "spec": {"endpoint": "http://s3:9000", "bucket": "b", "credentials": {"secretName": "s3"}},
        },
    )
    kube.add_secret(n, "s3", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y")
    kube.add(
        "backups", a_backup(n, phase="Running", attempts=1, sourceId="src", jobName="nightjar-backup-b1")
    )
    kube.results = [
        {
            "manifestKey": KEY,
            "manifestSha256": hashlib.sha256(MANIFEST).hexdigest(),
            "snapshotId": "snap-1",
            "createdOn": fmt(NOW - dt.timedelta(seconds=60)),
            "sizeUncompressedBytes": 1000,
            "objects": 3,
        }
    ]
    job = {
        "metadata": {"name": "nightjar-backup-b1", "namespace": n},
        "status": {
            "succeeded": 1,
            "completionTime": fmt(FINISHED),
            "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": fmt(FINISHED)}],
        },
    }
    kube.jobs[(n, "nightjar-backup-b1")] = job
    rec = BackupReconciler(
        kube, OperatorConfig(), clock=clock, open_store=lambda target: S3Store(target, client=s3)
    )
    return n, rec, job


def status(kube: FakeKube, n: str) -> dict[str, Any]:
    return dict(kube.objects[("backups", n, "b1")]["status"])


def test_a_503_while_verifying_keeps_the_backup_running_and_says_it_retries(
    kube: FakeKube, clock: FakeClock, s3: S3Stub
) -> None:
    n, rec, job = setup(kube, clock, s3)
    s3.fail = slow_down()

    with pytest.raises(Retry) as retry:
        rec.sync_from_job(kube.get("backups", n, "b1") or {}, job)

    st = status(kube, n)
    assert st["phase"] == "Running"
    assert st["message"].startswith(
        "storage unreachable while verifying the snapshot: reading "
        f"{KEY}: SlowDown Please reduce your request rate.; retrying in 10 s (until "
    )
    assert "1 h after the Job finished" in st["message"]
    (cond,) = st["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Retrying", "True", "StorageUnavailable")
    assert retry.value.delay == 10
    assert kube.reasons("b1") == ["VerificationRetrying"]

    # Still down 30 s later: still Running, a longer wait, no second Event.
    clock.current = NOW + dt.timedelta(seconds=30)
    with pytest.raises(Retry) as retry:
        rec.sync_from_job(kube.get("backups", n, "b1") or {}, job)
    assert retry.value.delay == 35 and "retrying in 35 s" in status(kube, n)["message"]
    assert kube.reasons("b1") == ["VerificationRetrying"]

    # S3 answers again: Completed, the Retrying condition gone.
    s3.fail = None
    clock.current = NOW + dt.timedelta(seconds=70)
    rec.sync_from_job(kube.get("backups", n, "b1") or {}, job)
    st = status(kube, n)
    assert st["phase"] == "Completed", st
    assert st["conditions"][0]["type"] == "Completed"
    assert "Retrying" not in [c["type"] for c in st["conditions"]]
    assert kube.reasons("b1") == ["VerificationRetrying", "Completed"]


def test_the_retry_sweep_follows_the_job_again_when_the_next_try_is_due(
    kube: FakeKube, clock: FakeClock, s3: S3Stub
) -> None:
    """Job events are not retried by kopf: the sweep is what tries again."""
    n, rec, job = setup(kube, clock, s3)
    s3.fail = EndpointConnectionError(endpoint_url="http://s3:9000")
    with pytest.raises(Retry):
        rec.sync_from_job(kube.get("backups", n, "b1") or {}, job)  # the Job event, at NOW
    assert "cannot connect to the S3 endpoint; retrying in 10 s" in status(kube, n)["message"]
    calls = s3.calls

    clock.current = NOW + dt.timedelta(seconds=9)
    assert rec.retry_sweep([kube.get("backups", n, "b1")]) == []
    assert s3.calls == calls  # not due: nothing read

    clock.current = NOW + dt.timedelta(seconds=10)
    assert rec.retry_sweep([kube.get("backups", n, "b1")]) == [f"{n}/b1"]
    assert s3.calls > calls and status(kube, n)["phase"] == "Running"
    assert "retrying in 15 s" in status(kube, n)["message"]

    s3.fail = None
    clock.current = NOW + dt.timedelta(seconds=25)
    rec.retry_sweep([kube.get("backups", n, "b1")])
    assert status(kube, n)["phase"] == "Completed"


def test_a_lost_job_event_is_followed_by_the_sweep_after_it_settles(
    kube: FakeKube, clock: FakeClock, s3: S3Stub
) -> None:
    n, rec, _job = setup(kube, clock, s3)
    clock.current = FINISHED + dt.timedelta(seconds=14)
    assert rec.retry_sweep([kube.get("backups", n, "b1")]) == []
    clock.current = FINISHED + dt.timedelta(seconds=15)
    assert rec.retry_sweep([kube.get("backups", n, "b1")]) == [f"{n}/b1"]
    assert status(kube, n)["phase"] == "Completed"


def test_still_unreachable_an_hour_after_the_job_finished_fails_and_says_so(
    kube: FakeKube, clock: FakeClock, s3: S3Stub
) -> None:
    n, rec, job = setup(kube, clock, s3)
    s3.fail = slow_down()
    clock.current = FINISHED + dt.timedelta(hours=1)
    rec.sync_from_job(kube.get("backups", n, "b1") or {}, job)
    st = status(kube, n)
    assert st["phase"] == "Failed"
    assert st["message"].startswith(
        "snapshot verification failed: storage unreachable for 1 h after the Job finished: reading "
    )
    assert st["conditions"][0]["reason"] == "VerificationTimedOut"


@pytest.mark.parametrize(
    ("fail", "body", "message"),
    [
        (
            ClientError(
                {"Error": {"Code": "NoSuchKey"}, "ResponseMetadata": {"HTTPStatusCode": 404}}, "GetObject"
            ),
            MANIFEST,
            f"snapshot verification failed: reading {KEY}: NoSuchKey",
        ),
        (
            None,
            b"something else",
            f"snapshot verification failed: manifest {KEY} does not match what the agent wrote",
        ),
        (
            ClientError(
                {"Error": {"Code": "InvalidAccessKeyId"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
                "GetObject",
            ),
            MANIFEST,
            f"snapshot verification failed: reading {KEY}: access denied (InvalidAccessKeyId); "
            "check the credentials Secret",
        ),
    ],
    ids=["manifest 404", "digest mismatch", "credentials refused"],
)
def test_a_permanent_error_fails_the_backup_at_once(
    kube: FakeKube, clock: FakeClock, s3: S3Stub, fail: Exception | None, body: bytes, message: str
) -> None:
    n, rec, job = setup(kube, clock, s3)
    s3.fail, s3.body = fail, body
    rec.sync_from_job(kube.get("backups", n, "b1") or {}, job)
    st = status(kube, n)
    assert st["phase"] == "Failed"
    assert st["message"] == message
    assert st["conditions"][0]["reason"] == "VerificationFailed"


def test_a_secret_not_there_yet_is_retried(kube: FakeKube, clock: FakeClock, s3: S3Stub) -> None:
    n, rec, job = setup(kube, clock, s3)
    kube.secrets.clear()  # the storage's credentials Secret is not there (yet)
    with pytest.raises(Retry):
        rec.sync_from_job(kube.get("backups", n, "b1") or {}, job)
    st = status(kube, n)
    assert st["phase"] == "Running"
    assert st["message"].startswith(
        'something it needs is not there (yet) while verifying the snapshot: Secret "s3" not found'
    )


def test_a_conflict_on_the_status_write_is_retried_and_the_backup_completes(
    kube: FakeKube, clock: FakeClock, s3: S3Stub
) -> None:
    kube.fail("patch_status", 409)  # 409 on the first write, then success
    n, rec, job = setup(kube, clock, s3)
    rec.sync_from_job(kube.get("backups", n, "b1") or {}, job)
    assert status(kube, n)["phase"] == "Completed"
    assert kube.reasons("b1") == ["Completed"]


def test_a_status_write_that_keeps_conflicting_is_never_lost(
    kube: FakeKube, clock: FakeClock, s3: S3Stub
) -> None:
    kube.fail("patch_status", *[409] * 5)  # every one of the writer's five tries conflicts
    n, rec, job = setup(kube, clock, s3)
    with pytest.raises(StatusConflict, match="kept changing"):
        rec.sync_from_job(kube.get("backups", n, "b1") or {}, job)
    assert status(kube, n)["phase"] == "Running"
    # No Retrying condition was written: the sweep follows the Job again once it settled.
    clock.current = FINISHED + dt.timedelta(seconds=15)
    assert rec.retry_sweep([kube.get("backups", n, "b1")]) == [f"{n}/b1"]
    assert status(kube, n)["phase"] == "Completed"
    assert kube.reasons("b1") == ["Completed"]


def test_the_test_hook_holds_the_verification_only_with_test_hooks_on(
    kube: FakeKube, clock: FakeClock, s3: S3Stub, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, rec, job = setup(kube, clock, s3)
    kube.objects[("backups", n, "b1")]["metadata"]["annotations"][ANNOTATION_TEST_VERIFY_DELAY] = "20"
    monkeypatch.setenv("NIGHTJAR_TEST_HOOKS", "1")
    with pytest.raises(Retry, match="held 15 s") as retry:
        rec.sync_from_job(kube.get("backups", n, "b1") or {}, job)
    assert retry.value.delay == 15 and s3.calls == 0 and status(kube, n)["phase"] == "Running"
    monkeypatch.delenv("NIGHTJAR_TEST_HOOKS")
    rec.sync_from_job(kube.get("backups", n, "b1") or {}, job)
    assert status(kube, n)["phase"] == "Completed"
