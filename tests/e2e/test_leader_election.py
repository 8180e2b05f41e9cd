"""Two replicas of the chart's operator: one acts, the other waits, and it takes over when the
leader goes. Runs last (it changes the release)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client

from tests.e2e.conftest import CHART, RELEASE, SYSTEM_NS, WATCHED, Helm, Release, lease_holder, operator_pods
from tests.integration.helpers import psql
from tests.support import real_node, wait_for

G, V = "nightjar.dev", "v1alpha1"


@pytest.fixture
def ha_db(env: dict[str, str], core: client.CoreV1Api) -> Iterator[str]:
    """A small database of its own in "shop", with its Secret "ha-db"."""
    db, password = f"ha_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    psql(env, "postgres", f"create role {db} login password '{password}'")
    psql(env, "postgres", f"create database {db} owner {db}")
    psql(env, db, f"set role {db}; create table t (id int primary key); insert into t values (1), (2);")
    core.create_namespaced_secret(
        WATCHED[0],
        {
            "metadata": {"name": "ha-db"},
            "stringData": {
                "host": env["NIGHTJAR_PG_HOST"],
                "port": env["NIGHTJAR_PG_PORT"],
                "dbname": db,
                "user": db,
                "password": password,
            },
        },
    )
    yield db
    core.delete_namespaced_secret("ha-db", WATCHED[0])
    psql(env, "postgres", f"drop database if exists {db} with (force)")


def backup_completes(custom: client.CustomObjectsApi, name: str) -> None:
    body = {
        "apiVersion": f"{G}/{V}",
        "kind": "Backup",
        "metadata": {"name": name},
        # The examples' BackupStorage "primary" in "shop" (test_examples applied it).
        "spec": {
            "storageRef": {"name": "primary"},
            "source": {"database": {"secretRef": {"name": "ha-db"}}},
        },
    }
    custom.create_namespaced_custom_object(G, V, WATCHED[0], "backups", body)

    def done() -> dict[str, object] | None:
        b = custom.get_namespaced_custom_object(G, V, WATCHED[0], "backups", name)
        return b if (b.get("status") or {}).get("phase") in ("Completed", "Failed") else None

    b = wait_for(f"backup {name}", done, 180)
    assert b["status"]["phase"] == "Completed", b["status"].get("message")  # type: ignore[index]


def test_two_replicas_one_leader_and_a_takeover(
    release: Release,
    ha_db: str,
    helm: Helm,
    core: client.CoreV1Api,
    custom: client.CustomObjectsApi,
    api_client: client.ApiClient,
) -> None:
    # On the process node both replicas are processes of one host: no metrics port, so they do
    # not collide. On the real node each has its own network namespace (and its probes).
    helm(
        "upgrade",
        RELEASE,
        str(CHART),
        "--namespace",
        SYSTEM_NS,
        "--reuse-values",
        "--set=replicaCount=2",
        *([] if real_node() else ["--set=metrics.enabled=false"]),
        "--wait",
        "--timeout=3m",
    )
    pods = wait_for(
        "two running operator pods",
        lambda: (
            (ps := operator_pods(core))
            and len(ps) == 2
            and all(p.status.phase == "Running" for p in ps)
            and ps
        ),
        120,
    )
    names = {p.metadata.name for p in pods}
    leader = wait_for(
        "a leader among the new pods", lambda: (h := lease_holder(api_client)) in names and h, 60
    )
    standby = (names - {leader}).pop()
    backup_completes(custom, f"ha-{uuid.uuid4().hex[:6]}")

    core.delete_namespaced_pod(leader, SYSTEM_NS)
    # The leader releases the Lease on its way out: the standby (or the replacement) takes over.
    new = wait_for(
        "another replica to lead", lambda: (h := lease_holder(api_client)) not in ("", leader) and h, 60
    )
    assert new == standby or new not in names
    backup_completes(custom, f"ha-{uuid.uuid4().hex[:6]}")
