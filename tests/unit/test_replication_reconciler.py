"""Every transition of a Completed Backup's replica locations, through ``Replicator``.

A replica location goes Pending (no Job) → Pending (attempt n, its Job) → Replicated, or →
Failed (retried with backoff, a new attempt), or → Failed for good (``final``: refused by the
residency policy, no longer a replica, the primary gone or moved). Driven with the one fake of
the Kubernetes API (tests/fakes.py), a clock moved by hand and in-memory object stores; the
replicas' reachability check (``storage.unreachable``) reaches them through ``storage.store_of``,
which the Replicator does not take as a parameter, so it is routed to the stores here.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from nightjar.config import OperatorConfig
from nightjar.constants import ANNOTATION_EXPIRES_AT
from nightjar.domain.residency import default_policy
from nightjar.domain.retention import format_time
from nightjar.jobs import replicate_job_name
from nightjar.reconcile.ports import list_all
from nightjar.reconcile.replication import Replicator
from nightjar.reconcile.status import StatusConflict
from nightjar.storage.objects import ObjectStore, S3Target
from tests.fakes import NOW, FakeClock, FakeKube
from tests.memstore import MemoryStore

NS = "shop"
KEY = "nightjar/v1/shop/src/uid-b1/a1/manifest.json"
JOB1 = replicate_job_name("b1", "dr", 1)
JOB2 = replicate_job_name("b1", "dr", 2)


def fmt(t: dt.datetime) -> str:
    return format_time(t)


def primary_loc() -> dict[str, Any]:
    return {"storage": "s3", "role": "Primary", "jurisdiction": "EU", "state": "Replicated"}


def pending(name: str = "dr") -> dict[str, Any]:
    return {
        "storage": name,
        "role": "Replica",
        "jurisdiction": "EU",
        "state": "Pending",
        "attempts": 0,
        "message": "waiting for the copy",
    }


class World:
    """The primary "s3" (EU, bucket "bk") with the replica "dr" (EU, bucket "bk-dr"), the
    Completed Backup "b1" of it, and a Replicator."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kube: FakeKube | None = None) -> None:
        self.kube = kube or FakeKube()
        self.clock = FakeClock()
        self.config = OperatorConfig()
        self.stores: dict[str, MemoryStore] = {}
        self.add_storage("s3", "bk", replicas=[{"name": "dr"}])
        self.add_storage("dr", "bk-dr")
        self.rep = Replicator(self.kube, self.config, default_policy(), self.clock, self.open_store)

    def open_store(self, target: S3Target) -> ObjectStore:
        return self.stores[target.bucket]

    def add_storage(self, name: str, bucket: str, jurisdiction: str = "EU", **spec: Any) -> None:
        self.kube.add(
            "backupstorages",
            {
                "metadata": {"name": name, "namespace": NS},
                "spec": {
                    "endpoint": f"http://{name}.test",
                    "bucket": bucket,
                    "credentials": {"secretName": f"{name}-creds"},
                    "jurisdiction": jurisdiction,
                    **spec,
                },
            },
        )
        self.kube.add_secret(NS, f"{name}-creds", AWS_ACCESS_KEY_ID="a", AWS_SECRET_ACCESS_KEY="b")
        self.stores[bucket] = MemoryStore(bucket)

    def storage_spec(self, name: str) -> dict[str, Any]:
        spec: dict[str, Any] = self.kube.objects[("backupstorages", NS, name)]["spec"]
        return spec

    def backup(
        self, name: str = "b1", locations: list[dict[str, Any]] | None = None, **kw: Any
    ) -> dict[str, Any]:
        expires = kw.pop("expires", NOW + dt.timedelta(days=90))
        return self.kube.add(
            "backups",
            {
                "metadata": {
                    "name": name,
                    "namespace": NS,
                    "annotations": {ANNOTATION_EXPIRES_AT: fmt(expires)},
                },
                "spec": {"storageRef": {"name": "s3"}, "source": {}},
                "status": {
                    "phase": "Completed",
                    "completedOn": fmt(NOW - dt.timedelta(minutes=1)),
                    "storage": {
                        "storageName": "s3",
                        "endpoint": "http://s3.test",
                        "bucket": "bk",
                        "manifestKey": KEY,
                        "manifestSha256": "ab" * 32,
                    },
                    "locations": locations if locations is not None else [primary_loc(), pending()],
                    **kw,
                },
            },
        )

    def get(self, name: str = "b1") -> dict[str, Any]:
        out = self.kube.get("backups", NS, name)
        assert out is not None
        return out

    def loc(self, storage: str = "dr", name: str = "b1") -> dict[str, Any]:
        st = self.kube.status_of("backups", NS, name)
        return next(loc for loc in st["locations"] if loc["storage"] == storage)

    def replicated_cond(self, name: str = "b1") -> dict[str, Any]:
        st = self.kube.status_of("backups", NS, name)
        return next(c for c in st["conditions"] if c["type"] == "Replicated")

    def finish(self, job: str, ok: bool, **result: Any) -> dict[str, Any]:
        """The copy Job ended; its agent reported ``result``."""
        body = self.kube.jobs[(NS, job)]
        if ok:
            body["status"] = {"succeeded": 1}
        else:
            body["status"] = {
                "failed": 1,
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "BackoffLimitExceeded",
                        "message": "gave up",
                    }
                ],
            }
        self.kube.job_output[(NS, job)] = [result] if result else []
        return dict(body)

    def sweep(self) -> Any:
        return self.rep.sweep(list_all(self.kube, "backups"))


@pytest.fixture
def w(monkeypatch: pytest.MonkeyPatch) -> World:
    return World(monkeypatch)


COPIED = {"manifestKey": KEY, "copiedObjects": 3, "skippedObjects": 1, "copiedBytes": 2_500_000}


# --- Pending → a Job → Replicated ----------------------------------------------------------------


def test_a_pending_replica_gets_its_copy_job_attempt_one(w: World) -> None:
    w.backup()
    assert w.rep.start(w.get()) == ["dr"]

    assert [j["metadata"]["name"] for j in w.kube.created_jobs] == [JOB1]
    loc = w.loc()
    assert (loc["state"], loc["attempts"], loc["jobName"]) == ("Pending", 1, JOB1)
    assert loc["lastAttemptAt"] == fmt(NOW) and loc["message"] == f"copying (attempt 1, Job {JOB1})"
    assert w.kube.reasons("b1") == ["ReplicationStarted"]
    assert "copying the snapshot to dr (EU), attempt 1" in w.kube.events[0][3]
    cond = w.replicated_cond()
    assert (cond["status"], cond["reason"]) == ("False", "ReplicationPending")

    assert w.rep.start(w.get()) == []  # its Job runs: never a second one
    assert len(w.kube.created_jobs) == 1 and w.kube.reasons("b1") == ["ReplicationStarted"]


def test_a_succeeded_copy_makes_the_location_replicated_and_the_condition_true(w: World) -> None:
    w.backup()
    w.rep.start(w.get())
    w.clock.advance(60)
    w.rep.sync_from_job(w.get(), w.finish(JOB1, ok=True, **COPIED))

    loc = w.loc()
    assert loc["state"] == "Replicated" and loc["replicatedAt"] == fmt(w.clock.now())
    assert (loc["copiedObjects"], loc["skippedObjects"], loc["copiedBytes"]) == (3, 1, 2_500_000)
    assert loc["message"] == "verified: 3 objects copied, 1 already there"
    st = w.kube.status_of("backups", NS, "b1")
    assert st["replication"] == "2/2" and st["phase"] == "Completed"
    cond = w.replicated_cond()
    assert (cond["status"], cond["reason"]) == ("True", "AllLocations")
    assert cond["message"] == "the snapshot is in all 2 locations"
    assert w.kube.reasons("b1") == ["ReplicationStarted", "Replicated"]
    assert "2.50 MB" in w.kube.events[-1][3]

    w.rep.sync_from_job(w.get(), w.finish(JOB1, ok=True, **COPIED))  # the Job's next event
    assert w.kube.reasons("b1") == ["ReplicationStarted", "Replicated"]
    assert w.rep.start(w.get()) == [] and len(w.kube.created_jobs) == 1


def test_the_condition_is_true_only_when_every_replica_holds_the_snapshot(w: World) -> None:
    w.add_storage("dr2", "bk-dr2")
    w.storage_spec("s3")["replicas"] = [{"name": "dr"}, {"name": "dr2"}]
    w.backup(locations=[primary_loc(), pending("dr"), pending("dr2")])
    assert sorted(w.rep.start(w.get())) == ["dr", "dr2"]
    w.rep.sync_from_job(w.get(), w.finish(JOB1, ok=True, **COPIED))
    assert w.replicated_cond()["status"] == "False"
    assert w.kube.status_of("backups", NS, "b1")["replication"] == "2/3"
    w.rep.sync_from_job(w.get(), w.finish(replicate_job_name("b1", "dr2", 1), ok=True, **COPIED))
    assert w.replicated_cond()["status"] == "True"
    assert w.kube.status_of("backups", NS, "b1")["replication"] == "3/3"


# --- Failed, with backoff ------------------------------------------------------------------------


def test_a_failed_copy_is_failed_with_its_reason_and_retried_when_due(w: World) -> None:
    w.backup()
    w.rep.start(w.get())
    w.rep.sync_from_job(
        w.get(), w.finish(JOB1, ok=False, error="reading packs/1.pack: the primary is damaged")
    )
    loc = w.loc()
    assert loc["state"] == "Failed" and not loc.get("final")
    assert loc["message"] == "reading packs/1.pack: the primary is damaged; retried with backoff"
    cond = w.replicated_cond()
    assert (cond["status"], cond["reason"]) == ("False", "ReplicationFailed")
    assert w.kube.reasons("b1") == ["ReplicationStarted", "ReplicationFailed"]

    wait = w.config.gc_interval_seconds  # attempt 1: one interval
    w.clock.advance(wait - 1)
    assert w.rep.start(w.get()) == [] and len(w.kube.created_jobs) == 1
    w.clock.advance(1)
    assert w.rep.start(w.get()) == ["dr"]
    assert [j["metadata"]["name"] for j in w.kube.created_jobs] == [JOB1, JOB2]
    loc = w.loc()
    assert (loc["state"], loc["attempts"], loc["jobName"]) == ("Pending", 2, JOB2)

    w.rep.sync_from_job(w.get(), w.finish(JOB2, ok=False))  # no result: the Job's own reason
    assert (
        w.loc()["message"]
        == "the replication Job failed (BackoffLimitExceeded: gave up); retried with backoff"
    )
    w.clock.advance(2 * wait - 1)  # attempt 2: twice as long
    assert w.rep.start(w.get()) == []
    w.clock.advance(1)
    assert w.rep.start(w.get()) == ["dr"] and w.loc()["attempts"] == 3


def test_a_job_that_succeeded_without_a_result_is_a_failure(w: World) -> None:
    w.backup()
    w.rep.start(w.get())
    w.rep.sync_from_job(w.get(), w.finish(JOB1, ok=True))
    assert w.loc()["state"] == "Failed"
    assert w.loc()["message"] == "the replication Job failed (no result); retried with backoff"


# --- waiting, and final failures ----------------------------------------------------------------


def test_an_unreachable_replica_gets_no_job_and_waits_saying_why(w: World) -> None:
    w.backup()
    w.stores["bk-dr"].down = "cannot connect to the S3 endpoint"
    assert w.rep.start(w.get()) == []
    loc = w.loc()
    assert loc["state"] == "Pending" and loc["attempts"] == 0
    assert loc["message"] == (
        "waiting: bucket bk-dr at memory://: cannot connect to the S3 endpoint; retried every 300s"
    )
    assert w.kube.created_jobs == [] and w.kube.events == []
    rv = w.get()["metadata"]["resourceVersion"]
    w.rep.start(w.get())  # said once: nothing written again
    assert w.get()["metadata"]["resourceVersion"] == rv

    w.stores["bk-dr"].down = ""
    report = w.sweep()
    assert report.started == [f"{NS}/b1"] and w.loc()["jobName"] == JOB1


def test_a_missing_replica_storage_waits(w: World) -> None:
    w.backup()
    del w.kube.objects[("backupstorages", NS, "dr")]
    assert w.rep.start(w.get()) == []
    assert w.loc()["state"] == "Pending" and w.loc()["message"].startswith(
        'waiting: BackupStorage "dr" not found'
    )


def test_a_replica_the_residency_policy_now_refuses_fails_for_good(w: World) -> None:
    w.backup()
    w.storage_spec("dr")["jurisdiction"] = "US"
    assert w.rep.start(w.get()) == []
    loc = w.loc()
    assert (loc["state"], loc["final"]) == ("Failed", True)
    assert loc["message"].startswith("not copied: ") and "US" in loc["message"]
    assert w.kube.reasons("b1") == ["ReplicationRefused"] and w.kube.created_jobs == []
    w.clock.advance(7 * 24 * 3600)  # never retried, however long
    assert w.sweep().examined == 0 and w.kube.created_jobs == []


def test_a_storage_no_longer_listed_as_a_replica_fails_for_good(w: World) -> None:
    w.backup()
    w.storage_spec("s3")["replicas"] = []
    w.rep.start(w.get())
    loc = w.loc()
    assert (loc["state"], loc["final"]) == ("Failed", True)
    assert loc["message"] == "not copied: no longer a replica of the primary storage (spec.replicas)"
    assert w.kube.created_jobs == []


def test_a_primary_that_moved_to_another_bucket_fails_every_copy_for_good(w: World) -> None:
    w.backup()
    w.storage_spec("s3")["bucket"] = "bk-new"
    w.rep.start(w.get())
    loc = w.loc()
    assert (loc["state"], loc["final"]) == ("Failed", True)
    assert loc["message"] == (
        "not copied: BackupStorage s3 now points at bucket bk-new at http://s3.test; "
        "the snapshot is in bucket bk"
    )
    assert w.kube.reasons("b1") == ["ReplicationRefused"] and w.kube.created_jobs == []


def test_a_primary_that_is_gone_fails_every_copy_for_good(w: World) -> None:
    w.backup()
    del w.kube.objects[("backupstorages", NS, "s3")]
    w.rep.start(w.get())
    assert w.loc()["final"] is True and w.loc()["message"] == "not copied: its primary BackupStorage is gone"


# --- the sweep -----------------------------------------------------------------------------------


def test_the_sweep_gives_old_backups_the_replicas_added_since_and_starts_them(w: World) -> None:
    w.backup(locations=[primary_loc()], replication="1/1")
    w.add_storage("dr2", "bk-dr2")
    w.storage_spec("s3")["replicas"] = [{"name": "dr2"}]
    report = w.sweep()
    assert report.extended == [f"{NS}/b1"] and report.started == [f"{NS}/b1"]
    locs = w.kube.status_of("backups", NS, "b1")["locations"]
    assert [(loc["storage"], loc["state"], loc.get("attempts")) for loc in locs] == [
        ("s3", "Replicated", None),
        ("dr2", "Pending", 1),
    ]
    assert w.kube.status_of("backups", NS, "b1")["replication"] == "1/2"


def test_the_sweep_leaves_expired_and_unfinished_backups_alone(w: World) -> None:
    w.backup("old", expires=NOW - dt.timedelta(seconds=1))
    w.backup("busy")
    w.kube.patch_status("backups", NS, "busy", {"phase": "Running"})
    report = w.sweep()
    assert report.examined == 0 and report.started == [] and w.kube.created_jobs == []


def test_the_sweep_follows_a_copy_whose_job_event_was_lost(w: World) -> None:
    w.backup()
    w.rep.start(w.get())
    w.finish(JOB1, ok=True, **COPIED)  # nobody told the Replicator
    report = w.sweep()
    assert w.loc()["state"] == "Replicated" and report.started == []
    assert len(w.kube.created_jobs) == 1


# --- conflicts on the locations write ------------------------------------------------------------


def test_a_conflict_on_the_locations_write_is_decided_again_and_lands_once(w: World) -> None:
    w.backup()
    w.kube.fail("patch_status", 409, 409)
    assert w.rep.start(w.get()) == ["dr"]
    assert w.loc()["jobName"] == JOB1 and w.loc()["attempts"] == 1
    assert len(w.kube.created_jobs) == 1 and w.kube.reasons("b1") == ["ReplicationStarted"]


class RacingKube(FakeKube):
    """Another writer finishes the copy while the Job is being created (a sync, another sweep)."""

    def create_job(self, namespace: str, job: dict[str, Any]) -> bool:
        made = super().create_job(namespace, job)
        st = self.objects[("backups", NS, "b1")]["status"]
        locs = [{**loc, "state": "Replicated"} if loc["storage"] == "dr" else loc for loc in st["locations"]]
        self.patch_status("backups", NS, "b1", {"locations": locs})
        return made


def test_a_location_another_writer_moved_on_is_never_overwritten(monkeypatch: pytest.MonkeyPatch) -> None:
    w = World(monkeypatch, kube=RacingKube())
    stale = w.backup()
    w.rep.start(stale)
    loc = w.loc()
    assert loc["state"] == "Replicated" and "jobName" not in loc  # decided on a state that changed: left


def test_a_locations_write_that_keeps_conflicting_is_not_lost(w: World) -> None:
    w.backup()
    w.rep.start(w.get())
    job = w.finish(JOB1, ok=True, **COPIED)
    w.kube.fail("patch_status", *[409] * 5)
    with pytest.raises(StatusConflict):
        w.rep.sync_from_job(w.get(), job)
    assert w.loc()["state"] == "Pending"
    w.sweep()  # the Job is still there, finished: the sweep follows it
    assert w.loc()["state"] == "Replicated"
    assert w.kube.reasons("b1") == ["ReplicationStarted", "Replicated"]


def test_nothing_is_written_on_a_backup_that_is_not_completed_or_gone(w: World) -> None:
    body = w.backup()
    w.kube.patch_status("backups", NS, "b1", {"phase": "Failed"})
    assert w.rep.start(body) == []
    del w.kube.objects[("backups", NS, "b1")]
    w.rep.sync_from_job(body, {"metadata": {"name": JOB1, "annotations": {}}, "status": {"succeeded": 1}})
    assert w.kube.created_jobs == [] and w.kube.events == []


def test_a_restarted_operator_finds_the_copy_job_it_made_instead_of_making_another(w: World) -> None:
    w.backup()
    w.kube.jobs[(NS, JOB1)] = {"metadata": {"name": JOB1, "namespace": NS}, "status": {"active": 1}}
    assert w.rep.start(w.get()) == []  # created nothing
    loc = w.loc()
    assert (loc["state"], loc["attempts"], loc["jobName"]) == ("Pending", 1, JOB1)
    assert w.kube.created_jobs == [] and w.kube.events == []
