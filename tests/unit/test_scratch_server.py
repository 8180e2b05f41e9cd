"""The ephemeral scratch server of a restore drill without spec.scratch (issue 16, item 5): the
pure builders (nightjar.scratchpod) and its lifecycle through ``VerificationReconciler``:
created, waited for, handed to the drill, deleted before the drill is terminal; no image for
the Backup's major fails naming it; an operator restarted midway converges.

The fake API (tests/fakes.py) plays the kubelet: a test sets the Pod's status.
"""

from __future__ import annotations

import base64

import pytest

from nightjar import scratchpod
from nightjar.config import OperatorConfig
from nightjar.reconcile import scratch
from nightjar.reconcile.verification import VerificationReconciler
from tests.fakes import FakeKube
from tests.unit.test_verification_reconciler import JOB, PASSED_RESULT, World, complete, env_secrets, failed

POD = "nightjar-scratch-v1"
CONFIG = OperatorConfig(scratch_image="reg.test/nightjar-postgres:{major}", scratch_majors=("14", "15"))


def world(config: OperatorConfig = CONFIG, version: str = "15.4", kube: FakeKube | None = None) -> World:
    w = World(kube)
    w.config = config
    w.rec = VerificationReconciler(w.kube, config, clock=w.clock)
    w.backup(database={"serverVersion": version})
    return w


def ready(w: World, ip: str = "10.244.0.9") -> None:
    w.kube.pods[(w.ns, POD)]["status"] = {
        "phase": "Running",
        "podIP": ip,
        "conditions": [{"type": "Ready", "status": "True"}],
    }


def test_server_major_of_recorded_versions() -> None:
    assert scratchpod.server_major("15.4") == "15"
    assert scratchpod.server_major("17.0 (Debian 17.0-1.pgdg120+1)") == "17"
    assert scratchpod.server_major("9.6.24") == "9.6"
    assert scratchpod.server_major("") == ""
    assert scratchpod.server_major("devel") == ""


def test_image_for_a_major_only_when_configured_for_it() -> None:
    assert scratchpod.image_for(CONFIG, "15") == "reg.test/nightjar-postgres:15"
    assert scratchpod.image_for(CONFIG, "16") is None
    assert scratchpod.image_for(OperatorConfig(), "15") is None
    every = OperatorConfig(scratch_image="pg:{major}-alpine")
    assert scratchpod.image_for(every, "12") == "pg:12-alpine"


def test_the_pod_runs_restricted_with_its_data_on_an_emptydir_and_a_password_from_its_secret() -> None:
    v = {"metadata": {"name": "v1", "namespace": "shop", "uid": "u-v1"}, "spec": {"backupName": "b1"}}
    pod = scratchpod.build_pod(v, "reg.test/nightjar-postgres:15", "15", CONFIG)
    spec = pod["spec"]
    assert pod["metadata"]["name"] == POD
    (owner,) = pod["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "Verification",
        "v1",
        "u-v1",
        True,
    )
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    (c,) = spec["containers"]
    assert c["image"] == "reg.test/nightjar-postgres:15"
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["readinessProbe"]["exec"]["command"][0] == "pg_isready"
    assert c["env"] == [
        {"name": "POSTGRES_PASSWORD", "valueFrom": {"secretKeyRef": {"name": POD, "key": "password"}}}
    ]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {vol["name"]: vol for vol in spec["volumes"]}
    assert set(mounts) == {scratchpod.DATA, scratchpod.SOCKETS, "/tmp"}
    assert all("emptyDir" in vols[n] for n in mounts.values())


def test_each_secret_gets_its_own_generated_password_and_no_host_yet() -> None:
    v = {"metadata": {"name": "v1", "namespace": "shop", "uid": "u"}, "spec": {"backupName": "b1"}}
    a = scratchpod.build_secret(v, scratchpod.new_password())
    b = scratchpod.build_secret(v, scratchpod.new_password())
    assert a["data"]["password"] != b["data"]["password"]
    assert len(base64.b64decode(a["data"]["password"])) >= 32
    assert set(a["data"]) == {"user", "port", "dbname", "password"}
    assert a["metadata"]["ownerReferences"][0]["kind"] == "Verification"


def test_the_lifecycle_created_waited_for_drilled_and_deleted_before_the_drill_ends() -> None:
    w = world()
    v = w.verification(scratch=None)
    with pytest.raises(scratch.Starting):
        w.rec.reconcile(v)
    st = w.st
    assert st["phase"] == "Queued" and st["message"] == f"starting a scratch PostgreSQL 15 server (Pod {POD})"
    pod = w.kube.pods[(w.ns, POD)]
    assert pod["spec"]["containers"][0]["image"] == "reg.test/nightjar-postgres:15"
    password = w.kube.secrets[(w.ns, POD)]["password"]
    assert w.kube.created_jobs == []
    # Still starting: waits, creates nothing more, keeps the password.
    with pytest.raises(scratch.Starting):
        w.rec.reconcile(w.get())
    assert w.kube.calls["create_pod"] == 1 and w.kube.created_jobs == []
    ready(w)
    w.rec.reconcile(w.get())
    # The Secret is as the operator created it (it may not change a Secret); the Pod's address
    # goes to the drill's Job as a plain value, the rest from the Secret.
    secret = w.kube.secrets[(w.ns, POD)]
    assert secret == {"port": "5432", "dbname": "postgres", "user": "postgres", "password": password}
    (job,) = w.kube.created_jobs
    assert env_secrets(job) == {POD, "s3"}
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NIGHTJAR_SCRATCH_HOST"] == {"name": "NIGHTJAR_SCRATCH_HOST", "value": "10.244.0.9"}
    assert env["NIGHTJAR_SCRATCH_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": POD, "key": "password"}
    assert w.st["jobName"] == JOB
    # The drill ends: the server is deleted, then the drill is terminal; its Secret goes with the
    # Verification (owned by it: the operator may not delete Secrets).
    w.job(complete(), PASSED_RESULT)
    w.rec.follow(w.get())
    assert w.st["phase"] == "Passed"
    assert (w.ns, POD) not in w.kube.pods and ("Pod", w.ns, POD) in w.kube.deleted
    assert ("Secret", w.ns, POD) not in w.kube.deleted


def test_no_image_for_the_backups_major_fails_naming_it_and_the_chart_value() -> None:
    w = world(version="16.2")
    w.rec.reconcile(w.verification(scratch=None))
    st = w.st
    assert st["phase"] == "Failed"
    assert "no scratch server image for PostgreSQL 16" in st["message"]
    assert "verification.scratchImage" in st["message"]
    assert w.kube.pods == {} and w.kube.made == [] and w.kube.created_jobs == []


def test_no_scratch_image_at_all_fails_the_same_way() -> None:
    w = world(config=OperatorConfig())
    w.rec.reconcile(w.verification(scratch=None))
    assert w.st["phase"] == "Failed" and "images configured for: none" in w.st["message"]
    assert w.kube.pods == {}


def test_a_server_that_never_becomes_ready_fails_the_drill_and_is_deleted() -> None:
    w = world()
    with pytest.raises(scratch.Starting):
        w.rec.reconcile(w.verification(scratch=None))
    w.kube.pods[(w.ns, POD)]["metadata"]["creationTimestamp"] = "2026-11-24T18:00:00Z"
    w.kube.pods[(w.ns, POD)]["status"] = {
        "phase": "Pending",
        "containerStatuses": [
            {"state": {"waiting": {"reason": "ErrImageNeverPull", "message": "not present"}}}
        ],
    }
    with pytest.raises(scratch.Starting, match="ErrImageNeverPull"):
        w.rec.reconcile(w.get())
    w.clock.advance(CONFIG.scratch_start_timeout_seconds + 1)
    w.rec.reconcile(w.get())
    st = w.st
    assert st["phase"] == "Failed"
    assert st["message"].startswith(f"the scratch PostgreSQL 15 server (Pod {POD}) was not Ready after 300 s")
    assert "ErrImageNeverPull" in st["message"]
    assert (w.ns, POD) not in w.kube.pods
    assert w.kube.created_jobs == []


def test_an_operator_restarted_midway_converges_on_one_server_and_deletes_it() -> None:
    w = world()
    with pytest.raises(scratch.Starting):
        w.rec.reconcile(w.verification(scratch=None))
    password = w.kube.secrets[(w.ns, POD)]["password"]
    # A new operator (a new reconciler on the same cluster) while the server starts.
    again = VerificationReconciler(w.kube, CONFIG, clock=w.clock)
    with pytest.raises(scratch.Starting):
        again.reconcile(w.get())
    assert w.kube.calls["create_pod"] == 1 and len(w.kube.pods) == 1
    assert w.kube.secrets[(w.ns, POD)]["password"] == password
    ready(w)
    again.reconcile(w.get())
    # Restarted again while the drill runs, and once more after the delete but before the phase
    # was written (the delete raised the second time): the next follow ends it.
    third = VerificationReconciler(w.kube, CONFIG, clock=w.clock)
    third.reconcile(w.get())
    assert len(w.kube.created_jobs) == 1
    w.job(complete(), PASSED_RESULT)
    w.kube.fail("delete_pod", 500)
    with pytest.raises(Exception, match="injected"):
        third.follow(w.get())
    assert w.st["phase"] != "Passed" and (w.ns, POD) in w.kube.pods
    w.clock.advance(60)
    assert third.retry_sweep([w.get()]) == [f"{w.ns}/v1"]
    assert w.st["phase"] == "Passed"
    assert (w.ns, POD) not in w.kube.pods


def test_a_drill_with_a_scratch_secret_starts_no_server() -> None:
    w = world()
    w.rec.reconcile(w.verification())
    assert w.kube.pods == {} and w.kube.calls["create_pod"] == 0
    w.job(complete(), PASSED_RESULT)
    w.rec.follow(w.get())
    assert w.st["phase"] == "Passed" and w.kube.calls["delete_pod"] == 0


def test_config_reads_the_scratch_image_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIGHTJAR_SCRATCH_IMAGE", "nightjar-postgres:{major}")
    monkeypatch.setenv("NIGHTJAR_SCRATCH_MAJORS", "15, 16")
    monkeypatch.setenv("NIGHTJAR_SCRATCH_IMAGE_PULL_POLICY", "Never")
    c = OperatorConfig.from_env()
    assert (c.scratch_image, c.scratch_majors, c.scratch_image_pull_policy) == (
        "nightjar-postgres:{major}",
        ("15", "16"),
        "Never",
    )


def _killed_drill(w: World) -> None:
    """An ephemeral-server drill whose agent was killed (its temporary database may be left)."""
    with pytest.raises(scratch.Starting):
        w.rec.reconcile(w.verification(scratch=None))
    ready(w)
    w.rec.reconcile(w.get())
    w.job(failed(), {"error": "exit code 137"}, pods=("pod-uid-1",))


def test_a_killed_agent_on_an_ephemeral_server_gets_a_cleanup_job_with_its_address() -> None:
    w = world()
    _killed_drill(w)
    w.rec.follow(w.get())
    assert [j["metadata"]["name"] for j in w.kube.created_jobs] == [JOB, "nightjar-verify-cleanup-v1"]
    cleanup = w.kube.created_jobs[1]
    env = {e["name"]: e for e in cleanup["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["NIGHTJAR_SCRATCH_HOST"]["value"] == "10.244.0.9"
    assert env_secrets(cleanup) == {POD}
    assert w.st["phase"] not in ("Passed", "Failed")  # not terminal while its database may exist
    assert (w.ns, POD) in w.kube.pods  # the server stays until its database is dropped


def test_a_killed_agent_whose_ephemeral_server_is_gone_needs_no_cleanup() -> None:
    w = world()
    _killed_drill(w)
    del w.kube.pods[(w.ns, POD)]
    w.rec.follow(w.get())
    assert [j["metadata"]["name"] for j in w.kube.created_jobs] == [JOB]
    st = w.st
    assert st["phase"] == "Failed"
    assert st["message"] == "exit code 137; the scratch server is gone, and its temporary database with it"
