"""On the real node the operator's Jobs run as users run them: a backup, its replication and a
restore into another namespace each run as a container (containerd) of the image ``make image``
built, as uid 65532 with a read-only root filesystem and the chart's agent resources, reaching
PostgreSQL, both S3 servers and (the restore's progress) the API server over the pod network.

Only on the real node (``make test NODE=real``): the process node runs Jobs as local processes.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from nightjar.constants import LABEL_BACKUP, LABEL_REPLICATION, LABEL_RESTORE
from nightjar.devstack import realnode
from tests.integration.conftest import Env
from tests.integration.helpers import TABLE_CHECKSUMS, G, V, backup_body, psql, take_backup
from tests.integration.test_replication import pair, replicated
from tests.integration.test_restore import restore_body, tree, wait_restore
from tests.support import wait_for

CHART_VALUES = Path(__file__).resolve().parents[2] / "charts" / "nightjar" / "values.yaml"


@pytest.fixture(autouse=True)
def _real_node_only(env: dict[str, str]) -> None:
    if env.get("NIGHTJAR_NODE") != "real":
        pytest.skip("the process node runs Jobs as local processes: no containers, no image")


def _job_pods(core: client.CoreV1Api, ns: str, selector: str) -> list[Any]:
    pods = core.list_namespaced_pod(ns, label_selector=selector).items
    assert pods, f"no Pod in {ns} with {selector}"
    return list(pods)


def _seconds(a: dt.datetime, b: dt.datetime) -> float:
    return (b - a).total_seconds()


def _assert_runs_in_the_image(pod: Any) -> str:
    """The Pod ran to success as a container of the built image, as the chart runs agents; returns
    a line with its timings."""
    name = f"{pod.metadata.namespace}/{pod.metadata.name}"
    assert pod.status.phase == "Succeeded", (name, pod.status)
    assert pod.spec.node_name == realnode.NODE_NAME
    (status,) = pod.status.container_statuses
    assert status.container_id.startswith("containerd://"), name
    assert status.image_id == realnode.PROJECT_IMAGE_ID.read_text().strip(), name
    (container,) = pod.spec.containers
    assert container.image == realnode.PROJECT_IMAGE
    assert pod.spec.security_context.run_as_user == 65532
    assert pod.spec.security_context.run_as_non_root is True
    assert container.security_context.read_only_root_filesystem is True
    assert container.security_context.allow_privilege_escalation is False
    agent = yaml.safe_load(CHART_VALUES.read_text())["agent"]["resources"]
    assert container.resources.requests == agent["requests"], name
    assert container.resources.limits == agent["limits"], name
    term = status.state.terminated
    assert term.exit_code == 0, name
    created = pod.metadata.creation_timestamp
    return (
        f"{name}: created -> container started {_seconds(created, term.started_at):.0f}s, "
        f"ran {_seconds(term.started_at, term.finished_at):.0f}s"
    )


def test_backup_replication_and_restore_jobs_are_containers_of_the_built_image(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
    acceptance: Env,
) -> None:
    pair(custom, core, env, namespace)
    take_backup(custom, namespace, backup_body("nightly"))
    wait_for("the backup replicated", lambda: replicated(custom, namespace, "nightly"), 180)
    custom.create_namespaced_custom_object(
        G,
        V,
        acceptance.ns,
        "restores",
        restore_body(
            "copy",
            "nightly",
            namespace,
            target={"files": {"persistentVolumeClaim": {"claimName": "files", "path": "docs"}}},
        ),
    )
    st = wait_restore(custom, acceptance.ns, "copy")
    assert st["phase"] == "Completed", st.get("message")
    # The agent reported progress to the API server with the token the kubelet projected.
    assert st["progress"]["percent"] == 100
    assert psql(env, acceptance.db, TABLE_CHECKSUMS) == psql(env, app_db, TABLE_CHECKSUMS)
    assert tree(acceptance.files) == tree(files_pvc)

    pods = [
        *_job_pods(core, namespace, f"{LABEL_BACKUP}=nightly"),
        *_job_pods(core, namespace, f"{LABEL_REPLICATION}=nightly"),
        *_job_pods(core, acceptance.ns, f"{LABEL_RESTORE}=copy"),
    ]
    for pod in pods:
        print(_assert_runs_in_the_image(pod))
    (restore,) = pods[-1:]
    assert any(v.name == "api" and v.projected for v in restore.spec.volumes)
