"""``nightjar verify <backup>`` without a cluster: click's CliRunner with ``cluster.connect`` giving a
fake client (the one seam the command reads the cluster through). The fake records the
Verification the command creates and plays the operator by answering its polls with the phases
a test gives."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner
from kubernetes.client.rest import ApiException

from nightjar.cli import main
from nightjar.transfer import cluster


class FakeCluster:
    """What the command uses of ``nightjar.kube.Kube``: ``get`` and ``custom``'s create."""

    def __init__(self, backup_phase: str | None = "Completed", *statuses: dict[str, Any]) -> None:
        self.backup_phase = backup_phase
        self.statuses = list(statuses)
        self.created: list[tuple[str, str, str, str, dict[str, Any]]] = []
        self.create_error: ApiException | None = None
        self.custom = self  # custom.create_namespaced_custom_object

    def create_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        if self.create_error is not None:
            raise self.create_error
        self.created.append((group, version, namespace, plural, body))
        return body

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        if plural == "backups":
            if self.backup_phase is None:
                return None
            return {
                "metadata": {"name": name, "namespace": namespace},
                "status": {"phase": self.backup_phase},
            }
        assert plural == "verifications"
        body = next(b for *_, b in self.created if b["metadata"]["name"] == name)
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {**body, "status": status}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeCluster:
    f = FakeCluster("Completed", {"phase": "Queued"})
    monkeypatch.setattr(cluster, "connect", lambda: f)
    return f


PASSED = {
    "phase": "Passed",
    "message": "restored in 12.5 s: 7 tables, 1234 rows (exact counts), 3 files checked",
    "restoreSeconds": 12.5,
}
FAILED = {
    "phase": "Failed",
    "message": "table public.orders: 1000 rows recorded at backup time, 999 restored",
}


def verify(*args: str) -> Any:
    return CliRunner().invoke(main, ["verify", *args])


def test_verify_creates_the_verification_and_no_wait_returns_at_once(fake: FakeCluster) -> None:
    out = verify("b1", "-n", "shop", "--scratch-secret", "scratch", "--name", "drill-1", "--no-wait")
    assert out.exit_code == 0, out.output
    assert len(fake.created) == 1
    group, version, namespace, plural, body = fake.created[0]
    assert (group, version, namespace, plural) == ("nightjar.dev", "v1alpha1", "shop", "verifications")
    assert body == {
        "apiVersion": "nightjar.dev/v1alpha1",
        "kind": "Verification",
        "metadata": {"name": "drill-1", "namespace": "shop"},
        "spec": {"backupName": "b1", "scratch": {"database": {"secretRef": {"name": "scratch"}}}},
    }
    assert "verification.nightjar.dev/drill-1 created in shop: restore drill of Backup b1" in out.output


def test_the_default_name_is_verify_backup_and_a_time(fake: FakeCluster) -> None:
    out = verify("b1", "-n", "shop", "--scratch-secret", "scratch", "--no-wait")
    assert out.exit_code == 0, out.output
    name = fake.created[0][4]["metadata"]["name"]
    assert name.startswith("verify-b1-") and len(name) == len("verify-b1-") + 14
    assert name[len("verify-b1-") :].isdigit()


def test_a_passed_drill_exits_0_with_its_message(fake: FakeCluster) -> None:
    fake.statuses = [PASSED]
    out = verify("b1", "-n", "shop", "--scratch-secret", "scratch", "--name", "drill-1")
    assert out.exit_code == 0, out.output
    assert f"verification.nightjar.dev/drill-1 Passed: {PASSED['message']}" in out.output


def test_a_failed_drill_exits_1_with_its_message(fake: FakeCluster) -> None:
    fake.statuses = [{"phase": "Running", "message": "restoring"}, FAILED]
    out = verify("b1", "-n", "shop", "--scratch-secret", "scratch", "--name", "drill-1")
    assert out.exit_code == 1
    assert f"Error: verification drill-1 Failed: {FAILED['message']}" in out.output


def test_a_drill_still_running_after_the_timeout_exits_1(fake: FakeCluster) -> None:
    fake.statuses = [{"phase": "Queued"}]
    out = verify("b1", "-n", "shop", "--scratch-secret", "scratch", "--name", "d", "--timeout", "0")
    assert out.exit_code == 1
    assert "is still Queued after 0s (is the operator running?)" in out.output


def test_verify_without_a_scratch_secret_asks_for_an_ephemeral_server(fake: FakeCluster) -> None:
    out = verify("b1", "-n", "shop", "--name", "drill-2", "--no-wait")
    assert out.exit_code == 0, out.output
    (created,) = fake.created
    assert created[4]["spec"] == {"backupName": "b1"}  # no spec.scratch: the operator runs one


@pytest.mark.parametrize(
    ("phase", "says"),
    [
        (None, 'Backup "b1" not found in namespace shop'),
        ("Running", 'Backup "b1" is Running: only a Completed backup can be verified'),
    ],
)
def test_a_backup_that_cannot_be_verified_is_refused_before_anything_is_created(
    fake: FakeCluster, phase: str | None, says: str
) -> None:
    fake.backup_phase = phase
    out = verify("b1", "-n", "shop", "--scratch-secret", "scratch")
    assert out.exit_code == 1
    assert f"Error: {says}" in out.output
    assert fake.created == []


def test_a_cluster_without_the_crd_says_to_install_it(fake: FakeCluster) -> None:
    fake.create_error = ApiException(status=404, reason="Not Found")
    fake.create_error.body = json.dumps({"message": "the server could not find the requested resource"})
    out = verify("b1", "-n", "shop", "--scratch-secret", "scratch")
    assert out.exit_code == 1
    assert "this cluster has no Verification resource type" in out.output
    assert "verifications.nightjar.dev" in out.output
