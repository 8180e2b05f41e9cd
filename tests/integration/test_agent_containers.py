"""On the real node the operator's Jobs run as users run them: a backup, its replication and a
restore into another namespace each run as a container (containerd) of the image ``make image``
built, as uid 65532 with a read-only root filesystem and the chart's agent resources, reaching
PostgreSQL, both S3 servers and (the restore's progress) the API server over the pod network.

Only on the real node (``make test NODE=real``): the process node runs Jobs as local processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from nightjar.constants import LABEL_BACKUP, LABEL_REPLICATION, LABEL_RESTORE
from tests.integration.conftest import Env
from tests.integration.helpers import TABLE_CHECKSUMS, G, V, backup_body, psql, take_backup
from tests.integration.test_replication import pair, replicated
from tests.integration.test_restore import restore_body, tree, wait_restore
from tests.support import assert_runs_in_the_image, wait_for


@pytest.fixture(autouse=True)
def _real_node_only(env: dict[str, str]) -> None:
    if env.get("NIGHTJAR_NODE") != "real":
        pytest.skip("the process node runs Jobs as local processes: no containers, no image")


def _job_pods(core: client.CoreV1Api, ns: str, selector: str) -> list[Any]:
    pods = core.list_namespaced_pod(ns, label_selector=selector).items
    assert pods, f"no Pod in {ns} with {selector}"
    return list(pods)


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
        print(assert_runs_in_the_image(pod))
    (restore,) = pods[-1:]
    assert any(v.name == "api" and v.projected for v in restore.spec.volumes)
