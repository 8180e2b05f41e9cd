"""Every transition tells: the Events a Backup, a Restore and a BackupStorage get on the real
stack, one per step, in order, with a reason and a message naming what happened (never a secret).
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client

from tests.integration.helpers import G, V, backup_body, make_storage, take_backup
from tests.support import wait_for


def events(core: client.CoreV1Api, ns: str, kind: str, name: str) -> list[Any]:
    """The Events about one object, oldest first (resourceVersion orders them within a second)."""
    items = core.list_namespaced_event(
        ns, field_selector=f"involvedObject.kind={kind},involvedObject.name={name}"
    ).items
    return sorted(items, key=lambda e: int(e.metadata.resource_version))


def reasons_once(core: client.CoreV1Api, ns: str, kind: str, name: str, last: str) -> list[Any]:
    """The Events about an object once the one with reason ``last`` arrived."""
    return wait_for(
        f"{kind} {name} event {last}",
        lambda: (evs := events(core, ns, kind, name)) and last in [e.reason for e in evs] and evs,
        30,
    )


def test_a_completed_backup_has_one_event_per_transition(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
) -> None:
    make_storage(custom, core, env, namespace)
    st = take_backup(custom, namespace, backup_body("tells", files=False))

    evs = reasons_once(core, namespace, "Backup", "tells", "Completed")
    assert [e.reason for e in evs] == ["Queued", "JobCreated", "Running", "Completed"]
    by = {e.reason: e for e in evs}
    assert by["Queued"].type == "Normal" and "OnDemand backup queued, expires" in by["Queued"].message
    assert "nightjar-backup-tells" in by["JobCreated"].message
    assert by["Running"].message == "attempt 1 of 3 running"
    assert st["snapshotId"] in by["Completed"].message and st["sizeUncompressedMB"] in by["Completed"].message
    assert all(e.source.component == "nightjar-operator" for e in evs)
    password = core.read_namespaced_secret("db", namespace).data["password"]
    assert all(password not in (e.message or "") for e in evs)

    storage = reasons_once(core, namespace, "BackupStorage", "s3", "Ready")
    assert [e.reason for e in storage] == ["Ready"]
    assert "reachable" in storage[0].message


def test_a_restore_that_stops_the_app_tells_each_step(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
) -> None:
    apps = client.AppsV1Api(core.api_client)
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "shop"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "shop"}},
                "template": {
                    "metadata": {"labels": {"app": "shop"}},
                    "spec": {"containers": [{"name": "app", "image": "shop", "command": ["sleep", "3600"]}]},
                },
            },
        },
    )
    make_storage(custom, core, env, namespace)
    take_backup(custom, namespace, backup_body("b", files=False))
    custom.create_namespaced_custom_object(
        G,
        V,
        namespace,
        "restores",
        {
            "apiVersion": f"{G}/{V}",
            "kind": "Restore",
            "metadata": {"name": "r"},
            "spec": {
                "backupRef": {"name": "b"},
                "contents": "DatabaseOnly",
                "target": {"database": {"secretRef": {"name": "db"}}, "app": {"name": "shop"}},
            },
        },
    )

    def finished() -> dict[str, Any] | None:
        st = custom.get_namespaced_custom_object(G, V, namespace, "restores", "r").get("status") or {}
        return st if st.get("phase") in ("Completed", "Failed") else None

    st = wait_for("restore r to finish", finished, 180)
    assert st["phase"] == "Completed", json.dumps(st)
    evs = reasons_once(core, namespace, "Restore", "r", "Completed")
    assert [e.reason for e in evs] == [
        "Queued",
        "StoppingApp",
        "AppStopped",
        "Running",
        "RestartedApp",
        "Completed",
    ]
    by = {e.reason: e for e in evs}
    assert f"restore of Backup {namespace}/b into {namespace}: database db" in by["Queued"].message
    assert "Deployment shop has no Pods left; created Job nightjar-restore-r" in by["AppStopped"].message
    assert by["RestartedApp"].message == "scaled shop back to 1 replicas"
    assert "restored snapshot" in by["Completed"].message
    assert apps.read_namespaced_deployment("shop", namespace).spec.replicas == 1
