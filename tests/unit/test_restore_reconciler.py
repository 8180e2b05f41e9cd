"""Every phase transition of a Restore and every class of error, through ``RestoreReconciler``.

Driven with the one fake of the Kubernetes API (tests/fakes.py), a clock moved by hand and the
in-memory object store (tests/memstore.py), one per bucket. ``storage.store_of`` routes to the
same stores: the planner's reachability check of the primary (replica fallback) does not take
the injected ``open_store``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from typing import Any

import pytest

from nightjar.config import OperatorConfig
from nightjar.domain.retention import format_time
from nightjar.reconcile import restore as restore_mod
from nightjar.reconcile.errors import Retry
from nightjar.reconcile.restore import RestoreReconciler
from nightjar.reconcile.status import StatusConflict
from nightjar.storage.objects import ObjectStore, S3Target
from tests.fakes import NOW, FakeClock, FakeKube, workload
from tests.memstore import MemoryStore

NS = "shop"
JOB = "nightjar-restore-r1"
KEY = "nightjar/v1/shop/src/uid-b1/a1/manifest.json"
MODEL = "nightjar.dev/model-version"


def fmt(t: dt.datetime) -> str:
    return format_time(t)


class World:
    """Namespace "shop": the BackupStorage "s3" (bucket "bk"), the Completed Backup "b1" of it,
    the target database Secret "db", and a RestoreReconciler on it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kube = FakeKube()
        self.clock = FakeClock()
        self.stores: dict[str, MemoryStore] = {}
        self.add_storage("s3", "bk")
        self.kube.add_secret(NS, "db", uri="postgresql://db/shop")
        self.kube.add_secret("staging", "db", uri="postgresql://db/staging")
        self.bk.put(KEY, b'{"formatVersion": 2, "objects": []}')
        self.rec = RestoreReconciler(
            self.kube, OperatorConfig(), clock=self.clock, open_store=self.open_store
        )

    def open_store(self, target: S3Target) -> ObjectStore:
        return self.stores[target.bucket]

    @property
    def bk(self) -> MemoryStore:
        return self.stores["bk"]

    def add_storage(self, name: str, bucket: str, **spec: Any) -> None:
        self.kube.add(
            "backupstorages",
            {
                "metadata": {"name": name, "namespace": NS},
                "spec": {
                    "endpoint": f"http://{name}.test",
                    "bucket": bucket,
                    "credentials": {"secretName": f"{name}-creds"},
                    **spec,
                },
            },
        )
        self.kube.add_secret(NS, f"{name}-creds", AWS_ACCESS_KEY_ID="a", AWS_SECRET_ACCESS_KEY="b")
        self.stores[bucket] = MemoryStore(bucket)

    def backup(self, contents: str = "Full", files: bool = True, **st: Any) -> dict[str, Any]:
        source: dict[str, Any] = {"database": {"secretRef": {"name": "db"}}}
        if files:
            source["files"] = {"persistentVolumeClaim": {"claimName": "data"}}
        status = {
            "phase": "Completed",
            "modelVersion": "7.1",
            "files": {"count": 3, "bytes": 30} if files else {"count": 0, "bytes": 0},
            "storage": {"storageName": "s3", "manifestKey": KEY, "manifestSha256": "ab" * 32, "prefix": ""},
            **st,
        }
        return self.kube.add(
            "backups",
            {
                "metadata": {"name": "b1", "namespace": NS},
                "spec": {"storageRef": {"name": "s3"}, "contents": contents, "source": source},
                "status": status,
            },
        )

    def restore(
        self, namespace: str = NS, contents: str = "DatabaseOnly", app: bool = False, **spec: Any
    ) -> dict[str, Any]:
        target: dict[str, Any] = {"database": {"secretRef": {"name": "db"}}}
        if contents == "Full":
            target["files"] = {"persistentVolumeClaim": {"claimName": "data"}}
        if app:
            target["app"] = {"name": "shop"}
        ref = {"name": "b1"} if namespace == NS else {"name": "b1", "namespace": NS}
        return self.kube.add(
            "restores",
            {
                "metadata": {"name": "r1", "namespace": namespace},
                "spec": {"backupRef": ref, "contents": contents, "target": target, **spec},
            },
        )

    def app(self, replicas: int = 2, version: str = "7.1") -> Any:
        obj = workload(replicas, **{MODEL: version})
        self.kube.workloads[(NS, "shop")] = obj
        return obj

    def get(self, namespace: str = NS) -> dict[str, Any]:
        out = self.kube.get("restores", namespace, "r1")
        assert out is not None
        return out

    def st(self, namespace: str = NS) -> dict[str, Any]:
        return self.kube.status_of("restores", namespace, "r1")

    def conds(self, namespace: str = NS) -> dict[str, dict[str, Any]]:
        return {c["type"]: c for c in self.st(namespace).get("conditions") or []}

    def job(self, **job_status: Any) -> dict[str, Any]:
        return self.kube.set_job(NS, JOB, job_status)

    def finished(self, cond: str = "Complete", reason: str = "", message: str = "") -> dict[str, Any]:
        c = {"type": cond, "status": "True", "lastTransitionTime": fmt(NOW - dt.timedelta(seconds=5))}
        if reason:
            c.update(reason=reason, message=message)
        extra = {"succeeded": 1} if cond == "Complete" else {"failed": 1}
        return self.job(completionTime=c["lastTransitionTime"], conditions=[c], **extra)


@pytest.fixture
def w(monkeypatch: pytest.MonkeyPatch) -> World:
    return World(monkeypatch)


# --- Queued, Running, Completed, Failed ----------------------------------------------------------


def test_a_new_restore_is_queued_and_its_job_created(w: World) -> None:
    w.backup()
    w.rec.reconcile(w.restore())
    st = w.st()
    assert st["phase"] == "Queued" and st["jobName"] == JOB and st["message"] == "restore Job created"
    assert st["backup"] == "shop/b1" and st["target"] == "shop: database db, files untouched"
    assert st["source"]["role"] == "Primary" and st["source"]["storage"] == "s3"
    assert (st["modelVersion"], st["targetModelVersion"]) == ("7.1", "")
    assert [j["metadata"]["name"] for j in w.kube.created_jobs] == [JOB]
    assert {o["kind"] for o in w.kube.made} == {"ServiceAccount", "Role", "RoleBinding"}
    assert w.kube.reasons("r1") == ["Queued", "JobCreated"]

    w.rec.reconcile(w.get())  # its Job is there: followed, never made twice
    assert len(w.kube.created_jobs) == 1 and w.kube.reasons("r1") == ["Queued", "JobCreated"]


def test_running_then_completed_with_the_jobs_result(w: World) -> None:
    w.backup()
    w.rec.reconcile(w.restore())
    started = fmt(NOW - dt.timedelta(seconds=90))
    w.rec.sync_from_job(w.get(), w.job(active=1, startTime=started))
    st = w.st()
    assert (st["phase"], st["startedAt"], st["message"]) == ("Running", started, "restoring")
    w.rec.sync_from_job(w.get(), w.job(active=1, startTime=started))  # again: nothing new

    w.kube.job_output[(NS, JOB)] = [{"snapshotId": "a1", "files": {"files": 3}}]
    w.kube.patch_status(
        "restores", NS, "r1", {"progress": {"percent": 80, "bytesTotal": 10, "bytesDone": 8, "filesTotal": 3}}
    )
    w.rec.sync_from_job(w.get(), w.finished())
    st = w.st()
    assert st["phase"] == "Completed" and st["snapshotId"] == "a1" and st["completedAt"] == fmt(NOW)
    assert st["message"] == "restored snapshot a1 into shop: database db, files untouched (3 files)"
    assert st["progress"] == {
        "percent": 100,
        "display": "100%",
        "stage": "done",
        "bytesTotal": 10,
        "bytesDone": 10,
        "filesTotal": 3,
        "filesDone": 3,
    }
    assert w.conds()["Completed"]["reason"] == "Restored"
    assert w.kube.reasons("r1") == ["Queued", "JobCreated", "Running", "Completed"]


def test_a_failed_job_fails_the_restore_with_the_target_state_it_reports(w: World) -> None:
    w.backup()
    w.rec.reconcile(w.restore())
    w.kube.job_output[(NS, JOB)] = [
        {"error": "pg_restore: error: could not execute query", "targetState": "PartiallyRestored"}
    ]
    w.rec.sync_from_job(w.get(), w.finished("Failed", "BackoffLimitExceeded", "Job has reached the limit"))
    st = w.st()
    assert st["phase"] == "Failed" and st["targetState"] == "PartiallyRestored"
    assert st["message"] == "pg_restore: error: could not execute query (target state: PartiallyRestored)"
    assert w.conds()["Failed"]["reason"] == "BackoffLimitExceeded" and st["completedAt"] == fmt(NOW)
    assert w.kube.reasons("r1")[-1] == "Failed"


def test_attempts_that_changed_nothing_then_one_that_succeeded_complete_the_restore(w: World) -> None:
    w.backup()
    w.rec.reconcile(w.restore())
    unchanged = {"error": "storage: reading the dump: cannot connect", "targetState": "Unchanged"}
    w.kube.job_output[(NS, JOB)] = [unchanged, unchanged, {"snapshotId": "snap-1", "bytes": 10}]
    c = {"type": "Complete", "status": "True", "lastTransitionTime": fmt(NOW)}
    w.rec.sync_from_job(w.get(), w.job(failed=2, succeeded=1, completionTime=fmt(NOW), conditions=[c]))
    assert w.st()["phase"] == "Completed"


def test_a_job_whose_last_attempt_was_killed_without_a_word_leaves_the_target_state_unknown(w: World) -> None:
    w.backup()
    w.rec.reconcile(w.restore())
    # The first attempt changed nothing and exited 75; the second was killed mid-way (its Pod is
    # gone, it said nothing) and the Job gave up: what it changed is not known.
    w.kube.job_output[(NS, JOB)] = [{"error": "storage: cannot connect", "targetState": "Unchanged"}]
    c = {"type": "Failed", "status": "True", "lastTransitionTime": fmt(NOW), "reason": "BackoffLimitExceeded"}
    w.rec.sync_from_job(w.get(), w.job(failed=2, conditions=[c]))
    st = w.st()
    assert st["phase"] == "Failed" and st["targetState"] == "Unknown"


def test_a_job_past_its_deadline_leaves_the_target_state_unknown(w: World) -> None:
    w.backup()
    w.rec.reconcile(w.restore())
    w.kube.job_output[(NS, JOB)] = [{"targetState": "Unchanged"}]  # said before it was stopped
    w.rec.sync_from_job(w.get(), w.finished("Failed", "DeadlineExceeded", "active too long"))
    st = w.st()
    assert st["phase"] == "Failed" and st["targetState"] == "Unknown"
    assert st["message"] == "the restore ran longer than 21600s and was stopped (target state: Unknown)"
    assert w.conds()["Failed"]["reason"] == "DeadlineExceeded"


def test_a_completed_job_whose_agent_reported_an_error_is_a_failure(w: World) -> None:
    w.backup()
    w.rec.reconcile(w.restore())
    w.kube.job_output[(NS, JOB)] = [{"error": "damaged pack", "targetState": "Unchanged"}]
    w.rec.sync_from_job(w.get(), w.finished())
    st = w.st()
    assert st["phase"] == "Failed" and st["targetState"] == "Unchanged"
    assert st["message"] == "damaged pack (target state: Unchanged)"
    assert w.conds()["Failed"]["reason"] == "JobFailed"


@pytest.mark.parametrize("phase", ["Completed", "Failed"])
def test_a_terminal_restore_never_changes(w: World, phase: str) -> None:
    w.backup()
    w.restore()
    w.kube.patch_status("restores", NS, "r1", {"phase": phase, "jobName": JOB, "message": "done"})
    before = w.st()
    w.kube.job_output[(NS, JOB)] = [{"error": "late"}]
    w.rec.reconcile(w.get())
    w.rec.sync_from_job(w.get(), w.finished("Failed", "BackoffLimitExceeded"))
    w.rec.sync_from_job(w.get(), w.job(active=1))
    assert w.st() == before and w.kube.events == [] and w.kube.created_jobs == []


# --- refusals: nothing was changed ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("backup missing", 'Backup "b1" not found in namespace shop'),
        (
            "backup running",
            "Backup shop/b1 is Running, not Completed: only a Completed backup can be restored",
        ),
        ("not granted", "restoring Backup shop/b1 into namespace staging is not allowed: namespace shop"),
        ("database only", "Backup shop/b1 holds a database only: restore it with contents DatabaseOnly"),
        ("target secret", 'target database: Secret "db" not found in namespace shop'),
        ("target pvc", 'target files: PersistentVolumeClaim "data" not found in namespace shop'),
        ("target app", 'target app: Deployment "shop" not found in namespace shop'),
    ],
)
def test_a_restore_that_cannot_start_is_refused_and_changes_nothing(w: World, case: str, says: str) -> None:
    namespace, contents, app = NS, "DatabaseOnly", False
    if case == "backup running":
        w.backup(phase="Running")
    elif case == "not granted":
        w.backup()
        namespace = "staging"
    elif case == "database only":
        w.backup(contents="DatabaseOnly", files=False)
        contents = "Full"
    elif case == "target secret":
        w.backup()
        del w.kube.secrets[(NS, "db")]
    elif case == "target pvc":
        w.backup()
        contents = "Full"
    elif case == "target app":
        w.backup()
        app = True
    w.rec.reconcile(w.restore(namespace, contents, app))

    st = w.st(namespace)
    assert st["phase"] == "Failed" and st["targetState"] == "Unchanged"
    assert st["message"].startswith(says) and st["message"].endswith("; nothing was changed"), st["message"]
    assert w.conds(namespace)["Failed"]["reason"] == "Refused"
    assert w.kube.created_jobs == [] and w.kube.made == [] and w.kube.scaled == []
    assert w.kube.reasons("r1") == ["Queued", "Failed"]


def test_a_grant_lets_another_namespace_restore_through_presigned_urls(w: World) -> None:
    w.kube.objects[("backupstorages", NS, "s3")]["spec"]["allowedRestoreNamespaces"] = ["staging"]
    w.backup()
    w.rec.reconcile(w.restore("staging"))
    assert w.st("staging")["phase"] == "Queued" and w.st("staging")["jobName"] == JOB
    assert [o["metadata"]["namespace"] for o in w.kube.made if o["kind"] == "Secret"] == ["staging"]


# --- stopApp -------------------------------------------------------------------------------------


def test_stop_app_scales_to_zero_waits_for_the_pods_and_scales_back_before_completing(w: World) -> None:
    w.backup()
    app = w.app(replicas=2)
    with pytest.raises(Retry, match="waiting for the app to stop") as retry:
        w.rec.reconcile(w.restore(app=True))
    assert retry.value.delay == 3
    st = w.st()
    assert st["phase"] == "Queued"
    assert st["app"] == {
        "kind": "Deployment",
        "name": "shop",
        "originalReplicas": 2,
        "stopped": True,
        "restarted": False,
    }
    assert w.kube.scaled == [(NS, "shop", 0)] and w.kube.created_jobs == []

    with pytest.raises(Retry):  # scaled to 0, but its Pods are still there
        w.rec.reconcile(w.get())
    assert w.kube.created_jobs == [] and w.kube.scaled == [(NS, "shop", 0)]

    app.status.replicas = 0
    w.rec.reconcile(w.get())
    assert [j["metadata"]["name"] for j in w.kube.created_jobs] == [JOB]
    assert w.kube.reasons("r1") == ["Queued", "StoppingApp", "AppStopped"]

    w.kube.job_output[(NS, JOB)] = [{"snapshotId": "a1"}]
    w.rec.sync_from_job(w.get(), w.finished())
    assert w.kube.scaled == [(NS, "shop", 0), (NS, "shop", 2)] and app.spec.replicas == 2
    st = w.st()
    assert st["phase"] == "Completed" and st["app"]["restarted"] is True
    assert w.kube.reasons("r1")[-2:] == ["RestartedApp", "Completed"]  # scaled back before terminal

    w.rec.reconcile(w.get())  # terminal: never scaled back twice
    assert len(w.kube.scaled) == 2


def test_stop_app_scales_back_when_the_job_fails(w: World) -> None:
    w.backup()
    app = w.app(replicas=3)
    with pytest.raises(Retry):
        w.rec.reconcile(w.restore(app=True))
    app.status.replicas = 0
    w.rec.reconcile(w.get())
    w.rec.sync_from_job(w.get(), w.finished("Failed", "BackoffLimitExceeded", "failed"))
    assert w.kube.scaled[-1] == (NS, "shop", 3)
    assert w.st()["phase"] == "Failed" and w.st()["app"]["restarted"] is True


def test_stop_false_leaves_the_app_running(w: World) -> None:
    w.backup()
    w.app(replicas=2)
    w.rec.reconcile(w.restore(app=True, stopApp=False))
    assert w.kube.scaled == [] and "app" not in w.st() and len(w.kube.created_jobs) == 1


def test_a_restore_deleted_while_the_app_is_stopped_scales_it_back(w: World) -> None:
    w.backup()
    w.app(replicas=2)
    with pytest.raises(Retry):
        w.rec.reconcile(w.restore(app=True))
    w.rec.restart_app_on_delete(w.get())
    assert w.kube.scaled == [(NS, "shop", 0), (NS, "shop", 2)]
    assert w.kube.reasons("r1")[-1] == "RestartedApp"
    assert "the Restore was deleted before it finished" in w.kube.events[-1][3]


def test_a_restore_deleted_after_its_app_came_back_does_not_scale_it_again(w: World) -> None:
    w.backup()
    w.restore()
    w.kube.patch_status(
        "restores",
        NS,
        "r1",
        {"app": {"name": "shop", "originalReplicas": 2, "stopped": True, "restarted": True}},
    )
    w.rec.restart_app_on_delete(w.get())
    assert w.kube.scaled == [] and w.kube.events == []


# --- where the snapshot is read from, model versions --------------------------------------------


def test_the_snapshot_is_read_from_a_replica_when_the_primary_cannot_be_reached(w: World) -> None:
    w.add_storage("dr", "bk-dr", prefix="dr")
    replica = {"storage": "dr", "role": "Replica", "state": "Replicated"}
    w.backup(locations=[{"storage": "s3", "role": "Primary", "state": "Replicated"}, replica])
    w.bk.down = "cannot connect to the S3 endpoint"
    w.rec.reconcile(w.restore())

    st = w.st()
    assert st["source"]["storage"] == "dr" and st["source"]["role"] == "Replica"
    assert st["source"]["reason"].startswith("the primary s3 cannot be reached: bucket bk at memory://")
    assert w.kube.reasons("r1") == ["Queued", "UsingReplica", "JobCreated"]
    job = json.dumps(w.kube.created_jobs[0])
    assert "dr/" + KEY in job and "dr-creds" in job and "s3-creds" not in job


def test_without_an_answering_replica_the_primary_is_used_and_says_why(w: World) -> None:
    w.add_storage("dr", "bk-dr")
    w.backup(locations=[{"storage": "dr", "role": "Replica", "state": "Replicated"}])
    w.bk.down = w.stores["bk-dr"].down = "cannot connect to the S3 endpoint"
    w.rec.reconcile(w.restore())
    source = w.st()["source"]
    assert source["role"] == "Primary" and source["reason"].startswith("no replica answers either; ")
    assert "UsingReplica" not in w.kube.reasons("r1") and len(w.kube.created_jobs) == 1


def test_a_model_version_mismatch_is_a_condition_and_a_warning_not_a_refusal(w: World) -> None:
    w.backup()
    w.app(replicas=1, version="8.0")
    w.rec.reconcile(w.restore(app=True, stopApp=False))
    st = w.st()
    assert (st["modelVersion"], st["targetModelVersion"]) == ("7.1", "8.0")
    cond = w.conds()["ModelVersionMismatch"]
    assert (
        cond["status"] == "True" and "model version 7.1 differs from the target app's 8.0" in cond["message"]
    )
    assert "ModelVersionMismatch" in w.kube.reasons("r1") and len(w.kube.created_jobs) == 1


# --- retries -------------------------------------------------------------------------------------


def test_the_sweep_follows_a_finished_job_once_it_settled(w: World) -> None:
    w.backup()
    w.rec.reconcile(w.restore())
    w.kube.job_output[(NS, JOB)] = [{"snapshotId": "a1"}]
    w.finished()  # its event was lost
    w.clock.current = NOW - dt.timedelta(seconds=5) + restore_mod.SETTLE - dt.timedelta(seconds=1)
    assert w.rec.retry_sweep([w.get()]) == []
    assert w.st()["phase"] == "Queued"
    w.clock.advance(1)
    assert w.rec.retry_sweep([w.get()]) == [f"{NS}/r1"]
    assert w.st()["phase"] == "Completed"
    assert w.rec.retry_sweep([w.get()]) == []  # terminal: left alone


def test_a_conflict_on_the_status_write_is_retried(w: World) -> None:
    w.backup()
    w.kube.fail("patch_status", 409, 409)
    w.rec.reconcile(w.restore())
    assert w.st()["phase"] == "Queued" and w.st()["jobName"] == JOB
    assert w.kube.reasons("r1") == ["Queued", "JobCreated"]


def test_a_status_write_that_keeps_conflicting_raises_and_writes_nothing(w: World) -> None:
    w.backup()
    w.kube.fail("patch_status", *[409] * 5)
    with pytest.raises(StatusConflict):
        w.rec.reconcile(w.restore())
    assert w.st() == {} and w.kube.events == [] and w.kube.created_jobs == []


def test_a_retrying_that_ended_does_not_count_against_a_later_transient_error(w: World) -> None:
    """A transient error is retried until RETRY_DEADLINE *after the retrying began*. Once a try
    gets past it, that episode is over: a new error twenty minutes later (while the app's Pods
    are still stopping) is retried like any first one, not failed at once."""
    w.backup()
    app = w.app(replicas=2)
    body = w.restore(app=True)
    w.kube.fail("secret_data", 503)  # the target database Secret cannot be read right now
    with pytest.raises(Retry, match="503"):
        w.rec.reconcile(body)
    w.clock.advance(10)
    with pytest.raises(Retry, match="waiting for the app to stop"):  # got past it
        w.rec.reconcile(w.get())
    assert w.kube.scaled == [(NS, "shop", 0)]

    w.clock.advance(20 * 60)  # the Pods take their time
    with pytest.raises(Retry, match="waiting for the app to stop"):
        w.rec.reconcile(w.get())
    w.kube.fail("secret_data", 503)  # one new blip
    with contextlib.suppress(Retry):
        w.rec.reconcile(w.get())
    assert w.st()["phase"] == "Queued", w.st()["message"]
    app.status.replicas = 0
    w.clock.advance(10)
    w.rec.reconcile(w.get())
    assert len(w.kube.created_jobs) == 1


def test_once_the_job_is_created_the_status_no_longer_says_it_is_retrying(w: World) -> None:
    w.backup()
    w.kube.fail("secret_data", 503)
    with pytest.raises(Retry):
        w.rec.reconcile(w.restore())
    w.clock.advance(10)
    w.rec.reconcile(w.get())
    st = w.st()
    assert st["jobName"] == JOB and st["message"] == "restore Job created"
    assert "Retrying" not in w.conds() and "nextRetryAt" not in st, st


def test_a_refusal_after_the_app_was_stopped_scales_it_back(w: World) -> None:
    """Across namespaces the manifest is read for the presigned URLs only after the app stopped:
    a damaged one is refused, and the app gets its replicas back before the Restore fails."""
    w.kube.objects[("backupstorages", NS, "s3")]["spec"]["allowedRestoreNamespaces"] = ["staging"]
    w.backup(contents="DatabaseOnly", files=False)
    app = workload(2)
    w.kube.workloads[("staging", "shop")] = app
    w.bk.put(KEY, b"not a manifest")
    body = w.restore("staging", app=True)
    with pytest.raises(Retry, match="waiting for the app to stop"):
        w.rec.reconcile(body)
    app.status.replicas = 0
    w.rec.reconcile(w.get("staging"))

    st = w.st("staging")
    assert st["phase"] == "Failed" and st["targetState"] == "Unchanged"
    assert st["message"].startswith("reading the backup's manifest: ") and st["message"].endswith(
        "nothing was changed"
    )
    assert w.kube.scaled == [("staging", "shop", 0), ("staging", "shop", 2)]
    assert st["app"]["restarted"] is True and w.kube.created_jobs == []
    assert w.kube.reasons("r1")[-2:] == ["RestartedApp", "Failed"]
