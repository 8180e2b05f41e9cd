"""A restore drill without a scratch Secret (issue 16, item 5): the operator runs an ephemeral
PostgreSQL server of the Backup's server major (the image `make image` built, nightjar-postgres),
restores into it and deletes its Pod and Secret once the drill is terminal.

Nothing mocked: the stack's API server, operator, PostgreSQL, MinIO and real node.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from nightjar.devstack.stack import Stack, State
from nightjar.domain.retention import parse_time
from nightjar.scratchpod import scratch_name
from tests.integration.helpers import G, V, backup_body, make_storage, psql, take_backup
from tests.support import wait_for


def _exists(read: Any, name: str, ns: str) -> bool:
    try:
        read(name, ns)
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


def test_a_drill_without_a_scratch_secret_passes_on_an_ephemeral_server_that_is_then_deleted(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
) -> None:
    make_storage(custom, core, env, namespace)
    body = backup_body("eph")
    body["spec"]["source"]["rowCounts"] = True
    st = take_backup(custom, namespace, body)
    major = st["database"]["serverVersion"].split(".")[0]
    drill = {
        "apiVersion": f"{G}/{V}",
        "kind": "Verification",
        "metadata": {"name": "eph-drill"},
        "spec": {"backupName": "eph"},
    }
    started = time.monotonic()
    custom.create_namespaced_custom_object(G, V, namespace, "verifications", drill)
    pod_name = scratch_name("eph-drill")
    messages: list[str] = []
    ready_after: float | None = None
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + 300
    v: dict[str, Any] = {}
    while time.monotonic() < deadline:
        v = custom.get_namespaced_custom_object(G, V, namespace, "verifications", "eph-drill")
        msg = (v.get("status") or {}).get("message") or ""
        if msg and (not messages or messages[-1] != msg):
            messages.append(msg)
        try:
            pod = core.read_namespaced_pod(pod_name, namespace)
        except ApiException as e:
            if e.status != 404:
                raise
        else:
            seen["pod"] = pod
            ready = [c for c in pod.status.conditions or [] if c.type == "Ready" and c.status == "True"]
            if ready and ready_after is None:
                ready_after = (
                    ready[0].last_transition_time - pod.metadata.creation_timestamp
                ).total_seconds()
        if (v.get("status") or {}).get("phase") in ("Passed", "Failed"):
            break
        time.sleep(0.5)
    drill_seconds = time.monotonic() - started
    vs = v["status"]
    assert vs["phase"] == "Passed", (vs.get("message"), messages)
    assert vs["exactCounts"] is True and vs["rowsChecked"] == 5500 and vs["restoreSeconds"] > 0
    assert any(m == f"starting a scratch PostgreSQL {major} server (Pod {pod_name})" for m in messages), (
        messages
    )
    # The server ran as the restricted PodSecurity standard asks, from the image of the major.
    pod = seen["pod"]
    assert pod.spec.containers[0].image == f"nightjar-postgres:{major}"
    assert pod.spec.security_context.run_as_non_root is True
    c = pod.spec.containers[0].security_context
    assert c.read_only_root_filesystem is True and c.capabilities.drop == ["ALL"]
    assert c.allow_privilege_escalation is False
    assert pod.metadata.owner_references[0].kind == "Verification"
    assert ready_after is not None
    # Once terminal, the Pod is gone (asked for before the phase was written); its Secret is owned
    # by the Verification and goes with it (the operator may not delete Secrets).
    wait_for(
        "the scratch Pod to be gone",
        lambda: not _exists(core.read_namespaced_pod, pod_name, namespace),
        60,
    )
    secret = core.read_namespaced_secret(pod_name, namespace)
    assert secret.metadata.owner_references[0].kind == "Verification"
    finished = parse_time(vs["finishedAt"])
    print(
        f"\nscratch server: Pod created to Ready {ready_after:.1f} s; drill {drill_seconds:.1f} s "
        f"(restoreSeconds {vs['restoreSeconds']:.2f}); finishedAt {finished.isoformat()}; messages {messages}"
    )
    assert psql(env, app_db, "select count(*) from orders") == "5000"  # the source untouched


def test_the_operator_killed_while_the_scratch_server_starts_converges_on_that_one_server(
    custom: client.CustomObjectsApi,
    core: client.CoreV1Api,
    env: dict[str, str],
    namespace: str,
    app_db: str,
    files_pvc: Path,
) -> None:
    make_storage(custom, core, env, namespace)
    take_backup(custom, namespace, backup_body("eph2", files=False))
    drill = {
        "apiVersion": f"{G}/{V}",
        "kind": "Verification",
        "metadata": {"name": "eph-restart"},
        "spec": {"backupName": "eph2"},
    }
    custom.create_namespaced_custom_object(G, V, namespace, "verifications", drill)
    pod_name = scratch_name("eph-restart")
    pod = wait_for(
        "the scratch Pod to exist",
        lambda: (
            core.read_namespaced_pod(pod_name, namespace)
            if _exists(core.read_namespaced_pod, pod_name, namespace)
            else None
        ),
        60,
        0.05,
    )
    uid = pod.metadata.uid
    stack = Stack(Path(env["NIGHTJAR_STATE_DIR"]))
    state = State.load(stack.dir)
    assert state is not None
    os.kill(next(p for p in state.procs if p.name == "operator").pid, signal.SIGKILL)
    stack.restart_operator()
    uids = {uid}
    deadline = time.monotonic() + 300
    v: dict[str, Any] = {}
    while time.monotonic() < deadline:
        v = custom.get_namespaced_custom_object(G, V, namespace, "verifications", "eph-restart")
        if (v.get("status") or {}).get("phase") in ("Passed", "Failed"):
            break
        try:
            uids.add(core.read_namespaced_pod(pod_name, namespace).metadata.uid)
        except ApiException as e:
            if e.status != 404:
                raise
        time.sleep(0.5)
    assert v["status"]["phase"] == "Passed", v["status"].get("message")
    assert uids == {uid}  # the restarted operator went on with the server it found
    wait_for(
        "the scratch Pod to be gone",
        lambda: not _exists(core.read_namespaced_pod, pod_name, namespace),
        60,
    )
    owner = core.read_namespaced_secret(pod_name, namespace).metadata.owner_references[0]
    assert owner.kind == "Verification"  # the Secret goes with it
