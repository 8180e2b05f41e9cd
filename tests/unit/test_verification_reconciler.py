"""Every phase transition of a Verification (a restore drill) through ``VerificationReconciler``.

Driven with the one fake of the Kubernetes API (tests/fakes.py) and a clock moved by hand. The
drill's Job is played by the test: ``set_job`` gives it a status, ``job_output`` its agent's
result (the shape of ``nightjar.agent.verify.run_verify``), ``pod_uids`` its Pods. The metrics
live in prometheus_client's process-wide registry: every test has a namespace of its own.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import uuid
from typing import Any

import pytest

from nightjar import metrics
from nightjar.config import OperatorConfig
from nightjar.domain.retention import format_time
from nightjar.reconcile.errors import Retry
from nightjar.reconcile.verification import SETTLE, VerificationReconciler
from tests.fakes import NOW, FakeClock, FakeKube

JOB = "nightjar-verify-v1"
CLEANUP = "nightjar-verify-cleanup-v1"
KEY = "nightjar/v1/shop/src/uid-b1/snap-1/manifest.json"
G = metrics.REGISTRY.get_sample_value

PASSED_RESULT: dict[str, Any] = {
    "passed": True,
    "restoreSeconds": 12.5,
    "tablesChecked": 7,
    "rowsChecked": 1234,
    "exactCounts": True,
    "filesChecked": 3,
    "bytesChecked": 300,
    "temporaryDatabase": "nightjar_verify_pod1",
    "temporaryDatabaseDropped": True,
    "snapshotId": "snap-1",
}
PG_RESTORE_ERROR = (
    'pg_restore: error: could not execute query: ERROR:  relation "public.orders" does not exist'
)
COUNT_MISMATCH = "table public.orders: 1000 rows recorded at backup time, 999 restored"


def ns() -> str:
    return f"v-{uuid.uuid4().hex[:8]}"


def complete(at: dt.datetime = NOW) -> dict[str, Any]:
    t = format_time(at)
    return {
        "succeeded": 1,
        "completionTime": t,
        "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": t}],
    }


def failed(reason: str = "BackoffLimitExceeded", at: dt.datetime = NOW) -> dict[str, Any]:
    t = format_time(at)
    return {
        "failed": 1,
        "conditions": [
            {
                "type": "Failed",
                "status": "True",
                "reason": reason,
                "message": "Job has reached the specified backoff limit",
                "lastTransitionTime": t,
            }
        ],
    }


class World:
    """A namespace of its own: the BackupStorage "s3", the Completed Backup "b1" of source "src",
    the scratch Secret "scratch", the source's own database Secret "db" (never given to a drill),
    and a VerificationReconciler."""

    def __init__(self, kube: FakeKube | None = None) -> None:
        self.ns = ns()
        self.kube = kube or FakeKube()
        self.clock = FakeClock()
        self.config = OperatorConfig()
        self.rec = VerificationReconciler(self.kube, self.config, clock=self.clock)
        self.kube.add(
            "backupstorages",
            {
                "metadata": {"name": "s3", "namespace": self.ns},
                "spec": {"endpoint": "http://s3.test", "bucket": "bk", "credentials": {"secretName": "s3"}},
            },
        )
        self.kube.add_secret(self.ns, "s3", AWS_ACCESS_KEY_ID="a", AWS_SECRET_ACCESS_KEY="b")
        self.kube.add_secret(
            self.ns, "scratch", host="pg", port="5432", dbname="postgres", user="u", password="p"
        )
        self.kube.add_secret(self.ns, "db", uri="postgresql://app@prod/shop")
        self.backup()

    def backup(self, **status: Any) -> dict[str, Any]:
        st = {
            "phase": "Completed",
            "sourceId": "src",
            "completedOn": "2026-11-24T17:00:00Z",
            "storage": {"storageName": "s3", "manifestKey": KEY, "manifestSha256": "ab" * 32},
            "conditions": [
                {"type": "Completed", "status": "True", "reason": "Done", "lastTransitionTime": "x"}
            ],
            **status,
        }
        return self.kube.add(
            "backups",
            {
                "metadata": {"name": "b1", "namespace": self.ns},
                "spec": {
                    "storageRef": {"name": "s3"},
                    "contents": "Full",
                    "source": {"database": {"secretRef": {"name": "db"}}},
                },
                "status": {k: v for k, v in st.items() if v is not None},
            },
        )

    def verification(self, scratch: str | None = "scratch", **status: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {"backupName": "b1"}
        if scratch is not None:
            spec["scratch"] = {"database": {"secretRef": {"name": scratch}}}
        body: dict[str, Any] = {"metadata": {"name": "v1", "namespace": self.ns}, "spec": spec}
        if status:
            body["status"] = status
        return self.kube.add("verifications", body)

    def get(self) -> dict[str, Any]:
        out = self.kube.get("verifications", self.ns, "v1")
        assert out is not None
        return out

    @property
    def st(self) -> dict[str, Any]:
        return self.kube.status_of("verifications", self.ns, "v1")

    @property
    def bst(self) -> dict[str, Any]:
        return self.kube.status_of("backups", self.ns, "b1")

    def started(self) -> dict[str, Any]:
        """A Verification whose Job was created."""
        self.rec.reconcile(self.verification())
        assert self.st["jobName"] == JOB
        return self.get()

    def job(self, job_status: dict[str, Any], *results: dict[str, Any], pods: tuple[str, ...] = ()) -> None:
        self.kube.set_job(self.ns, JOB, job_status, **{"nightjar.dev/verification": "v1"})
        if results:
            self.kube.job_output[(self.ns, JOB)] = list(results)
        if pods:
            self.kube.pod_uids[(self.ns, JOB)] = list(pods)

    def metric(self, result: str) -> float | None:
        return G("nightjar_verifications_total", {"namespace": self.ns, "result": result})

    def last_verified(self) -> float | None:
        return G("nightjar_backup_last_verified_timestamp_seconds", {"namespace": self.ns, "source": "src"})


def cond(status: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), None)


def env_secrets(job: dict[str, Any]) -> set[str]:
    names = set()
    for c in job["spec"]["template"]["spec"]["containers"]:
        for e in c.get("env") or []:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
    return names


# --- Queued, the Job, Running --------------------------------------------------------------------


def test_a_new_drill_is_queued_and_gets_its_job_and_access_objects() -> None:
    w = World()
    w.rec.reconcile(w.verification())

    st = w.st
    assert st["phase"] == "Queued" and st["backup"] == "b1"
    assert st["jobName"] == JOB and st["message"] == "drill Job created"
    assert [j["metadata"]["name"] for j in w.kube.created_jobs] == [JOB]
    job = w.kube.created_jobs[0]
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["agent", "verify"] and KEY in args
    assert job["metadata"]["ownerReferences"][0]["kind"] == "Verification"
    # The drill gets the scratch server and the storage, never the source database.
    assert "scratch" in env_secrets(job) and "db" not in env_secrets(job)
    assert sorted(o["kind"] for o in w.kube.made) == ["Role", "RoleBinding", "ServiceAccount"]
    role = next(o for o in w.kube.made if o["kind"] == "Role")
    assert role["rules"][0]["resourceNames"] == ["v1"]
    assert w.kube.reasons("v1") == ["Queued", "JobCreated"]


def test_reconciling_again_makes_no_second_job() -> None:
    w = World()
    first = w.verification()
    w.rec.reconcile(copy.deepcopy(first))
    w.rec.reconcile(w.get())
    w.rec.reconcile(first)  # a stale body (no status yet) as after a restart
    assert len(w.kube.created_jobs) == 1
    assert w.kube.reasons("v1") == ["Queued", "JobCreated"]
    assert w.st["phase"] == "Queued"


def test_an_active_job_makes_the_drill_running_once() -> None:
    w = World()
    v = w.started()
    w.job({"active": 1, "startTime": "2026-11-24T18:00:05Z"})
    w.rec.follow(v)
    w.rec.follow(w.get())
    st = w.st
    assert st["phase"] == "Running" and st["startedAt"] == "2026-11-24T18:00:05Z"
    assert "temporary database" in st["message"]
    assert w.kube.reasons("v1") == ["Queued", "JobCreated", "Running"]


# --- Passed -------------------------------------------------------------------------------------


def test_a_passed_drill_records_what_it_measured_here_on_the_backup_and_in_the_metrics() -> None:
    w = World()
    v = w.started()
    w.job({"active": 1})
    w.rec.follow(v)
    w.clock.advance(60)
    w.job(complete(w.clock.now()), PASSED_RESULT)
    w.rec.follow(w.get())

    st = w.st
    assert st["phase"] == "Passed"
    assert {k: st[k] for k in ("restoreSeconds", "tablesChecked", "rowsChecked", "filesChecked")} == {
        "restoreSeconds": 12.5,
        "tablesChecked": 7,
        "rowsChecked": 1234,
        "filesChecked": 3,
    }
    assert st["bytesChecked"] == 300
    assert st["message"] == "restored in 12.5 s: 7 tables, 1234 rows (exact counts), 3 files checked"
    assert st["finishedAt"] == format_time(w.clock.now())
    verified = cond(st, "Verified")
    assert verified is not None and verified["status"] == "True" and verified["reason"] == "Restored"
    assert cond(st, "Retrying") is None
    # The Backup shows its last drill; its own status and conditions stay.
    bst = w.bst
    assert bst["verification"] == {
        "name": "v1",
        "result": "Passed",
        "time": format_time(w.clock.now()),
        "restoreSeconds": 12.5,
    }
    assert bst["phase"] == "Completed"
    b_verified = cond(bst, "Verified")
    assert b_verified is not None and b_verified["status"] == "True"
    assert cond(bst, "Completed") is not None
    assert w.kube.reasons("b1") == []  # no Warning on a passed drill
    assert w.kube.reasons("v1")[-1] == "Passed"
    # No cleanup: the agent dropped its temporary database.
    assert [j["metadata"]["name"] for j in w.kube.created_jobs] == [JOB]
    assert w.kube.calls["job_pod_uids"] == 0
    # Metrics.
    assert w.metric("Passed") == 1 and w.metric("Failed") == 0
    assert w.last_verified() == w.clock.now().timestamp()
    assert G("nightjar_verification_restore_seconds_count", {"namespace": w.ns}) == 1
    assert G("nightjar_verification_restore_seconds_sum", {"namespace": w.ns}) == 12.5


def test_a_passed_drill_says_in_status_whether_counts_were_exact() -> None:
    """The CRD documents status.exactCounts ("True when the restored row counts were compared
    with counts recorded at backup time"); the agent reports it."""
    w = World()
    v = w.started()
    w.job(complete(), PASSED_RESULT)
    w.rec.follow(v)
    assert w.st["phase"] == "Passed"
    assert w.st.get("exactCounts") is True


def test_a_drill_without_recorded_counts_passes_without_saying_exact() -> None:
    w = World()
    v = w.started()
    w.job(complete(), {**PASSED_RESULT, "exactCounts": False, "filesChecked": 0})
    w.rec.follow(v)
    assert w.st["phase"] == "Passed"
    assert w.st["message"] == "restored in 12.5 s: 7 tables, 1234 rows, 0 files checked"


# --- Failed -------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [PG_RESTORE_ERROR, COUNT_MISMATCH])
def test_a_failed_drill_says_the_agents_reason_and_warns_on_the_backup(error: str) -> None:
    w = World()
    v = w.started()
    result = {
        "passed": False,
        "error": error,
        "restoreSeconds": 3.0,
        "tablesChecked": 2,
        "temporaryDatabase": "nightjar_verify_pod1",
        "temporaryDatabaseDropped": True,
    }
    w.job(failed(), result)
    w.rec.follow(v)

    st = w.st
    assert st["phase"] == "Failed" and st["message"] == error
    assert st["restoreSeconds"] == 3.0 and st["tablesChecked"] == 2
    verified = cond(st, "Verified")
    assert verified is not None and verified["status"] == "False" and verified["reason"] == "DrillFailed"
    assert w.bst["verification"]["result"] == "Failed" and w.bst["verification"]["name"] == "v1"
    b_verified = cond(w.bst, "Verified")
    assert b_verified is not None and b_verified["status"] == "False"
    assert w.bst["phase"] == "Completed"
    warnings = [(t, r, m) for n, t, r, m in w.kube.events if n == "b1"]
    assert warnings == [("Warning", "VerificationFailed", f"restore drill v1: {error}")]
    assert ("v1", "Warning", "Failed", error) in w.kube.events
    # The agent dropped its database: no cleanup.
    assert len(w.kube.created_jobs) == 1
    assert w.metric("Failed") == 1 and w.metric("Passed") is None
    assert w.last_verified() is None


def test_a_job_that_ran_past_its_deadline_fails_saying_so() -> None:
    w = World()
    v = w.started()
    stopped = {"passed": False, "error": "stopped (SIGTERM)", "temporaryDatabase": "nightjar_verify_p"}
    stopped["temporaryDatabaseDropped"] = True
    w.job(failed("DeadlineExceeded"), stopped)
    w.rec.follow(v)
    st = w.st
    assert st["phase"] == "Failed"
    deadline = w.config.job_active_deadline_seconds
    assert st["message"] == f"the drill ran longer than {deadline}s and was stopped"
    verified = cond(st, "Verified")
    assert verified is not None and verified["reason"] == "DeadlineExceeded"
    assert w.kube.reasons("b1") == ["VerificationFailed"]


# --- refusals: nothing is created ------------------------------------------------------------------


def _missing_backup(w: World) -> None:
    del w.kube.objects[("backups", w.ns, "b1")]


def _running_backup(w: World) -> None:
    w.backup(phase="Running")


def _no_manifest(w: World) -> None:
    w.backup(storage={"storageName": "s3"})


def _storage_gone(w: World) -> None:
    del w.kube.objects[("backupstorages", w.ns, "s3")]


def _scratch_missing(w: World) -> None:
    del w.kube.secrets[(w.ns, "scratch")]


def _scratch_lacks_keys(w: World) -> None:
    w.kube.add_secret(w.ns, "scratch", password="p")


@pytest.mark.parametrize(
    ("breakage", "scratch", "says"),
    [
        (_missing_backup, "scratch", 'Backup "b1" not found in namespace'),
        (_running_backup, "scratch", "Backup b1 is Running, not Completed"),
        (_no_manifest, "scratch", "Backup b1 records no manifest"),
        (_storage_gone, "scratch", 'BackupStorage "s3" no longer exists'),
        (_scratch_missing, "scratch", 'scratch database: Secret "scratch" not found'),
        (_scratch_lacks_keys, "scratch", 'Secret "scratch" has no key uri, nor the key(s) host'),
    ],
    ids=[
        "backup-missing",
        "not-completed",
        "no-manifest",
        "storage-gone",
        "no-secret",
        "no-keys",
    ],
)
def test_a_refused_drill_fails_at_once_and_creates_nothing(
    breakage: Any, scratch: str | None, says: str
) -> None:
    w = World()
    breakage(w)
    w.rec.reconcile(w.verification(scratch=scratch))

    st = w.st
    assert st["phase"] == "Failed"
    assert says in st["message"] and st["message"].endswith("; nothing was created")
    verified = cond(st, "Verified")
    assert verified is not None and verified["status"] == "False" and verified["reason"] == "Refused"
    assert w.kube.created_jobs == [] and w.kube.made == []
    assert "jobName" not in st
    assert w.kube.reasons("v1") == ["Queued", "Failed"]
    assert w.metric("Failed") == 1


# --- transient errors ---------------------------------------------------------------------------


def test_an_api_outage_reading_the_backup_is_retried_then_the_job_is_made() -> None:
    w = World()
    v = w.verification(phase="Queued")
    w.kube.fail("get", 503)  # the first read: the Backup
    with pytest.raises(Retry) as retry:
        w.rec.reconcile(v)
    st = w.st
    assert st["phase"] == "Queued" and "jobName" not in st
    assert "503" in st["message"] and f"retrying in {retry.value.delay:.0f} s" in st["message"]
    assert st["nextRetryAt"] == format_time(NOW + dt.timedelta(seconds=retry.value.delay))
    retrying = cond(st, "Retrying")
    assert retrying is not None and retrying["status"] == "True"
    assert retrying["reason"] == "KubernetesUnavailable"
    assert w.kube.created_jobs == []

    w.clock.advance(retry.value.delay)
    w.rec.reconcile(w.get())
    assert w.st["jobName"] == JOB and w.st["phase"] == "Queued"
    assert [j["metadata"]["name"] for j in w.kube.created_jobs] == [JOB]


def test_the_retrying_condition_ends_once_the_job_is_made() -> None:
    """Like a Restore's (commit d4f3bf2): a drill whose Job runs is not retrying anything."""
    w = World()
    v = w.verification(phase="Queued")
    w.kube.fail("get", 503)
    with pytest.raises(Retry):
        w.rec.reconcile(v)
    w.clock.advance(10)
    w.rec.reconcile(w.get())
    assert w.st["jobName"] == JOB
    assert cond(w.st, "Retrying") is None
    assert "nextRetryAt" not in w.st


def test_an_outage_that_outlasts_the_deadline_fails_the_drill() -> None:
    w = World()
    v = w.verification(phase="Queued")
    w.kube.fail("get", 503)
    with pytest.raises(Retry):
        w.rec.reconcile(v)
    w.clock.advance(16 * 60)
    again = w.get()
    w.kube.fail("get", 503)
    w.rec.reconcile(again)
    st = w.st
    assert st["phase"] == "Failed" and "still failing after 15 min" in st["message"]
    assert cond(st, "Retrying") is None and "nextRetryAt" not in st
    assert w.kube.created_jobs == []


def test_a_permanent_api_error_fails_at_once() -> None:
    w = World()
    v = w.verification(phase="Queued")
    w.kube.fail("get", 403)
    w.rec.reconcile(v)
    assert w.st["phase"] == "Failed" and "403" in w.st["message"]
    assert w.st["message"].endswith("nothing was created")
    assert w.kube.created_jobs == []


# --- cleanup of a drill whose agent was killed ------------------------------------------------------


def test_a_killed_agent_gets_a_cleanup_job_before_the_drill_ends() -> None:
    w = World()
    v = w.started()
    w.job({"active": 1})
    w.rec.follow(v)
    w.job(failed(), {"error": "exit code 137"}, pods=("pod-uid-1",))
    w.rec.follow(w.get())

    assert [j["metadata"]["name"] for j in w.kube.created_jobs] == [JOB, CLEANUP]
    cleanup = w.kube.created_jobs[1]
    args = cleanup["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["agent", "verify-cleanup"]
    assert args[args.index("--drill-id") + 1] == "pod-uid-1"
    assert env_secrets(cleanup) == {"scratch"}
    assert cleanup["metadata"]["labels"]["nightjar.dev/verification"] == "v1"
    st = w.st
    assert st["phase"] == "Running"  # not terminal while its database may exist
    assert "dropping it" in st["message"]
    assert w.metric("Failed") is None and "verification" not in w.bst

    # Following again (an event, the sweep) while the cleanup runs changes nothing.
    w.rec.follow(w.get())
    w.kube.set_job(w.ns, CLEANUP, {"active": 1})
    w.rec.follow(w.get())
    assert len(w.kube.created_jobs) == 2 and w.st["phase"] == "Running"

    # The cleanup Job's end (its event: follow) makes the drill terminal.
    w.kube.set_job(w.ns, CLEANUP, complete())
    w.kube.job_output[(w.ns, CLEANUP)] = [{"dropped": ["nightjar_verify_poduid1"], "absent": []}]
    w.rec.follow(w.get())
    st = w.st
    assert st["phase"] == "Failed"
    assert st["message"] == "exit code 137; the cleanup Job dropped nightjar_verify_poduid1"
    assert w.bst["verification"]["result"] == "Failed"
    assert w.kube.reasons("b1") == ["VerificationFailed"]
    assert w.metric("Failed") == 1


def test_a_cleanup_that_found_nothing_says_so() -> None:
    w = World()
    v = w.started()
    w.job(failed(), {"error": "exit code 137"}, pods=("p1",))
    w.rec.follow(v)
    w.kube.set_job(w.ns, CLEANUP, complete())
    w.kube.job_output[(w.ns, CLEANUP)] = [{"dropped": [], "absent": ["nightjar_verify_p1"]}]
    w.rec.follow(w.get())
    assert w.st["message"] == "exit code 137; the cleanup Job dropped nothing (none left)"


def test_a_cleanup_that_fails_ends_the_drill_naming_what_may_be_left() -> None:
    w = World()
    v = w.started()
    w.job(failed(), {"error": "exit code 137"}, pods=("p1",))
    w.rec.follow(v)
    w.kube.set_job(w.ns, CLEANUP, failed())
    w.kube.job_output[(w.ns, CLEANUP)] = [{"error": "scratch server: connection refused"}]
    w.rec.follow(w.get())
    st = w.st
    assert st["phase"] == "Failed"
    assert st["message"] == (
        "exit code 137; its temporary database (nightjar_verify_*) may be left on the scratch server: "
        "scratch server: connection refused"
    )


def test_an_agent_that_could_not_drop_its_database_gets_a_cleanup_too() -> None:
    w = World()
    v = w.started()
    result = {
        "passed": False,
        "error": "the temporary database nightjar_verify_p1 could not be dropped: timeout; drop it by hand",
        "temporaryDatabase": "nightjar_verify_p1",
        "temporaryDatabaseDropped": False,
    }
    w.job(failed(), result, pods=("p1",))
    w.rec.follow(v)
    assert [j["metadata"]["name"] for j in w.kube.created_jobs] == [JOB, CLEANUP]
    assert w.st["phase"] == "Queued"


def test_a_killed_agent_whose_pods_are_gone_fails_saying_what_may_be_left() -> None:
    w = World()
    v = w.started()
    w.job(failed(), {"error": "exit code 137"})  # no Pods left to name the database by
    w.rec.follow(v)
    assert len(w.kube.created_jobs) == 1
    assert w.st["phase"] == "Failed"
    assert "may be left on the scratch server" in w.st["message"]


# --- terminal, the sweep ------------------------------------------------------------------------


def test_a_terminal_drill_never_changes() -> None:
    w = World()
    v = w.started()
    w.job(complete(), PASSED_RESULT)
    w.rec.follow(v)
    events, verification = list(w.kube.events), dict(w.bst["verification"])
    w.job(failed(), {"error": "exit code 137"}, pods=("p1",))
    w.clock.advance(3600)
    w.rec.follow(w.get())
    w.rec.reconcile(w.get())
    w.rec.sync_from_job(v, w.kube.jobs[(w.ns, JOB)])
    assert w.rec.retry_sweep([w.get()]) == []
    assert w.st["phase"] == "Passed" and w.kube.events == events
    assert w.bst["verification"] == verification
    assert len(w.kube.created_jobs) == 1
    assert w.metric("Passed") == 1 and w.metric("Failed") == 0


def test_the_sweep_follows_a_finished_job_once_it_settled() -> None:
    w = World()
    w.started()
    w.job(complete(NOW), PASSED_RESULT)
    w.clock.advance(SETTLE.total_seconds() - 1)
    assert w.rec.retry_sweep([w.get()]) == []
    assert w.st["phase"] == "Queued"
    w.clock.advance(2)
    assert w.rec.retry_sweep([w.get()]) == [f"{w.ns}/v1"]
    assert w.st["phase"] == "Passed"
    assert w.rec.retry_sweep([w.get()]) == []


def test_the_sweep_skips_running_jobs_and_drills_without_a_job() -> None:
    w = World()
    w.rec.reconcile(w.verification(scratch=None))  # refused: terminal, no job
    other = World()
    other.started()
    other.job({"active": 1})
    other.clock.advance(3600)
    assert w.rec.retry_sweep([w.get()]) == []
    assert other.rec.retry_sweep([other.get()]) == []
    assert other.st["phase"] == "Queued"


def test_the_sweep_brings_a_killed_drill_through_its_cleanup() -> None:
    w = World()
    w.started()
    w.job(failed(at=NOW), {"error": "exit code 137"}, pods=("p1",))
    w.clock.advance(60)
    assert w.rec.retry_sweep([w.get()]) == [f"{w.ns}/v1"]
    assert len(w.kube.created_jobs) == 2 and w.st["phase"] == "Queued"
    w.kube.set_job(w.ns, CLEANUP, complete())
    w.kube.job_output[(w.ns, CLEANUP)] = [{"dropped": ["nightjar_verify_p1"]}]
    w.rec.retry_sweep([w.get()])
    assert w.st["phase"] == "Failed"
    assert w.st["message"].endswith("the cleanup Job dropped nightjar_verify_p1")


def test_a_later_drill_of_the_same_backup_replaces_the_record() -> None:
    w = World()
    v = w.started()
    w.job(failed(), {"passed": False, "error": COUNT_MISMATCH, "temporaryDatabaseDropped": True})
    w.rec.follow(v)
    assert w.bst["verification"]["result"] == "Failed"
    # A second drill (another Verification of b1) passes an hour later.
    w.clock.advance(3600)
    w.kube.add(
        "verifications",
        {
            "metadata": {"name": "v2", "namespace": w.ns},
            "spec": {"backupName": "b1", "scratch": {"database": {"secretRef": {"name": "scratch"}}}},
        },
    )
    v2 = w.kube.get("verifications", w.ns, "v2")
    assert v2 is not None
    w.rec.reconcile(v2)
    w.kube.set_job(w.ns, "nightjar-verify-v2", complete(w.clock.now()))
    w.kube.job_output[(w.ns, "nightjar-verify-v2")] = [PASSED_RESULT]
    w.rec.follow(w.kube.get("verifications", w.ns, "v2") or {})
    assert w.bst["verification"]["name"] == "v2" and w.bst["verification"]["result"] == "Passed"
    b_verified = cond(w.bst, "Verified")
    assert b_verified is not None and b_verified["status"] == "True"
    assert w.metric("Failed") == 1 and w.metric("Passed") == 1


def test_a_killed_agent_whose_scratch_secret_is_gone_still_ends() -> None:
    """Like a Backup or BackupStorage gone at that moment: the drill cannot be cleaned up, so it
    ends naming what may be left, instead of raising on every follow and sweep, never terminal."""
    w = World()
    v = w.started()
    del w.kube.secrets[(w.ns, "scratch")]
    w.job(failed(), {"error": "exit code 137"}, pods=("p1",))
    w.rec.follow(v)
    assert w.st["phase"] == "Failed"
    assert "may be left on the scratch server" in w.st["message"]


class BackupReadFails(FakeKube):
    """The fake, with the next read of a Backup failing with 503 once armed: the one call no
    ``fail("get", ...)`` can single out (the Verification is read just before it)."""

    armed = False

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        if plural == "backups" and self.armed:
            self.armed = False
            self.fail("get", 503)
        return super().get(plural, namespace, name)


def test_a_blip_reading_the_backup_when_the_drill_ends_does_not_lose_its_record() -> None:
    """The drill is made terminal first, then the Backup is read to record it: an API error on
    that read must not leave a Passed drill whose Backup never shows it (the Verified column,
    status.verification, the last-verified gauge): once terminal, nothing records it again."""
    kube = BackupReadFails()
    w = World(kube)
    w.started()
    w.job(complete(), PASSED_RESULT)
    kube.armed = True
    with contextlib.suppress(Exception):  # a raise: the event handler logs it
        w.rec.follow(w.get())
    w.clock.advance(60)
    w.rec.retry_sweep([w.get()])  # and the sweep follows the Job again
    w.rec.follow(w.get())
    assert w.st["phase"] == "Passed"
    assert (w.bst.get("verification") or {}).get("result") == "Passed"
    assert w.metric("Passed") == 1
    assert w.last_verified() is not None
