"""Every phase transition of a Backup and every class of error, through ``BackupReconciler``.

Driven with the one fake of the Kubernetes API (tests/fakes.py), a clock moved by hand and the
in-memory object store (tests/memstore.py), one per bucket. Snapshots in the store are written
by the real ``SnapshotWriter``, so verification, adoption and deletion read what the agent
writes. Nothing of the code under test is replaced, except ``storage.store_of``: the
reachability checks (``storage.unreachable``, used by replication and GC) do not take the
injected ``open_store`` and would otherwise reach for a real S3 endpoint.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import pytest

from nightjar.config import OperatorConfig
from nightjar.constants import (
    ANNOTATION_EXPIRES_AT,
    ANNOTATION_KEEP,
    ANNOTATION_SYNCED_FROM,
    FINALIZER,
    LABEL_BACKUP,
    LABEL_FINISHED,
)
from nightjar.domain.retention import format_time
from nightjar.reconcile import deletion as deletion_mod
from nightjar.reconcile import status
from nightjar.reconcile.backup import BackupReconciler
from nightjar.reconcile.backup_taken import VERIFY_DEADLINE
from nightjar.reconcile.errors import Retry
from nightjar.reconcile.gc import gc_sweep
from nightjar.storage import layout
from nightjar.storage.objects import ObjectStore, S3Target
from nightjar.storage.writer import SnapshotWriter
from tests.fakes import NOW, FakeClock, FakeKube, workload
from tests.memstore import MemoryStore

NS = "shop"
SOURCE = {"database": {"secretRef": {"name": "db"}}}
SID = layout.source_id(SOURCE)
JOB = "nightjar-backup-b1"
FINISHED = NOW - dt.timedelta(seconds=5)


def fmt(t: dt.datetime) -> str:
    return format_time(t)


def a_storage(
    name: str, bucket: str, jurisdiction: str = "EU", replicas: tuple[str, ...] = ()
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "endpoint": f"http://{name}.test",
            "bucket": bucket,
            "credentials": {"secretName": f"{name}-creds"},
            "jurisdiction": jurisdiction,
            "replicas": [{"name": r} for r in replicas],
        },
    }


def write_snapshot(store: MemoryStore, loc: layout.SnapshotLocation) -> tuple[str, str]:
    """A database-only snapshot as the agent writes it; returns (manifest key, its sha256)."""
    w = SnapshotWriter(store, loc, workers=1)
    dump = w.dump_stream()
    dump.write(b"PGDMP" + bytes(range(256)) * 8)
    db = w.database(dump, pg_dump_version="16", server_version="16", archive_version="1.15", dbname="shop")
    key, digest, _ = w.commit(
        created=NOW - dt.timedelta(minutes=10),
        expires=NOW + dt.timedelta(days=90),
        database=db,
        files=None,
        backup={"name": "b0", "namespace": loc.namespace},
        source=loc.source,
        contents="DatabaseOnly",
        model_version="7.1",
    )
    return key, digest


class World:
    """A namespace with the BackupStorage "s3" (bucket "bk"), its credentials, the database
    Secret, and a BackupReconciler on it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, replicas: tuple[str, ...] = ()) -> None:
        self.kube = FakeKube()
        self.clock = FakeClock()
        self.config = OperatorConfig()
        self.stores: dict[str, MemoryStore] = {}
        self.add_storage("s3", "bk", replicas=replicas)
        self.kube.add_secret(NS, "db", uri="postgresql://db/shop")
        self.rec = BackupReconciler(self.kube, self.config, clock=self.clock, open_store=self.open_store)

    def open_store(self, target: S3Target) -> ObjectStore:
        return self.stores[target.bucket]

    def gc(self, now: dt.datetime, finalize: Any = None) -> Any:
        return gc_sweep(self.kube, now, finalize, self.open_store)

    def add_storage(self, name: str, bucket: str, **kw: Any) -> MemoryStore:
        self.kube.add("backupstorages", a_storage(name, bucket, **kw))
        self.kube.add_secret(NS, f"{name}-creds", AWS_ACCESS_KEY_ID="a", AWS_SECRET_ACCESS_KEY="b")
        self.stores[bucket] = MemoryStore(bucket)
        return self.stores[bucket]

    @property
    def bk(self) -> MemoryStore:
        return self.stores["bk"]

    def backup(
        self,
        name: str = "b1",
        spec: dict[str, Any] | None = None,
        annotations: dict[str, str] | None = None,
        **st: Any,
    ) -> dict[str, Any]:
        body = {
            "apiVersion": "nightjar.dev/v1alpha1",
            "kind": "Backup",
            "metadata": {
                "name": name,
                "namespace": NS,
                "creationTimestamp": "2026-11-24T17:00:00Z",
                "annotations": dict(annotations or {}),
            },
            "spec": {"type": "OnDemand", "storageRef": {"name": "s3"}, "source": SOURCE, **(spec or {})},
            "status": st,
        }
        return self.kube.add("backups", body)

    def get(self, name: str = "b1") -> dict[str, Any]:
        out = self.kube.get("backups", NS, name)
        assert out is not None
        return out

    def st(self, name: str = "b1") -> dict[str, Any]:
        return self.kube.status_of("backups", NS, name)

    def conds(self, name: str = "b1") -> dict[str, dict[str, Any]]:
        return {c["type"]: c for c in self.st(name).get("conditions") or []}

    def job(self, name: str = JOB, **job_status: Any) -> dict[str, Any]:
        return self.kube.set_job(NS, name, job_status, **{LABEL_BACKUP: "b1"})

    def finished_job(self, cond: str = "Complete", reason: str = "", failed: int = 0) -> dict[str, Any]:
        c: dict[str, Any] = {"type": cond, "status": "True", "lastTransitionTime": fmt(FINISHED)}
        if reason:
            c.update(reason=reason, message=f"Job was active longer than specified deadline ({reason})")
        extra = {"succeeded": 1} if cond == "Complete" else {"failed": failed}
        return self.job(completionTime=fmt(FINISHED), conditions=[c], **extra)

    def taken_snapshot(self) -> dict[str, Any]:
        """The agent's snapshot of b1 in the bucket, and the result it reports."""
        key, digest = write_snapshot(self.bk, layout.SnapshotLocation("", NS, SID, "uid-b1", "a1"))
        result = {
            "manifestKey": key,
            "manifestSha256": digest,
            "snapshotId": "a1",
            "createdOn": fmt(NOW - dt.timedelta(minutes=10)),
            "sizeUncompressedBytes": 2053,
            "objects": 2,
        }
        self.kube.job_output[(NS, JOB)] = [result]
        return result

    def running(self, name: str = "b1") -> dict[str, Any]:
        return self.backup(
            name,
            annotations={ANNOTATION_EXPIRES_AT: fmt(NOW + dt.timedelta(days=90))},
            phase="Running",
            attempts=1,
            jobName=JOB,
            sourceId=SID,
            storage={"storageName": "s3", "endpoint": "http://s3.test", "bucket": "bk"},
        )


@pytest.fixture
def w(monkeypatch: pytest.MonkeyPatch) -> World:
    return World(monkeypatch)


# --- taken backups: Queued, Running, new attempts ------------------------------------------------


def test_a_new_backup_is_queued_with_its_expiry_and_its_job_is_created(w: World) -> None:
    w.rec.reconcile(w.backup())

    b = w.get()
    assert b["metadata"]["annotations"][ANNOTATION_EXPIRES_AT] == "2027-02-24T17:00:00Z"  # 3 months
    st = b["status"]
    assert st["phase"] == "Queued" and st["attempts"] == 0
    assert st["expiresOn"] == "2027-02-24T17:00:00Z" and st["sourceId"] == SID
    assert st["jobName"] == JOB and st["message"] == "backup Job created"
    assert st["storage"] == {"storageName": "s3", "endpoint": "http://s3.test", "bucket": "bk"}
    assert [j["metadata"]["name"] for j in w.kube.created_jobs] == [JOB]
    assert w.kube.reasons("b1") == ["Queued", "JobCreated"]
    assert "OnDemand backup queued, expires 2027-02-24T17:00:00Z" in w.kube.events[0][3]

    w.rec.reconcile(w.get())  # a restarted operator: finds the Job, makes no second one
    assert len(w.kube.created_jobs) == 1 and w.kube.reasons("b1") == ["Queued", "JobCreated"]


def test_an_expiry_set_by_the_user_is_kept(w: World) -> None:
    w.rec.reconcile(w.backup(annotations={ANNOTATION_EXPIRES_AT: "2030-01-01T00:00:00Z"}))
    assert w.get()["metadata"]["annotations"][ANNOTATION_EXPIRES_AT] == "2030-01-01T00:00:00Z"
    assert w.st()["expiresOn"] == "2030-01-01T00:00:00Z"


def test_queued_becomes_running_when_the_job_is_active_then_each_new_attempt_is_a_retry(w: World) -> None:
    w.rec.reconcile(w.backup())
    w.job(active=1)
    w.rec.reconcile(w.get())
    st = w.st()
    assert (st["phase"], st["attempts"], st["message"]) == ("Running", 1, "attempt 1 of 3 running")
    w.rec.sync_from_job(w.get(), w.job(active=1))  # the same attempt again: nothing new
    assert w.kube.reasons("b1") == ["Queued", "JobCreated", "Running"]

    w.kube.job_output[(NS, JOB)] = [{"error": "could not connect to server: Connection refused"}]
    w.rec.sync_from_job(w.get(), w.job(active=1, failed=1))
    st = w.st()
    assert (st["phase"], st["attempts"]) == ("Running", 2)
    assert st["message"] == (
        "attempt 2 of 3 running (attempt 1 failed: could not connect to server: Connection refused)"
    )
    assert w.kube.reasons("b1")[-1] == "Retrying" and w.kube.events[-1][1] == "Warning"
    assert not w.get()["metadata"].get("labels")


# --- taken backups: Completed --------------------------------------------------------------------


def test_a_succeeded_job_whose_manifest_verifies_completes_the_backup(w: World) -> None:
    w.running()
    result = w.taken_snapshot()
    w.rec.sync_from_job(w.get(), w.finished_job())

    b = w.get()
    st = b["status"]
    assert st["phase"] == "Completed" and st["attempts"] == 1
    assert st["message"] == "snapshot a1 stored and verified (2 objects)"
    assert (st["snapshotId"], st["createdOn"], st["completedOn"]) == ("a1", result["createdOn"], fmt(NOW))
    assert (st["sizeUncompressedBytes"], st["sizeUncompressedMB"]) == (2053, "0.00")
    assert st["storage"]["manifestKey"] == result["manifestKey"]
    assert st["storage"]["manifestSha256"] == hashlib.sha256(w.bk.objects[result["manifestKey"]]).hexdigest()
    assert st["storage"]["prefix"] == "" and st["storage"]["bucket"] == "bk"
    assert st["locations"] == [
        {
            "storage": "s3",
            "role": "Primary",
            "jurisdiction": "EU",
            "state": "Replicated",
            "replicatedAt": fmt(NOW),
            "message": "snapshot written and verified",
        }
    ]
    assert st["replication"] == "1/1"
    conds = w.conds()
    assert (conds["Completed"]["status"], conds["Completed"]["reason"]) == ("True", "SnapshotVerified")
    assert (conds["Replicated"]["status"], conds["Replicated"]["reason"]) == ("True", "AllLocations")
    assert b["metadata"]["labels"][LABEL_FINISHED] == "true"
    assert w.kube.reasons("b1") == ["Completed"]

    w.rec.sync_from_job(w.get(), w.finished_job())  # the Job's next event: nothing changes
    w.rec.reconcile(w.get())
    assert w.kube.reasons("b1") == ["Completed"] and w.st() == st


def test_a_completed_backup_with_a_replica_lists_it_pending_and_starts_its_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = World(monkeypatch, replicas=("dr",))
    w.add_storage("dr", "bk-dr")
    w.running()
    w.taken_snapshot()
    w.rec.sync_from_job(w.get(), w.finished_job())

    st = w.st()
    assert st["phase"] == "Completed" and st["replication"] == "1/2"
    assert [(loc["storage"], loc["role"], loc["state"]) for loc in st["locations"]] == [
        ("s3", "Primary", "Replicated"),
        ("dr", "Replica", "Pending"),
    ]
    assert st["locations"][1]["attempts"] == 1  # the copy started at once
    rep = w.conds()["Replicated"]
    assert (rep["status"], rep["reason"]) == ("False", "ReplicationPending")
    copies = [j for j in w.kube.created_jobs if j["metadata"]["name"].startswith("nightjar-replicate-")]
    assert len(copies) == 1
    assert w.kube.reasons("b1") == ["Completed", "ReplicationStarted"]


# --- taken backups: Failed -----------------------------------------------------------------------


def test_a_failed_job_fails_the_backup_with_the_agents_error(w: World) -> None:
    w.running()
    w.kube.job_output[(NS, JOB)] = [{"error": 'password authentication failed for user "shop"'}]
    w.rec.sync_from_job(w.get(), w.finished_job("Failed", reason="BackoffLimitExceeded", failed=3))

    b = w.get()
    st = b["status"]
    assert st["phase"] == "Failed" and st["attempts"] == 3
    assert st["message"] == 'password authentication failed for user "shop"'
    assert w.conds()["Failed"]["reason"] == "BackoffLimitExceeded"
    assert b["metadata"]["labels"][LABEL_FINISHED] == "true"
    assert w.kube.reasons("b1") == ["Failed"] and w.kube.events[0][1] == "Warning"


def test_a_job_past_its_deadline_says_how_long_it_ran(w: World) -> None:
    w.running()
    w.rec.sync_from_job(w.get(), w.finished_job("Failed", reason="DeadlineExceeded"))
    st = w.st()
    assert st["phase"] == "Failed" and st["attempts"] == 1
    assert st["message"] == (
        "the backup ran longer than 21600s: Job was active longer than specified deadline (DeadlineExceeded)"
    )
    assert w.conds()["Failed"]["reason"] == "DeadlineExceeded"


def test_a_succeeded_job_that_reported_no_snapshot_fails(w: World) -> None:
    w.running()
    w.kube.job_output[(NS, JOB)] = [{"error": "an earlier attempt's error"}]  # no manifestKey anywhere
    w.rec.sync_from_job(w.get(), w.finished_job())
    st = w.st()
    assert st["phase"] == "Failed" and st["message"] == "the backup Job succeeded but reported no snapshot"
    assert w.conds()["Failed"]["reason"] == "NoResult"


def test_a_succeeded_job_whose_pod_is_gone_completes_from_the_snapshot_in_the_bucket(w: World) -> None:
    """Found by make chaos: the agent's Pod deleted after it wrote and verified its snapshot, before
    the operator read its result. The snapshot (manifest written last) is there: Completed."""
    w.running()
    result = w.taken_snapshot()
    w.kube.job_output[(NS, JOB)] = []  # no Pod left: no termination message
    w.rec.sync_from_job(w.get(), w.finished_job())
    st = w.st()
    assert st["phase"] == "Completed", st.get("message")
    assert st["storage"]["manifestKey"] == result["manifestKey"]
    assert st["storage"]["manifestSha256"] == result["manifestSha256"]
    assert (st["snapshotId"], st["createdOn"]) == ("a1", result["createdOn"])
    assert st["database"]["serverVersion"] == "16" and st["message"].startswith(
        "snapshot a1 stored and verified"
    )


def test_a_failed_job_whose_earlier_attempt_wrote_a_complete_snapshot_completes(w: World) -> None:
    """Found by make chaos: attempt 1 wrote its snapshot and lost its Pod before it exited, the
    next attempts failed (PostgreSQL restarting): the complete snapshot is the backup."""
    w.running()
    result = w.taken_snapshot()
    w.kube.job_output[(NS, JOB)] = [{"error": "pg_dump failed: connection refused"}]
    w.rec.sync_from_job(w.get(), w.finished_job("Failed", reason="BackoffLimitExceeded", failed=3))
    st = w.st()
    assert st["phase"] == "Completed", st.get("message")
    assert st["storage"]["manifestKey"] == result["manifestKey"] and st["attempts"] == 3


def test_a_failed_job_with_nothing_in_the_bucket_fails_with_the_agents_error(w: World) -> None:
    w.running()
    w.kube.job_output[(NS, JOB)] = [{"error": "pg_dump failed: connection refused"}]
    w.rec.sync_from_job(w.get(), w.finished_job("Failed", reason="BackoffLimitExceeded", failed=3))
    st = w.st()
    assert st["phase"] == "Failed" and st["message"] == "pg_dump failed: connection refused"


def test_a_failed_job_while_the_bucket_is_unreachable_waits_instead_of_failing(w: World) -> None:
    w.running()
    w.taken_snapshot()
    w.kube.job_output[(NS, JOB)] = [{"error": "pg_dump failed: connection refused"}]
    w.bk.down = "cannot connect to the S3 endpoint"
    with pytest.raises(Retry):
        w.rec.sync_from_job(w.get(), w.finished_job("Failed", reason="BackoffLimitExceeded", failed=3))
    assert w.st()["phase"] == "Running" and "retrying in" in w.st()["message"]
    w.bk.down = ""
    w.rec.sync_from_job(w.get(), w.finished_job("Failed", reason="BackoffLimitExceeded", failed=3))
    assert w.st()["phase"] == "Completed"


def test_a_lost_result_over_a_snapshot_missing_an_object_fails_it(w: World) -> None:
    w.running()
    result = w.taken_snapshot()
    w.kube.job_output[(NS, JOB)] = []
    listed = next(k for k in w.bk.objects if k != result["manifestKey"])
    del w.bk.objects[listed]
    w.rec.sync_from_job(w.get(), w.finished_job())
    st = w.st()
    assert st["phase"] == "Failed" and "missing or short in the bucket" in st["message"]
    assert w.conds()["Failed"]["reason"] == "VerificationFailed"


def test_a_manifest_that_is_not_what_the_agent_wrote_fails_at_once(w: World) -> None:
    w.running()
    result = w.taken_snapshot()
    w.bk.objects[result["manifestKey"]] += b" "  # changed after the agent reported its digest
    w.rec.sync_from_job(w.get(), w.finished_job())
    st = w.st()
    assert st["phase"] == "Failed"
    assert st["message"] == (
        f"snapshot verification failed: manifest {result['manifestKey']} does not match what the agent wrote"
    )
    assert w.conds()["Failed"]["reason"] == "VerificationFailed"
    assert "nextRetryAt" not in st


def test_a_manifest_missing_from_the_bucket_is_permanent(w: World) -> None:
    w.running()
    result = w.taken_snapshot()
    del w.bk.objects[result["manifestKey"]]
    w.rec.sync_from_job(w.get(), w.finished_job())  # no Retry raised: failed for good
    st = w.st()
    assert st["phase"] == "Failed"
    assert st["message"] == f"snapshot verification failed: reading {result['manifestKey']}: NoSuchKey"
    assert w.conds()["Failed"]["reason"] == "VerificationFailed"
    assert w.kube.reasons("b1") == ["Failed"]


# --- taken backups: preflight ---------------------------------------------------------------------


def _no_storage(w: World) -> None:
    del w.kube.objects[("backupstorages", NS, "s3")]


def _no_secret(w: World) -> None:
    del w.kube.secrets[(NS, "s3-creds")]


def _no_db_secret(w: World) -> None:
    del w.kube.secrets[(NS, "db")]


@pytest.mark.parametrize(
    ("spec", "breaks", "message"),
    [
        ({}, _no_storage, 'BackupStorage "s3" not found in namespace shop'),
        ({}, _no_secret, 'BackupStorage s3 credentials: Secret "s3-creds" not found in namespace shop'),
        ({}, _no_db_secret, 'database: Secret "db" not found in namespace shop'),
        (
            {"source": {**SOURCE, "files": {"persistentVolumeClaim": {"claimName": "data"}}}},
            None,
            'files: PersistentVolumeClaim "data" not found in namespace shop',
        ),
        (
            {"source": {**SOURCE, "app": {"name": "shop"}}},
            None,
            'app: Deployment "shop" not found in namespace shop',
        ),
    ],
    ids=["storage", "storage secret", "database secret", "pvc", "app"],
)
def test_something_missing_before_the_job_is_retried_with_attempts_then_fails(
    w: World, spec: dict[str, Any], breaks: Any, message: str
) -> None:
    if breaks is not None:
        breaks(w)
    body = w.backup(spec=spec)
    delays = []
    for attempt in (1, 2):
        with pytest.raises(Retry) as retry:
            w.rec.reconcile(body if attempt == 1 else w.get())
        delays.append(retry.value.delay)
        st = w.st()
        assert (st["phase"], st["attempts"]) == ("Queued", attempt)
        assert st["message"] == f"attempt {attempt} of 3: {message}"
    assert delays == [10.0, 20.0]
    w.rec.reconcile(w.get())

    st = w.st()
    assert (st["phase"], st["attempts"], st["message"]) == ("Failed", 3, message)
    assert w.conds()["Failed"]["reason"] == "PreflightFailed"
    assert w.kube.created_jobs == []
    assert w.kube.reasons("b1") == ["Queued", "Retrying", "Retrying", "Failed"]
    assert f"{message} (attempt 1 of 3, retrying)" == w.kube.events[1][3]


def test_what_was_missing_arrives_and_the_job_starts(w: World) -> None:
    w.backup(spec={"source": {**SOURCE, "files": {"persistentVolumeClaim": {"claimName": "data"}}}})
    with pytest.raises(Retry):
        w.rec.reconcile(w.get())
    w.kube.claims.add((NS, "data"))
    w.kube.workload = workload()
    w.rec.reconcile(w.get())
    st = w.st()
    assert st["phase"] == "Queued" and st["jobName"] == JOB and st["attempts"] == 1
    assert len(w.kube.created_jobs) == 1


# --- taken backups: transient errors while verifying ---------------------------------------------


def _storage_down(w: World) -> None:
    w.bk.down = "cannot connect to the S3 endpoint"


def _api_503(w: World) -> None:
    w.kube.fail("get", 503)  # the read of the BackupStorage


def _api_409(w: World) -> None:
    w.kube.fail("get", 409)


@pytest.mark.parametrize(
    ("breaks", "reason", "said"),
    [
        (_storage_down, "StorageUnavailable", "storage unreachable while verifying the snapshot: reading "),
        (_no_secret, "NotThereYet", "something it needs is not there (yet) while verifying the snapshot: "),
        (_api_503, "KubernetesUnavailable", "the Kubernetes API failed while verifying the snapshot: "),
        (_api_409, "Conflict", "the Kubernetes API failed while verifying the snapshot: Kubernetes API: 409"),
    ],
    ids=["storage down", "secret missing", "api 503", "api 409"],
)
def test_a_transient_error_while_verifying_keeps_it_running_then_it_completes(
    w: World, breaks: Any, reason: str, said: str
) -> None:
    w.running()
    w.taken_snapshot()
    job, body = w.finished_job(), w.get()
    breaks(w)
    with pytest.raises(Retry) as retry:
        w.rec.sync_from_job(body, job)

    st = w.st()
    assert st["phase"] == "Running" and st["attempts"] == 1
    assert st["message"].startswith(said), st["message"]
    assert "retrying in 10 s (until 2026-11-24T18:59:55Z, 1 h after the Job finished)" in st["message"]
    assert retry.value.delay == 10
    assert st["nextRetryAt"] == fmt(NOW + dt.timedelta(seconds=10))
    cond = w.conds()["Retrying"]
    assert (cond["status"], cond["reason"]) == ("True", reason)
    assert w.kube.reasons("b1") == ["VerificationRetrying"]
    assert not w.get()["metadata"].get("labels")

    # Mended; the sweep follows the Job again when the next try is due.
    w.bk.down = ""
    w.kube.add_secret(NS, "s3-creds", AWS_ACCESS_KEY_ID="a", AWS_SECRET_ACCESS_KEY="b")
    w.clock.advance(9)
    assert w.rec.retry_sweep([w.get()]) == []
    w.clock.advance(1)
    assert w.rec.retry_sweep([w.get()]) == [f"{NS}/b1"]
    st = w.st()
    assert st["phase"] == "Completed" and "nextRetryAt" not in st
    assert "Retrying" not in w.conds() and w.conds()["Completed"]["status"] == "True"
    assert w.kube.reasons("b1") == ["VerificationRetrying", "Completed"]


def test_still_failing_at_the_deadline_fails_as_verification_timed_out(w: World) -> None:
    w.running()
    w.taken_snapshot()
    w.bk.down = "cannot connect to the S3 endpoint"
    with pytest.raises(Retry):
        w.rec.sync_from_job(w.get(), w.finished_job())
    w.clock.current = FINISHED + VERIFY_DEADLINE
    w.rec.sync_from_job(w.get(), w.finished_job())
    st = w.st()
    assert st["phase"] == "Failed" and "nextRetryAt" not in st
    assert st["message"].startswith(
        "snapshot verification failed: storage unreachable for 1 h after the Job finished: reading "
    )
    assert set(w.conds()) == {"Failed"} and w.conds()["Failed"]["reason"] == "VerificationTimedOut"
    assert w.kube.reasons("b1") == ["VerificationRetrying", "Failed"]


# --- terminal, stale bodies ---------------------------------------------------------------------


@pytest.mark.parametrize("phase", ["Completed", "Failed"])
def test_a_terminal_backup_never_changes(w: World, phase: str) -> None:
    body = w.backup(annotations={ANNOTATION_EXPIRES_AT: "2030-01-01T00:00:00Z"}, phase=phase, jobName=JOB)
    before = w.st()
    w.kube.job_output[(NS, JOB)] = [{"error": "late"}]
    w.rec.reconcile(body)
    w.rec.sync_from_job(body, w.finished_job("Failed", reason="BackoffLimitExceeded", failed=3))
    w.rec.sync_from_job(body, w.job(active=1))
    assert w.st() == before and w.kube.events == [] and w.kube.created_jobs == []
    assert w.get()["metadata"]["labels"] == {LABEL_FINISHED: "true"}  # marked finished, once seen


def test_a_stale_body_never_moves_a_running_backup_back_to_queued(w: World) -> None:
    w.running()
    w.job(active=1)
    stale = w.get()
    stale["status"] = {}  # as a watch event from before the first write carried it
    w.rec.reconcile(stale)
    st = w.st()
    assert (st["phase"], st["attempts"], st["jobName"]) == ("Running", 1, JOB)
    assert w.kube.events == [] and w.kube.created_jobs == []


# --- uploaded backups ----------------------------------------------------------------------------


def upload(w: World, namespace: str = NS, upload_id: str = "up1") -> tuple[str, str]:
    return write_snapshot(w.bk, layout.SnapshotLocation("", namespace, "uploaded", upload_id, "snap1"))


def uploaded(
    w: World, key: str, sha: str, name: str = "u1", created: str = "2026-11-24T17:00:00Z"
) -> dict[str, Any]:
    w.backup(name, spec={"type": "Uploaded", "upload": {"manifestKey": key, "manifestSha256": sha}})
    w.kube.objects[("backups", NS, name)]["metadata"]["creationTimestamp"] = created
    return w.get(name)


def test_an_uploaded_snapshot_of_this_namespace_is_adopted(w: World) -> None:
    key, sha = upload(w)
    w.rec.reconcile(uploaded(w, key, sha))
    st = w.st("u1")
    assert st["phase"] == "Completed" and st["attempts"] == 1
    assert st["message"] == "uploaded snapshot snap1 verified (1 object)"
    assert st["sourceId"] == "uploaded" and st["modelVersion"] == "7.1"
    assert st["storage"]["manifestKey"] == key and st["storage"]["manifestSha256"] == sha
    assert w.conds("u1")["Completed"]["reason"] == "UploadVerified"
    assert w.conds("u1")["Replicated"]["status"] == "True"
    assert w.kube.reasons("u1") == ["Queued", "Completed"]
    assert w.get("u1")["metadata"]["labels"][LABEL_FINISHED] == "true"
    assert w.kube.created_jobs == []  # no Job: the data is there


@pytest.mark.parametrize(
    ("case", "reason", "says"),
    [
        (
            "other namespace",
            "NotAllowed",
            "is not allowed: an uploaded Backup may only use an upload of its own",
        ),
        ("sha mismatch", "VerificationFailed", "does not match spec.upload.manifestSha256"),
        ("missing object", "VerificationFailed", "is missing from the bucket"),
        ("missing manifest", "ManifestMissing", "is not in bucket bk"),
        ("already used", "AlreadyUsed", "already belongs to Backup u0"),
    ],
)
def test_an_upload_that_cannot_be_this_backup_is_refused_at_once(
    w: World, case: str, reason: str, says: str
) -> None:
    key, sha = upload(w, namespace="other" if case == "other namespace" else NS)
    if case == "sha mismatch":
        sha = "0" * 64
    elif case == "missing object":
        part = next(k for k in w.bk.objects if "/packs/" in k)
        del w.bk.objects[part]
    elif case == "missing manifest":
        del w.bk.objects[key]
    elif case == "already used":
        uploaded(w, key, sha, name="u0", created="2026-11-24T16:00:00Z")
    w.rec.reconcile(uploaded(w, key, sha))

    st = w.st("u1")
    assert st["phase"] == "Failed" and says in st["message"], st["message"]
    assert w.conds("u1")["Failed"]["reason"] == reason
    assert w.kube.reasons("u1") == ["Queued", "Failed"]


def test_an_upload_whose_storage_is_down_is_retried_not_refused(w: World) -> None:
    key, sha = upload(w)
    w.bk.down = "cannot connect to the S3 endpoint"
    with pytest.raises(Retry):
        w.rec.reconcile(uploaded(w, key, sha))
    st = w.st("u1")
    assert st["phase"] == "Queued" and st["attempts"] == 1 and "cannot connect" in st["message"]
    w.bk.down = ""
    w.rec.reconcile(w.get("u1"))
    assert w.st("u1")["phase"] == "Completed" and w.st("u1")["attempts"] == 2


# --- synced backups ------------------------------------------------------------------------------


def synced(w: World, key: str, name: str = "s1") -> dict[str, Any]:
    return w.backup(name, annotations={ANNOTATION_SYNCED_FROM: key})


def test_a_synced_backup_adopts_the_snapshot_in_the_bucket(w: World) -> None:
    key, digest = write_snapshot(w.bk, layout.SnapshotLocation("", NS, SID, "uid-gone", "a1"))
    w.rec.reconcile(synced(w, key))
    st = w.st("s1")
    assert st["phase"] == "Completed" and st["sourceId"] == SID
    assert st["storage"]["manifestKey"] == key and st["storage"]["manifestSha256"] == digest
    assert st["expiresOn"] == fmt(NOW + dt.timedelta(days=90))  # from the manifest
    assert w.conds("s1")["Completed"]["reason"] == "SyncedFromStorage"
    assert w.kube.reasons("s1") == ["Queued", "Completed"]


def test_a_synced_backup_of_another_namespaces_snapshot_is_not_allowed(w: World) -> None:
    key, _ = write_snapshot(w.bk, layout.SnapshotLocation("", "other", SID, "uid-x", "a1"))
    w.rec.reconcile(synced(w, key))
    st = w.st("s1")
    assert st["phase"] == "Failed" and "is a snapshot of namespace other" in st["message"]
    assert w.conds("s1")["Failed"]["reason"] == "NotAllowed"


def test_a_synced_backup_of_a_snapshot_another_backup_stands_for_is_refused(w: World) -> None:
    key, _ = write_snapshot(w.bk, layout.SnapshotLocation("", NS, SID, "uid-b1", "a1"))
    w.running("b1")  # the Backup that took it still exists (uid-b1)
    w.rec.reconcile(synced(w, key))
    st = w.st("s1")
    assert st["phase"] == "Failed" and st["message"] == f"the snapshot {key} already belongs to Backup b1"
    assert w.conds("s1")["Failed"]["reason"] == "AlreadyUsed"


# --- deletion ------------------------------------------------------------------------------------


def completed_with_snapshot(w: World) -> str:
    w.running()
    w.taken_snapshot()
    w.rec.sync_from_job(w.get(), w.finished_job())
    assert w.st()["phase"] == "Completed"
    return layout.backup_prefix("", NS, SID, "uid-b1")


def test_deleting_a_backup_deletes_its_snapshot(w: World) -> None:
    mine = completed_with_snapshot(w)
    summary = w.rec.delete_stored(w.get())
    assert summary.startswith("deleted ") and not [k for k in w.bk.objects if k.startswith(mine)]


def test_a_namespace_being_deleted_keeps_the_snapshot(w: World) -> None:
    mine = completed_with_snapshot(w)
    before = dict(w.bk.objects)
    w.kube.terminating.add(NS)
    summary = w.rec.delete_stored(w.get())
    assert summary == (
        f"namespace {NS} is being deleted: kept the stored snapshot until {fmt(NOW + dt.timedelta(days=90))}"
    )
    assert w.bk.objects == before and any(k.startswith(mine) for k in before)


def test_unreachable_storage_makes_the_deletion_retry(w: World) -> None:
    completed_with_snapshot(w)
    before = dict(w.bk.objects)
    w.bk.down = "cannot connect to the S3 endpoint"
    with pytest.raises(Retry, match=r"deleting stored objects: writing .*cannot connect") as retry:
        w.rec.delete_stored(w.get())
    assert retry.value.delay == 30 and w.bk.objects == before


def test_a_stuck_deletion_gives_up_after_the_limit_and_drops_the_finalizer(w: World) -> None:
    completed_with_snapshot(w)
    w.kube.objects[("backups", NS, "b1")]["metadata"]["finalizers"] = [FINALIZER, "other/keep"]
    w.kube.delete_object("backups", NS, "b1")  # deletionTimestamp: NOW
    w.bk.down = "cannot connect to the S3 endpoint"

    w.clock.advance(deletion_mod.GIVE_UP.total_seconds() - 1)
    assert w.rec.finish_deletion(w.get()) is False
    assert w.get()["metadata"]["finalizers"] == [FINALIZER, "other/keep"]
    assert "StorageUnreachable" not in w.kube.reasons("b1")

    w.clock.advance(1)
    assert w.rec.finish_deletion(w.get()) is True
    assert w.get()["metadata"]["finalizers"] == ["other/keep"]  # only ours dropped
    assert w.kube.reasons("b1")[-1] == "StorageUnreachable"
    assert "stored objects were not deleted within 0:10:00" in w.kube.events[-1][3]


def test_finishing_a_deletion_deletes_the_objects_and_lets_the_backup_go(w: World) -> None:
    mine = completed_with_snapshot(w)
    w.kube.objects[("backups", NS, "b1")]["metadata"]["finalizers"] = [FINALIZER]
    w.kube.delete_object("backups", NS, "b1")
    assert w.rec.finish_deletion(w.get()) is True
    assert ("backups", NS, "b1") not in w.kube.objects
    assert not [k for k in w.bk.objects if k.startswith(mine)]


# --- garbage collection --------------------------------------------------------------------------


def test_gc_deletes_expired_backups_only_when_they_may_go(w: World) -> None:
    past = {ANNOTATION_EXPIRES_AT: fmt(NOW - dt.timedelta(minutes=1))}
    w.add_storage("far", "bk-far")
    w.stores["bk-far"].down = "cannot connect to the S3 endpoint"
    w.backup("expired", annotations=past, phase="Completed")
    w.backup("failed", annotations=past, phase="Failed")
    w.backup("pinned", annotations={**past, ANNOTATION_KEEP: "true"}, phase="Completed")
    w.backup("in-flight", annotations=past, phase="Running")
    w.backup(
        "not-yet", annotations={ANNOTATION_EXPIRES_AT: fmt(NOW + dt.timedelta(minutes=1))}, phase="Completed"
    )
    w.backup("unreachable", spec={"storageRef": {"name": "far"}}, annotations=past, phase="Completed")
    for name in ("expired", "failed", "unreachable"):
        w.kube.objects[("backups", NS, name)]["metadata"]["finalizers"] = [FINALIZER]

    report = w.gc(w.clock.now())

    assert report.examined == 6
    assert sorted(report.deleted) == [f"{NS}/expired", f"{NS}/failed"]
    assert report.deferred == [f"{NS}/unreachable"]
    for name in ("expired", "failed"):  # deletion asked: the finalizer deletes the objects
        assert w.get(name)["metadata"]["deletionTimestamp"]
        assert "Expired" in w.kube.reasons(name)
    for name in ("pinned", "in-flight", "not-yet", "unreachable"):
        assert "deletionTimestamp" not in w.get(name)["metadata"] and not w.kube.reasons(name)

    w.stores["bk-far"].down = ""  # reachable again: the next sweep lets it go
    assert w.gc(w.clock.now()).deleted == [f"{NS}/unreachable"]


def test_gc_finishes_a_deletion_stuck_on_the_finalizer(w: World) -> None:
    completed_with_snapshot(w)
    w.kube.objects[("backups", NS, "b1")]["metadata"]["finalizers"] = [FINALIZER]
    w.kube.delete_object("backups", NS, "b1")
    assert w.gc(NOW + dt.timedelta(minutes=4), w.rec.finish_deletion).finalized == []
    report = w.gc(NOW + dt.timedelta(minutes=6), w.rec.finish_deletion)
    assert report.finalized == [f"{NS}/b1"] and ("backups", NS, "b1") not in w.kube.objects


def test_status_writes_of_a_backup_go_through_the_one_writer(w: World) -> None:
    """A conflict on the status write of a transition is decided again, never lost."""
    w.running()
    w.taken_snapshot()
    w.kube.fail("patch_status", 409, 409)
    w.rec.sync_from_job(w.get(), w.finished_job())
    assert w.st()["phase"] == "Completed" and w.kube.reasons("b1") == ["Completed"]
    assert isinstance(w.rec.state.writer, status.StatusWriter)


def test_deletion_waits_for_a_running_copy_then_deletes_in_every_location(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = World(monkeypatch, replicas=("dr",))
    dr = w.add_storage("dr", "bk-dr")
    mine = completed_with_snapshot(w)
    (copy_job,) = [j["metadata"]["name"] for j in w.kube.created_jobs if "replicate" in j["metadata"]["name"]]
    dr.put(f"{mine}a1/db.dump", b"a copy")  # what the copy wrote so far
    with pytest.raises(Retry, match="a copy into replica dr is running; deleting when it ends"):
        w.rec.delete_stored(w.get())
    assert any(k.startswith(mine) for k in w.bk.objects)  # nothing deleted meanwhile

    w.kube.jobs[(NS, copy_job)]["status"] = {"failed": 1}
    summary = w.rec.delete_stored(w.get())
    assert "in replica dr: deleted" in summary
    assert not [k for k in w.bk.objects if k.startswith(mine)]
    assert not [k for k in dr.objects if k.startswith(mine)]


def test_gc_defers_a_backup_whose_replica_cannot_be_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    w = World(monkeypatch, replicas=("dr",))
    w.add_storage("dr", "bk-dr")
    completed_with_snapshot(w)
    w.kube.objects[("backups", NS, "b1")]["metadata"]["annotations"][ANNOTATION_EXPIRES_AT] = fmt(NOW)
    w.stores["bk-dr"].down = "cannot connect to the S3 endpoint"
    report = w.gc(NOW + dt.timedelta(seconds=1))
    assert report.deferred == [f"{NS}/b1"] and report.deleted == []
    w.stores["bk-dr"].down = ""
    assert w.gc(NOW + dt.timedelta(seconds=1)).deleted == [f"{NS}/b1"]


def test_a_replica_the_residency_policy_refuses_stops_the_backup_before_any_data_moves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = World(monkeypatch, replicas=("us",))
    w.add_storage("us", "bk-us", jurisdiction="US")
    with pytest.raises(Retry):
        w.rec.reconcile(w.backup())
    with pytest.raises(Retry):
        w.rec.reconcile(w.get())
    w.rec.reconcile(w.get())
    st = w.st()
    assert st["phase"] == "Failed" and w.conds()["Failed"]["reason"] == "PreflightFailed"
    assert st["message"].startswith("BackupStorage s3: replica us (US) refused: ")
    assert st["message"].endswith("no data is written to s3 until spec.replicas keeps the rule")
    assert w.kube.created_jobs == []


def test_an_uploaded_snapshot_is_locked_until_the_backup_expires(w: World) -> None:
    w.kube.objects[("backupstorages", NS, "s3")]["spec"]["objectLock"] = {"mode": "Governance"}
    key, sha = upload(w)
    w.rec.reconcile(uploaded(w, key, sha))
    assert w.st("u1")["phase"] == "Completed"
    mine = key.rsplit("/", 2)[0]
    assert set(w.bk.locks) == {k for k in w.bk.objects if k.startswith(mine)}
    assert {(lk.mode, fmt(lk.until)) for lk in w.bk.locks.values()} == {
        ("Governance", "2027-02-24T17:00:00Z")
    }


def test_a_synced_backup_whose_storage_is_down_is_retried_not_failed(w: World) -> None:
    key, _ = write_snapshot(w.bk, layout.SnapshotLocation("", NS, SID, "uid-gone", "a1"))
    w.bk.down = "cannot connect to the S3 endpoint"
    body = synced(w, key)
    for attempt in range(1, 8):
        with pytest.raises(Retry) as retry:
            w.rec.reconcile(body if attempt == 1 else w.get("s1"))
        assert w.st("s1")["phase"] == "Queued" and w.st("s1")["attempts"] == attempt
    assert retry.value.delay == 300  # capped
    w.bk.down = ""
    w.rec.reconcile(w.get("s1"))
    assert w.st("s1")["phase"] == "Completed"
